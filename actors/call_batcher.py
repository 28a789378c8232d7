"""Merge the rollout calls that queue up while the engine is busy into one engine run.

A decoding step on a GPU costs about the same for 64 sequences as for 128 (decode is
memory-bound), and vLLM batches whatever requests it holds. So when several rollout batches
wait on a worker (async mode keeps `1 + rl.max_buffered_batches` in flight), generating them
together is nearly free throughput, while in sync mode only one batch ever exists. This is
continuous batching at the granularity of rollout calls.

`CallBatcher(run_many, key)`: each caller thread calls `batcher(item)`; one of them (the
leader) runs `run_many([items...])` on every waiting item with the same `key(item)` and hands
each caller its own result (or the run's exception). Calls with another key wait for the next
run. Needs concurrent callers: a threaded Ray actor (`max_concurrency > 1`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any


@dataclass
class _Call:
    item: Any
    done: bool = False
    result: Any = None
    error: BaseException | None = None


class CallBatcher:
    def __init__(self, run_many: Callable[[list], list], key: Callable[[Any], Hashable]):
        self._run_many, self._key = run_many, key
        self._cv = threading.Condition()
        self._pending: list[_Call] = []
        self._busy = False
        self.runs = self.calls = 0  # calls - runs were merged into another call's run

    def __call__(self, item: Any) -> Any:
        call = _Call(item)
        with self._cv:
            self._pending.append(call)
            while self._busy and not call.done:
                self._cv.wait()
            if not call.done:  # the engine is free: lead a run of every waiting call like ours
                key = self._key(item)
                batch = [c for c in self._pending if self._key(c.item) == key]
                self._pending = [c for c in self._pending if self._key(c.item) != key]
                self._busy = True
                self.runs += 1
                self.calls += len(batch)
        if not call.done:
            try:
                results = self._run_many([c.item for c in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"CallBatcher: {len(results)} results for {len(batch)} calls")
                for c, r in zip(batch, results):
                    c.result = r
            except BaseException as exc:  # noqa: BLE001 - every merged caller sees it
                for c in batch:
                    c.error = exc
            finally:
                with self._cv:
                    for c in batch:
                        c.done = True
                    self._busy = False
                    self._cv.notify_all()
        if call.error is not None:
            raise call.error
        return call.result
