"""Fans a batch out to every reward service, bounds the wait, and combines the components.

Failures are loud and local (ARCHITECTURE.md, invariant 6): a service that times out or dies
is retried, then either fails the run (`on_failure="fail"`) or drops the affected items with
reward None and an error text, counted in `counters` - never a hang, never a silent zero.

Per turn: a service may return `"__turns__": [{component: value}, ...]` (one dict per assistant
turn). The episode value of such a component is the discounted mean over turns,
sum_t d^t v_t / sum_t d^t (d = `turn_discount`; d = 1 is the plain mean, as the verifier's), and
each turn gets its own weighted reward; a single-turn episode is one turn. Components listed
in `normalize` are z-scored (over the batch, or with running statistics) before weighting;
the raw values stay recorded and the normalised ones are added as `<name>.normalized`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayError

ERROR_KEY = "__error__"  # a service's per-item failure marker (see VerifierService)
TURNS_KEY = "__turns__"  # a service's per-turn values
NORMALIZE = ("none", "batch_zscore", "running_zscore")


class RewardServiceError(RuntimeError):
    pass


@dataclass
class ScoredItem:
    episode_id: str
    reward: float | None  # None: dropped, see `error`
    components: dict[str, float]  # every component any service produced for this item
    error: str | None = None
    # one dict per assistant turn: that turn's components and its weighted "reward"
    turns: list[dict[str, float]] = field(default_factory=list)


@dataclass
class _Merged:
    components: dict[str, float]
    turn_values: dict[str, list[float]]  # components some service gave per turn
    num_turns: int
    errors: list[str]


class RunningStats:
    """Welford mean/variance of one component over every batch seen so far."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, values: list[float]) -> None:
        for v in values:
            self.n += 1
            delta = v - self.mean
            self.mean += delta / self.n
            self.m2 += delta * (v - self.mean)

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.n) if self.n else 0.0


def discounted_mean(values: list[float], discount: float) -> float:
    weights = [discount ** t for t in range(len(values))]
    return sum(w * v for w, v in zip(weights, values)) / sum(weights)


