"""Elastic rollout workers: change how many workers generate while a job runs.

`rlhf-cluster scale N` (or `scale_rollout_workers`) sets a target in the job's `rollout-scale`
control actor. Between RL steps the driver's `Scaler` moves toward it:
- up: new rollout actors are created without blocking training (one waiting for a node with
  free resources just stays "starting"). Once ready, a worker joins the weight sync, which
  serves it the current version before it is given its first batch;
- down: the newest workers leave the weight sync and get no more batches; each is killed once
  the batches it already holds have been collected, so no episode is lost.
Membership changes and batch submission hold the same lock, so a batch only goes to members.
Every change is appended to `<run_dir>/scaling.jsonl`.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import ray

from rlhf_cluster.cluster import kill_actors, stop_actors

CONTROL_NAME = "rollout-scale"


class ScaleControl:
    """The named actor a client talks to: the wanted number of workers, and the driver's
    latest report of what runs."""

    def __init__(self, target: int, max_workers: int | None):
        self._target, self._max = target, max_workers
        self._status: dict[str, Any] = {}

    def set_target(self, n: int) -> int:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"rollout workers: expected an integer >= 1, got {n!r}")
        if self._max is not None and n > self._max:
            raise ValueError(f"rollout workers: {n} is above rollout.max_workers={self._max}")
        self._target = n
        return n

    def target(self) -> int:
        return self._target

    def report(self, status: dict[str, Any]) -> None:
        self._status = status

    def status(self) -> dict[str, Any]:
        return {**self._status, "target": self._target}


def scale_rollout_workers(n: int, namespace: str | None = None) -> dict[str, Any]:
    """Client side: set the running job's target; returns its status (workers now, target)."""
    try:
        control = ray.get_actor(CONTROL_NAME, namespace=namespace)
    except ValueError as exc:
        raise RuntimeError(f"no RL stage running in Ray namespace {namespace!r} (its {CONTROL_NAME!r} "
                           f"actor exists while the rl stage runs); check the job's --namespace") from exc
    try:
        ray.get(control.set_target.remote(n))
    except ray.exceptions.RayTaskError as exc:
        raise ValueError(str(exc.cause)) from None  # the control actor's own message, no traceback
    return ray.get(control.status.remote())


class Scaler:
    """Driver side; `apply()` runs on the main loop between steps, `submit()` on the
    pipeline's submitter thread."""

    def __init__(self, cfg: Any, actors: Any, run_dir: Path):
        self.cfg, self.actors = cfg, actors
        self.log_path = Path(run_dir) / "scaling.jsonl"
        self.lock = threading.Lock()
        self.control = ray.remote(ScaleControl).options(name=CONTROL_NAME, num_cpus=0).remote(
            cfg.rollout.num_workers, cfg.rollout.max_workers)
        self.next_index = len(actors.workers)
        self.starting: list[tuple[int, Any, Any]] = []  # (index, actor, ready ref)
        self.retiring: list[tuple[int, Any, int]] = []  # (index, actor, last batch it was given)
        self.last_submitted = 0
        self.index = {w: i for i, w in enumerate(actors.workers)}

    def submit(self, batch_id: int, submit_fn) -> list:
        """Queue one batch on the current members (never during a membership change)."""
        with self.lock:
            refs = submit_fn()
            self.last_submitted = batch_id
        return refs

    def apply(self, step: int, trained_batch: int) -> None:
        """Move toward the target: start, join, retire and kill workers as needed."""
        target = ray.get(self.control.target.remote(), timeout=30)
        self._join_ready(step)
        have = len(self.actors.workers) + len(self.starting)
        if target > have:
            self._start(step, target - have)
        elif target < have:
            self._shrink(step, have - target)
        for entry in [r for r in self.retiring if r[2] <= trained_batch]:  # its batches are collected
            self.retiring.remove(entry)
            stop_actors([entry[1]])
            self._event(step, "killed", entry[0])
        self.control.report.remote({"workers": len(self.actors.workers), "starting": len(self.starting),
                                    "retiring": len(self.retiring), "step": step,
                                    "version": self.actors.sync.version})

    def close(self) -> None:
        """At the run's end, stop what the scaler still owns: workers still starting or retiring
        and the control actor (members are the weight sync's, stopped with the run)."""
        stop_actors([a for _, a, _ in self.retiring])
        self._cancel(self.starting)
        kill_actors([self.control])

    def _start(self, step: int, count: int) -> None:
        from rlhf_cluster.driver import create_rollout_workers

        indices = list(range(self.next_index, self.next_index + count))
        self.next_index += count
        for i, actor in zip(indices, create_rollout_workers(self.cfg, indices)):
            self.starting.append((i, actor, actor.ready.remote()))
            self._event(step, "starting", i)

    def _join_ready(self, step: int) -> None:
        if not self.starting:
            return
        ready, _ = ray.wait([r for _, _, r in self.starting], num_returns=len(self.starting), timeout=0)
        for entry in [s for s in self.starting if s[2] in ready]:
            self.starting.remove(entry)
            index, actor, ref = entry
            try:
                ray.get(ref)
            except ray.exceptions.RayError as exc:
                self._event(step, "failed", index, error=str(exc)[:500])
                continue
            with self.lock:  # no batch reaches it before it serves the current version
                version = self.actors.sync.join(actor)
            self.index[actor] = index
            self._event(step, "joined", index, version=version)

    def _shrink(self, step: int, count: int) -> None:
        while count and self.starting:  # not serving yet: just cancel
            entry = self.starting.pop()
            self._cancel([entry])
            self._event(step, "cancelled", entry[0])
            count -= 1
        while count and len(self.actors.workers) > 1:
            with self.lock:
                actor = self.actors.workers[-1]
                self.actors.sync.leave(actor)
                last = self.last_submitted
            self.retiring.append((self.index[actor], actor, last))
            self._event(step, "left", self.index[actor], version=self.actors.sync.version)
            count -= 1

    @staticmethod
    def _cancel(starting: list[tuple[int, Any, Any]]) -> None:
        """Workers that never served: those already up have an engine to shut down (stop), the
        others may still wait for resources, so a shutdown call would only wait (kill)."""
        ready, _ = ray.wait([r for _, _, r in starting], num_returns=len(starting), timeout=0) \
            if starting else ([], [])
        stop_actors([a for _, a, r in starting if r in ready])
        kill_actors([a for _, a, r in starting if r not in ready])

    def _event(self, step: int, action: str, worker: int, **extra: Any) -> None:
        row = {"time": time.time(), "step": step, "action": action, "worker": worker, **extra}
        with self.log_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"[scale] step {step}: rollout worker {worker} {action}"
              + "".join(f" {k}={v}" for k, v in extra.items()), flush=True)
