"""Generation and scoring beside training: the driver's bounded experience queue.

Two driver threads keep the rollout workers busy while the main loop trains:
- the submitter queues rollout batches on the workers, at most `in_flight` batches that the
  main loop has not released yet (sync: 1, so the next batch starts only after the new
  weights are out; one_step_off: 2; async: 1 + rl.max_buffered_batches);
- the collector waits for each batch in order, scores it (reward services run while the
  learner trains) and puts it on the ready queue.
The main loop takes the next scored batch, checks staleness, trains, publishes the weights
and `release()`s one permit, which lets the submitter queue one more batch. Any failure on a
thread (a dead worker, a reward error) is re-raised by `next()` in the main loop.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable


class RolloutPipeline:
    def __init__(self, submit: Callable[[int], list], collect: Callable[[list, int], list],
                 score: Callable[[list], list], num_batches: int, in_flight: int):
        self._submit, self._collect, self._score = submit, collect, score
        self._num_batches = num_batches
        self._permits = threading.Semaphore(in_flight)
        self._submitted: queue.Queue = queue.Queue()
        self._ready: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._guard, args=(fn,), daemon=True, name=name)
                         for fn, name in ((self._submit_loop, "rollout-submit"),
                                          (self._collect_loop, "rollout-collect"))]
        for t in self._threads:
            t.start()

    def _guard(self, loop: Callable[[], None]) -> None:
        try:
            loop()
        except BaseException as exc:  # noqa: BLE001 - handed to the main loop by next()
            self._ready.put(exc)

    def _submit_loop(self) -> None:
        for batch_id in range(1, self._num_batches + 1):
            while not self._permits.acquire(timeout=0.1):
                if self._stop.is_set():
                    return
            if self._stop.is_set():
                return
            self._submitted.put((batch_id, self._submit(batch_id)))

    def _collect_loop(self) -> None:
        for _ in range(self._num_batches):
            while True:
                try:
                    batch_id, refs = self._submitted.get(timeout=0.1)
                    break
                except queue.Empty:
                    if self._stop.is_set():
                        return
            episodes = self._collect(refs, batch_id)
            t0 = time.perf_counter()
            scored = self._score(episodes)
            self._ready.put((batch_id, episodes, scored, time.perf_counter() - t0))

    def next(self) -> tuple[int, list, list, float]:
        """(batch id, episodes, scored episodes, seconds spent scoring) of the oldest batch."""
        item = self._ready.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def release(self) -> None:
        """One trained batch is done: the submitter may queue one more."""
        self._permits.release()

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
