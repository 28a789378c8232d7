"""Versioned weight push from the learner group to every rollout worker.

The learner's full weights are put into the Ray object store once per version and every
worker copies them in place; each worker answers with the version it now serves, and a
mismatch is an error (a worker silently serving old weights is the bug this guards against).
"""

from __future__ import annotations

import time

import ray
import torch


class WeightSync:
    def __init__(self, workers: list):
        self.workers = list(workers)
        self.version = -1
        self.last_bytes = 0
        self.last_seconds = 0.0

    def push(self, version: int, named_tensors: dict[str, torch.Tensor]) -> None:
        if version <= self.version:
            raise ValueError(f"weight versions must increase: got v{version} after v{self.version}")
        start = time.perf_counter()
        ref = ray.put(named_tensors)
        served = ray.get([w.update_weights.remote(version, ref) for w in self.workers])
        stale = [i for i, v in enumerate(served) if v != version]
        if stale:
            raise RuntimeError(f"weight sync v{version}: workers {stale} report versions "
                               f"{[served[i] for i in stale]}")
        self.version = version
        self.last_bytes = sum(t.numel() * t.element_size() for t in named_tensors.values())
        self.last_seconds = time.perf_counter() - start
