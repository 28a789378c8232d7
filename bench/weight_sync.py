"""Weight-sync bandwidth: the object-store push (`WeightSync`) vs single-process memcpy.

    python bench/weight_sync.py [--sizes 100,500]

For transformer-shaped fp32 state dicts of ~100M and ~500M parameters, times a full versioned
push from the driver to one receiver actor that copies every tensor in place (what an engine's
`update_weights` does), median of 3, and divides its bytes/s by the memcpy bytes/s of the same
tensors in one process. Prints a table; never asserts.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlhf_cluster.weight_sync import WeightSync  # noqa: E402


def state_dict(million_params: int, hidden: int = 2048) -> dict[str, torch.Tensor]:
    """Layers of 4 attention + 3 MLP matrices until the size is reached."""
    tensors, total, layer = {}, 0, 0
    while total < million_params * 1_000_000:
        for name, shape in (("q", (hidden, hidden)), ("k", (hidden, hidden)), ("v", (hidden, hidden)),
                            ("o", (hidden, hidden)), ("up", (4 * hidden, hidden)),
                            ("gate", (4 * hidden, hidden)), ("down", (hidden, 4 * hidden))):
            tensors[f"layers.{layer}.{name}.weight"] = torch.randn(shape)
            total += shape[0] * shape[1]
        layer += 1
    return tensors


@ray.remote(num_cpus=1)
class Receiver:
    """Holds preallocated parameters and copies pushes into them, like HFEngine.update_weights."""

    def __init__(self, shapes: dict[str, tuple]):
        self.params = {k: torch.empty(s) for k, s in shapes.items()}
        self.version = -1

    def update_weights(self, version: int, named_tensors: dict[str, torch.Tensor]) -> int:
        for name, tensor in named_tensors.items():
            self.params[name].copy_(tensor)
        self.version = version
        return version


def memcpy_seconds(tensors: dict[str, torch.Tensor]) -> float:
    dst = {k: torch.empty_like(v) for k, v in tensors.items()}
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        for k, v in tensors.items():
            dst[k].copy_(v)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="100,500", help="millions of parameters")
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    print(f"{'params':>8}{'GB':>7}{'sync GB/s':>11}{'memcpy GB/s':>13}{'ratio':>7}{'push s':>8}")
    for size in (int(s) for s in args.sizes.split(",")):
        tensors = state_dict(size)
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        receiver = Receiver.remote({k: tuple(v.shape) for k, v in tensors.items()})
        sync = WeightSync([receiver])
        times = []
        for version in range(4):  # the first push warms the object store up
            t0 = time.perf_counter()
            sync.push(version, tensors)
            times.append(time.perf_counter() - t0)
        push = statistics.median(times[1:])
        copy = memcpy_seconds(tensors)
        params = sum(t.numel() for t in tensors.values()) / 1e6
        print(f"{params:>7.0f}M{nbytes / 1e9:>7.2f}{nbytes / push / 1e9:>11.2f}"
              f"{nbytes / copy / 1e9:>13.2f}{copy / push:>7.2f}{push:>8.2f}", flush=True)
        ray.kill(receiver)
        del tensors, sync
    ray.shutdown()


if __name__ == "__main__":
    main()
