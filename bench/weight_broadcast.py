"""Weight-sync bandwidth: bucketed gloo broadcast (`weight_broadcast`) vs object-store push vs memcpy.

    python bench/weight_broadcast.py [--sizes 100,500] [--bucket-mib 256]

For transformer-shaped fp32 state dicts (hidden 4096: [4096,4096] attention and [11008,4096]
MLP matrices, layer after layer until ~N M parameters), times a full versioned sync to one
receiver actor that copies every tensor into preallocated parameters:
  broadcast    sender actor -> receiver actor over a dedicated gloo group, buckets of
               --bucket-mib; from send start until the receiver applied the last bucket
  object-store driver ray.put + receiver copies in place (`WeightSync.push`, wait=True)
and the single-process memcpy (dst.copy_(src) per tensor into preallocated tensors).
One warm-up, then the median of 3. Prints bytes/s and the ratio to memcpy; never asserts.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlhf_cluster.weight_broadcast import WeightReceiver, WeightSender, copy_into  # noqa: E402
from rlhf_cluster.weight_sync import WeightSync  # noqa: E402

HIDDEN, FFN = 4096, 11008
REPEATS = 3


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
        self.end = WeightSender()

    def address(self):
        return self.end.listen()

    def join(self, host, port, world_size):
        return self.end.join(host, port, 0, world_size, "gloo")

    def send(self, version, bucket_bytes):
        t0 = time.time()
        self.end.send(version, self.tensors, bucket_bytes)
        return t0, self.end.last_buckets


@ray.remote(num_cpus=0.5)
class Receiver:
    def __init__(self, shape_map):
        self.params = {k: torch.empty(s) for k, s in shape_map.items()}
        self.end = WeightReceiver()
        self.version = -1

    def join(self, host, port, rank, world_size):
        return self.end.join(host, port, rank, world_size, "gloo")

    def receive(self, version, meta, bucket_bytes):
        self.end.receive(version, meta, bucket_bytes, copy_into(self.params))
        return time.time()

    def update_weights(self, version, named_tensors):  # the object-store path (HFEngine-like)
        for name, tensor in named_tensors.items():
            self.params[name].copy_(tensor)
        self.version = version
        return version


def bench_broadcast(shape_map, bucket_bytes) -> tuple[float, int]:
    sender, receiver = Sender.remote(shape_map), Receiver.remote(shape_map)
    host, port = ray.get(sender.address.remote())
    ray.get([sender.join.remote(host, port, 2), receiver.join.remote(host, port, 1, 2)])
    meta = [(k, tuple(s), "torch.float32") for k, s in shape_map.items()]
    times, buckets = [], 0
    for version in range(REPEATS + 1):
        done = receiver.receive.remote(version, meta, bucket_bytes)
        t0, buckets = ray.get(sender.send.remote(version, bucket_bytes))
        times.append(ray.get(done) - t0)
    ray.kill(sender)
    ray.kill(receiver)
    return statistics.median(times[1:]), buckets


def bench_object_store(shape_map) -> float:
    tensors = make(shape_map)
    receiver = Receiver.remote(shape_map)
    sync = WeightSync([receiver])
    times = []
    for version in range(REPEATS + 1):
        t0 = time.perf_counter()
        sync.push(version, tensors)
        times.append(time.perf_counter() - t0)
    ray.kill(receiver)
    del sync, tensors
    return statistics.median(times[1:])


def bench_memcpy(shape_map) -> float:
    src = make(shape_map)
    dst = {k: torch.empty_like(v) for k, v in src.items()}
    times = []
    for _ in range(REPEATS + 1):
        t0 = time.perf_counter()
        for k, v in src.items():
            dst[k].copy_(v)
        times.append(time.perf_counter() - t0)
    del src, dst
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="100,500", help="millions of parameters")
    parser.add_argument("--bucket-mib", type=int, default=256)
    args = parser.parse_args()
    bucket_bytes = args.bucket_mib << 20
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    print(f"{'params':>8}{'GB':>7}  {'path':<13}{'GB/s':>8}{'memcpy GB/s':>13}{'ratio':>8}{'sync s':>8}{'buckets':>9}")
    for size in (int(s) for s in args.sizes.split(",")):
        shape_map = shapes(size)
        params = sum(a * b for a, b in shape_map.values())
        nbytes = params * 4
        copy = bench_memcpy(shape_map)
        gc.collect()
        bcast, buckets = bench_broadcast(shape_map, bucket_bytes)
        time.sleep(1)
        store = bench_object_store(shape_map)
        gc.collect()
        for path, seconds, nb in (("broadcast", bcast, buckets), ("object-store", store, len(shape_map))):
            print(f"{params / 1e6:>7.0f}M{nbytes / 1e9:>7.2f}  {path:<13}{nbytes / seconds / 1e9:>8.2f}"
                  f"{nbytes / copy / 1e9:>13.2f}{copy / seconds:>8.3f}{seconds:>8.2f}{nb:>9}", flush=True)
        time.sleep(1)
    ray.shutdown()


if __name__ == "__main__":
    main()
