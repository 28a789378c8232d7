"""Versioned weight push from the learner group to every rollout worker.

The learner's full weights are put into the Ray object store once per version and every
worker copies them in place. Actor calls run in submission order, so a push queued behind a
worker's in-flight rollout takes effect right after it: generation pauses only for the swap.
Each worker answers with the version it now serves; a mismatch is an error (a worker silently
serving old weights is the bug this guards against). A worker that joins late receives the
current version before it is used.
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
        self._current = None  # object ref of the newest weights, for late joiners
        self._inflight: list[tuple[int, ray.ObjectRef]] = []

    def push(self, version: int, named_tensors: dict[str, torch.Tensor], wait: bool = True) -> None:
        """Send `version` to every worker; with wait=False return at once (checked later)."""
        if version <= self.version:
            raise ValueError(f"weight versions must increase: got v{version} after v{self.version}")
        start = time.perf_counter()
        self._current = ray.put(named_tensors)
        self._inflight += [(version, w.update_weights.remote(version, self._current)) for w in self.workers]
        self.version = version
        self.last_bytes = sum(t.numel() * t.element_size() for t in named_tensors.values())
        if wait:
            self.wait()
        self.last_seconds = time.perf_counter() - start

    def wait(self, timeout_s: float | None = None) -> None:
        """Block until every pushed version has been applied; raise on a wrong or failed swap."""
        refs = [ref for _, ref in self._inflight]
        served = ray.get(refs, timeout=timeout_s)
        wrong = [(v, s) for (v, _), s in zip(self._inflight, served) if v != s]
        self._inflight = []
        if wrong:
            raise RuntimeError(f"weight sync: workers served {[s for _, s in wrong]} "
                               f"instead of {[v for v, _ in wrong]}")

    def join(self, worker) -> int:
        """Bring a new worker to the current version before it generates; returns that version."""
        if self._current is not None:
            served = ray.get(worker.update_weights.remote(self.version, self._current))
            if served != self.version:
                raise RuntimeError(f"new worker serves v{served}, expected v{self.version}")
        self.workers.append(worker)
        return self.version
