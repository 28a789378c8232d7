"""Fans a batch out to every reward service, bounds the wait, and combines the components.

Failures are loud and local (ARCHITECTURE.md, invariant 6): a service that times out or dies
is retried, then either fails the run (`on_failure="fail"`) or drops the affected items with
reward None and an error text, counted in `counters` - never a hang, never a silent zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import RayError

ERROR_KEY = "__error__"  # a service's per-item failure marker (see VerifierService)
TURNS_KEY = "__turns__"  # per-turn components (aggregated by branch issue-5; not a component here)


class RewardServiceError(RuntimeError):
    pass


@dataclass
class ScoredItem:
    episode_id: str
    reward: float | None  # None: dropped, see `error`
    components: dict[str, float]  # every component any service produced for this item
    error: str | None = None


class RewardRouter:
    def __init__(self, services: dict[str, Any], weights: dict[str, float], timeout_s: float,
                 retries: int, on_failure: str = "drop"):
        if not services:
            raise ValueError("RewardRouter needs at least one reward service")
        if on_failure not in ("drop", "fail"):
            raise ValueError(f"on_failure={on_failure!r}; expected 'drop' or 'fail'")
        if timeout_s <= 0 or retries < 0:
            raise ValueError(f"need timeout_s > 0 and retries >= 0, got {timeout_s}, {retries}")
        self.services = dict(services)
        self.weights = dict(weights)
        self.timeout_s = timeout_s
        self.retries = retries
        self.on_failure = on_failure
        # events, not items: every timed-out or failed call attempt and every item error
        self.counters = {"timeouts": 0, "errors": 0, "dropped": 0}
        self._weights_checked = False

    def score(self, items: list[dict]) -> list[ScoredItem]:
        """Score `{"episode_id", "response", "task"}` items; one ScoredItem each, in order."""
        if not items:
            return []
        outputs, failures = self._call_services(items)
        if failures and self.on_failure == "fail":
            name, message = next(iter(failures.items()))
            raise RewardServiceError(f"reward service {name!r} failed: {message}")
        self._check_weights(outputs)
        return [self._combine(item["episode_id"], i, outputs, failures) for i, item in enumerate(items)]

    def _call_services(self, items: list[dict]) -> tuple[dict[str, list[dict]], dict[str, str]]:
        """All services at once, each attempt bounded by `timeout_s`; only the services that
        failed are retried. Returns per-service outputs and per-service failure messages."""
        outputs: dict[str, list[dict]] = {}
        failures: dict[str, str] = {}
        for attempt in range(1, self.retries + 2):
            refs = {self.services[name].score.remote(items): name
                    for name in self.services if name not in outputs}
            ready, not_ready = ray.wait(list(refs), num_returns=len(refs), timeout=self.timeout_s)
            for ref in not_ready:
                ray.cancel(ref)  # drops it if still queued, so retries do not pile up behind it
                self.counters["timeouts"] += 1
                failures[refs[ref]] = f"timed out after {self.timeout_s}s (attempt {attempt})"
            for ref in ready:
                name = refs[ref]
                try:
                    result = ray.get(ref)
                except RayError as exc:  # the actor died, or its score() raised
                    self.counters["errors"] += 1
                    failures[name] = f"{type(exc).__name__} (attempt {attempt}): {exc}"
                    continue
                if not isinstance(result, list) or len(result) != len(items):
                    self.counters["errors"] += 1
                    failures[name] = f"returned {type(result).__name__} instead of {len(items)} results"
                    continue
                outputs[name] = result
                failures.pop(name, None)
            if not failures:
                break
        return outputs, failures

    def _check_weights(self, outputs: dict[str, list[dict]]) -> None:
        """A weight naming no produced component is a config typo: fail on the first batch in
        which every service returned at least one clean item (before that, absence proves nothing)."""
        if self._weights_checked or len(outputs) < len(self.services):
            return
        per_service = [{key for row in rows if ERROR_KEY not in row for key in row if key != TURNS_KEY}
                       for rows in outputs.values()]
        if not all(per_service):
            return
        available = set().union(*per_service)
        for name in self.weights:
            if name not in available:
                raise ValueError(f"reward weight {name!r} names no component the services produce; "
                                 f"available: {sorted(available)}")
        self._weights_checked = True

    def _combine(self, episode_id: str, i: int, outputs: dict[str, list[dict]],
                 failures: dict[str, str]) -> ScoredItem:
        errors = [f"reward service {name!r}: {message}" for name, message in failures.items()]
        components: dict[str, float] = {}
        for name, rows in outputs.items():
            row = {k: v for k, v in rows[i].items() if k != TURNS_KEY}
            if ERROR_KEY in row:
                self.counters["errors"] += 1
                errors.append(f"reward service {name!r}: {row[ERROR_KEY]}")
                continue
            clash = components.keys() & row.keys()
            if clash:
                raise ValueError(f"reward component(s) {sorted(clash)} produced by more than one "
                                 f"service (again by {name!r}); rename one")
            components.update(row)
        missing = [name for name in self.weights if name not in components]
        if missing and not errors:
            self.counters["errors"] += 1
            errors.append(f"components {missing} missing for this episode")
        if errors and self.on_failure == "fail":
            raise RewardServiceError(f"episode {episode_id!r}: {errors[0]}")
        if errors:
            self.counters["dropped"] += 1
            return ScoredItem(episode_id, None, components, "; ".join(errors))
        reward = sum(weight * components[name] for name, weight in self.weights.items())
        return ScoredItem(episode_id, float(reward), components)
