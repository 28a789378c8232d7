"""Weight-sync bandwidth of every transport vs single-process memcpy of the same tensors.

    python bench/weight_sync.py [--sizes 100,500] [--bucket-mb 256] [--receivers 1]

For transformer-shaped fp32 state dicts (hidden 4096: [4096,4096] attention and [11008,4096]
MLP matrices, layer after layer until ~N M parameters) a sender actor (the learner rank 0
stand-in) streams a full version through the real transport ends (`weight_transport`) to
receiver actors that swap it into preallocated parameters with the functions `HFEngine` uses
(`weight_adopt.adopt_into` / `copy_into`). Timed from the driver: send start until every
receiver has swapped, two warm-ups (one per shm slot) then the median of 3. Paths:
  shm          same-node double-buffered shared-memory segment; the receiver ADOPTS views into
               it as its parameters (HFEngine.adopt_weights): one copy per version, rank 0's pack
  shm-copy     the same transport, the receiver copies the views in (update_weights): two copies
  broadcast    bucketed gloo broadcast over loopback TCP into each worker's receive buffer
  object-store one ray.put of the full dict, each worker copies it in (the fallback)
memcpy = dst.copy_(src) per tensor into preallocated tensors in one process (warm pages),
the best of 5 measured right before each path (the box is shared: timings drift; the best
makes the baseline the hardest to beat). ratio = memcpy seconds /
sync seconds (end to end, including the engine's own copy-in, "swap"); xport ratio = memcpy
seconds / (sync - swap): the transport alone. Prints a table; never asserts.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlhf_cluster.weight_adopt import adopt_into, copy_into  # noqa: E402
from rlhf_cluster.weight_transport import ReceiverEnd, SenderEnd  # noqa: E402

HIDDEN, FFN = 4096, 11008
REPEATS, WARMUP, MEMCPY_REPEATS = 3, 2, 5


def shapes(million_params: int) -> dict[str, tuple[int, int]]:
    out, total, layer = {}, 0, 0
    while total < million_params * 1_000_000:
        for name, shape in (("q", (HIDDEN, HIDDEN)), ("k", (HIDDEN, HIDDEN)), ("v", (HIDDEN, HIDDEN)),
                            ("o", (HIDDEN, HIDDEN)), ("up", (FFN, HIDDEN)), ("gate", (FFN, HIDDEN)),
                            ("down", (HIDDEN, FFN))):
            if total >= million_params * 1_000_000:
                break
            out[f"layers.{layer}.{name}.weight"] = shape
            total += shape[0] * shape[1]
        layer += 1
    return out


def make(shape_map: dict[str, tuple]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s).uniform_(-1, 1) for k, s in shape_map.items()}


@ray.remote(num_cpus=0.5)
class Sender:
    def __init__(self, shape_map):
        self.tensors = make(shape_map)
        self.end = SenderEnd()

    def address(self):
        return self.end.address()

    def connect(self, spec):
        self.end.connect(spec)

    def send(self, version):
        return self.end.send(version, iter(self.tensors.items()))["buckets"]

    def put(self):
        return [ray.put(self.tensors)]


@ray.remote(num_cpus=0.5)
class Receiver:
    def __init__(self, shape_map, adopt: bool):
        self.params = {k: torch.empty(s) for k, s in shape_map.items()}
        self.borrowed: set[str] = set()
        self.end = ReceiverEnd()
        self.adopt = adopt
        self.swap_s = 0.0

    def connect(self, spec):
        self.end.connect(spec)

    def update_weights(self, version, named_tensors):  # as HFEngine.update_weights: copied in
        t0 = time.perf_counter()
        copy_into(version, self.params, named_tensors, self.borrowed)
        self.swap_s = time.perf_counter() - t0
        return version

    def adopt_weights(self, version, named_tensors):  # as HFEngine.adopt_weights: no copy
        t0 = time.perf_counter()
        adopt_into(version, self.params, named_tensors, self.borrowed)
        self.swap_s = time.perf_counter() - t0

    def receive(self, version):
        self.end.receive(version, self.update_weights, self.adopt_weights if self.adopt else None)
        return self.swap_s

    def swap(self):
        return self.swap_s


def bench_transport(kind, shape_map, bucket_bytes, n) -> tuple[float, float, int]:
    """(median sync seconds, median swap seconds, buckets) over REPEATS after WARMUP warm-ups."""
    sender = Sender.remote(shape_map)
    receivers = [Receiver.remote(shape_map, adopt=kind == "shm") for _ in range(n)]
    times, swaps, buckets = [], [], 0
    if kind == "shm-copy":
        kind = "shm"
    if kind != "object-store":
        address = ray.get(sender.address.remote())
        port = address["shm_port" if kind == "shm" else "bcast_port"]
        group = {"host": address["host"], "port": port, "world_size": n + 1, "backend": "gloo",
                 "path": f"/dev/shm/rlhf-weights-bench-{port}"}
        common = {"meta": [(k, tuple(s), "torch.float32") for k, s in shape_map.items()],
                  "bucket_bytes": bucket_bytes, "timeout_s": 300}
        ray.get([sender.connect.remote({**common, kind: group})] +
                [r.connect.remote({**common, kind: group, "kind": kind, "rank": i + 1})
                 for i, r in enumerate(receivers)])
    for version in range(WARMUP + REPEATS):
        t0 = time.perf_counter()
        if kind == "object-store":
            ref = ray.get(sender.put.remote())[0]
            ray.get([r.update_weights.remote(version, ref) for r in receivers])
            swap = max(ray.get([r.swap.remote() for r in receivers]))
            del ref
        else:
            done = [r.receive.remote(version) for r in receivers]
            buckets = ray.get(sender.send.remote(version))
            swap = max(ray.get(done))
        times.append(time.perf_counter() - t0)
        swaps.append(swap)
    for actor in [sender, *receivers]:
        ray.kill(actor)
    return statistics.median(times[WARMUP:]), statistics.median(swaps[WARMUP:]), buckets


def bench_memcpy(shape_map) -> float:
    src = make(shape_map)
    dst = {k: torch.empty_like(v) for k, v in src.items()}
    times = []
    for _ in range(1 + MEMCPY_REPEATS):
        t0 = time.perf_counter()
        for k, v in src.items():
            dst[k].copy_(v)
        times.append(time.perf_counter() - t0)
    del src, dst
    return min(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="100,500", help="millions of parameters")
    parser.add_argument("--bucket-mb", type=float, default=256)
    parser.add_argument("--receivers", type=int, default=1)
    parser.add_argument("--paths", default="shm,shm-copy,broadcast,object-store")
    args = parser.parse_args()
    bucket_bytes = int(args.bucket_mb * 2**20)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    print(f"{args.receivers} receiver(s), buckets of {args.bucket_mb:g} MB, "
          f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}")
    print(f"{'params':>8}{'GB':>7}  {'path':<13}{'GB/s':>7}{'memcpy GB/s':>13}{'ratio':>7}"
          f"{'xport ratio':>12}{'sync s':>8}{'swap s':>8}{'buckets':>9}")
    for size in (int(s) for s in args.sizes.split(",")):
        shape_map = shapes(size)
        params = sum(a * b for a, b in shape_map.values())
        nbytes = params * 4
        for path in args.paths.split(","):
            copy = bench_memcpy(shape_map)
            gc.collect()
            seconds, swap, buckets = bench_transport(path, shape_map, bucket_bytes, args.receivers)
            print(f"{params / 1e6:>7.0f}M{nbytes / 1e9:>7.2f}  {path:<13}{nbytes / seconds / 1e9:>7.2f}"
                  f"{nbytes / copy / 1e9:>13.2f}{copy / seconds:>7.2f}{copy / (seconds - swap):>12.2f}"
                  f"{seconds:>8.2f}{swap:>8.2f}{buckets or len(shape_map):>9}", flush=True)
            gc.collect()
            time.sleep(1)
    ray.shutdown()


if __name__ == "__main__":
    main()