class RewardRouter:
    def __init__(self, services: dict[str, Any], weights: dict[str, float], timeout_s: float,
                 retries: int, on_failure: str = "drop", turn_discount: float = 1.0,
                 normalize: dict[str, str] | None = None,
                 service_timeouts: dict[str, float] | None = None,
                 service_retries: dict[str, int] | None = None):
        if not services:
            raise ValueError("RewardRouter needs at least one reward service")
        if on_failure not in ("drop", "fail"):
            raise ValueError(f"on_failure={on_failure!r}; expected 'drop' or 'fail'")
        if timeout_s <= 0 or retries < 0:
            raise ValueError(f"need timeout_s > 0 and retries >= 0, got {timeout_s}, {retries}")
        if not 0 < turn_discount <= 1:
            raise ValueError(f"turn_discount={turn_discount!r} must be in (0, 1]")
        normalize = {k: v for k, v in (normalize or {}).items() if v != "none"}
        for name, how in normalize.items():
            if how not in NORMALIZE:
                raise ValueError(f"normalize[{name!r}]={how!r}; expected one of {list(NORMALIZE)}")
        self.services = dict(services)
        self.weights = dict(weights)
        self.timeout_s = {name: float((service_timeouts or {}).get(name) or timeout_s) for name in services}
        self.retries = {name: int((service_retries or {}).get(name, retries)) for name in services}
        self.on_failure = on_failure
        self.turn_discount = turn_discount
        self.normalize = normalize
        self.running = {name: RunningStats() for name, how in normalize.items() if how == "running_zscore"}
        # events, not items: every timed-out or failed call attempt and every item error
        self.counters = {"timeouts": 0, "errors": 0, "dropped": 0}
        # the same events per service, for metrics ("which service is failing?")
        self.service_counters = {name: {"timeouts": 0, "errors": 0} for name in services}
        self._weights_checked = False

    def score(self, items: list[dict]) -> list[ScoredItem]:
        """Score reward items (see driver.score); one ScoredItem each, in order."""
        if not items:
            return []
        outputs, failures = self._call_services(items)
        if failures and self.on_failure == "fail":
            name, message = next(iter(failures.items()))
            raise RewardServiceError(f"reward service {name!r} failed: {message}")
        self._check_weights(outputs)
        merged = [self._merge(i, outputs, failures) for i in range(len(items))]
        stats = self._norm_stats([m for m in merged if not m.errors])
        return [self._combine(item["episode_id"], m, stats) for item, m in zip(items, merged)]

    def _count(self, name: str, kind: str) -> None:
        self.counters[kind] += 1
        self.service_counters[name][kind] += 1

    def _call_services(self, items: list[dict]) -> tuple[dict[str, list[dict]], dict[str, str]]:
        """All services at once, each attempt bounded by its own timeout; only the services
        that failed are retried (up to their own retry count). Returns per-service outputs
        and per-service failure messages."""
        outputs: dict[str, list[dict]] = {}
        failures: dict[str, str] = {}
        payload = ray.put(items)  # once, not once per service and attempt (items carry audio)
        attempt = 0
        while True:
            attempt += 1
            todo = [n for n in self.services if n not in outputs and attempt <= self.retries[n] + 1]
            if not todo:
                break
            start = time.monotonic()
            refs = {self.services[name].score.remote(payload): name for name in todo}
            pending = list(refs)
            while pending:
                now = time.monotonic()
                expired = [r for r in pending if now - start >= self.timeout_s[refs[r]]]
                for ref in expired:
                    ray.cancel(ref)  # drops it if still queued, so retries do not pile up behind it
                    pending.remove(ref)
                    self._count(refs[ref], "timeouts")
                    failures[refs[ref]] = f"timed out after {self.timeout_s[refs[ref]]}s (attempt {attempt})"
                if not pending:
                    break
                wait = min(self.timeout_s[refs[r]] for r in pending) - (time.monotonic() - start)
                ready, pending = ray.wait(pending, num_returns=1, timeout=max(wait, 0.0))
                for ref in ready:
                    name = refs[ref]
                    try:
                        result = ray.get(ref)
                    except RayError as exc:  # the actor died, or its score() raised
                        self._count(name, "errors")
                        failures[name] = f"{type(exc).__name__} (attempt {attempt}): {exc}"
                        continue
                    if not isinstance(result, list) or len(result) != len(items):
                        self._count(name, "errors")
                        failures[name] = f"returned {type(result).__name__} instead of {len(items)} results"
                        continue
                    outputs[name] = result
                    failures.pop(name, None)
            if not failures:
                break
        return outputs, failures

    @staticmethod
    def _keys(row: dict) -> set[str]:
        keys = {k for k in row if not k.startswith("__")}
        for turn in row.get(TURNS_KEY) or []:
            keys |= set(turn) if isinstance(turn, dict) else set()
        return keys

    def _check_weights(self, outputs: dict[str, list[dict]]) -> None:
        """A weight naming no produced component is a config typo: fail on the first batch in
        which every service returned at least one clean item (before that, absence proves nothing)."""
        if self._weights_checked or len(outputs) < len(self.services):
            return
        per_service = [set().union(*[self._keys(row) for row in rows if ERROR_KEY not in row])
                       for rows in outputs.values()]
        if not all(per_service):
            return
        available = set().union(*per_service)
        for name in list(self.weights) + list(self.normalize):
            if name not in available:
                raise ValueError(f"reward weight {name!r} names no component the services produce; "
                                 f"available: {sorted(available)}")
        self._weights_checked = True

    def _merge(self, i: int, outputs: dict[str, list[dict]], failures: dict[str, str]) -> _Merged:
        """One item's rows from every service: episode values, per-turn values, errors."""
        errors = [f"reward service {name!r}: {message}" for name, message in failures.items()]
        components: dict[str, float] = {}
        turn_values: dict[str, list[float]] = {}
        num_turns = None
        for name, rows in outputs.items():
            row = rows[i]
            if ERROR_KEY in row:
                self._count(name, "errors")
                errors.append(f"reward service {name!r}: {row[ERROR_KEY]}")
                continue
            turns = row.get(TURNS_KEY)
            row = {k: v for k, v in row.items() if k != TURNS_KEY}
            clash = (components.keys() | turn_values.keys()) & self._keys({**row, TURNS_KEY: turns})
            if clash:
                raise ValueError(f"reward component(s) {sorted(clash)} produced by more than one "
                                 f"service (again by {name!r}); rename one")
            bad = [k for k, v in row.items() if not _finite(v)]
            if turns is not None:
                if not isinstance(turns, list) or not turns or not all(isinstance(t, dict) for t in turns):
                    bad.append(TURNS_KEY)
                elif num_turns is not None and len(turns) != num_turns:
                    bad.append(f"{TURNS_KEY} ({len(turns)} turns, another service gave {num_turns})")
                else:
                    num_turns = len(turns)
                    names = set().union(*turns)
                    if any(set(t) != names for t in turns):
                        bad.append(f"{TURNS_KEY} (turns name different components)")
                    bad += [f"{TURNS_KEY}.{k}" for t in turns for k, v in t.items() if not _finite(v)]
                    if not bad:
                        for k in names:
                            turn_values[k] = [float(t[k]) for t in turns]
            if bad:
                self._count(name, "errors")
                errors.append(f"reward service {name!r}: non-numeric or non-finite values for {bad}")
                continue
            components.update({k: float(v) for k, v in row.items()})
        for k, values in turn_values.items():  # the router's episode value of a per-turn component
            components[k] = discounted_mean(values, self.turn_discount)
        missing = [name for name in self.weights if name not in components]
        if missing and not errors:
            self.counters["errors"] += 1
            errors.append(f"components {missing} missing for this episode")
        return _Merged(components, turn_values, num_turns or 1, errors)

    def _norm_stats(self, good: list[_Merged]) -> dict[str, tuple[float, float]]:
        """(mean, std) per normalised component, from this batch or the running statistics."""
        stats = {}
        for name, how in self.normalize.items():
            values = [m.components[name] for m in good if name in m.components]
            if how == "running_zscore":
                self.running[name].update(values)
                stats[name] = (self.running[name].mean, self.running[name].std)
            elif values:
                mean = sum(values) / len(values)
                stats[name] = (mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)))
        return stats

    def _combine(self, episode_id: str, m: _Merged, stats: dict[str, tuple[float, float]]) -> ScoredItem:
        if m.errors and self.on_failure == "fail":
            raise RewardServiceError(f"episode {episode_id!r}: {m.errors[0]}")
        if m.errors:
            self.counters["dropped"] += 1
            return ScoredItem(episode_id, None, m.components, "; ".join(m.errors))

        def norm(name: str, value: float) -> float:
            if name not in stats:
                return value
            mean, std = stats[name]
            return (value - mean) / (std + 1e-6)

        components = dict(m.components)
        for name in stats:
            components[f"{name}.normalized"] = norm(name, m.components[name])
        turns = []
        for t in range(m.num_turns):
            raw = {k: v[t] for k, v in m.turn_values.items()} if m.turn_values else dict(m.components)
            used = {k: raw.get(k, m.components[k]) for k in self.weights}
            turns.append({**raw, "reward": float(sum(w * norm(k, used[k]) for k, w in self.weights.items()))})
        reward = sum(weight * norm(name, m.components[name]) for name, weight in self.weights.items())
        return ScoredItem(episode_id, float(reward), components, None, turns)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
