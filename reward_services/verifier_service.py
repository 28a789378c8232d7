"""Runs a configured set of verifiers over a batch; the driver wraps it as a Ray actor."""

from __future__ import annotations

from reward_services.verifiers import VERIFIERS


class VerifierService:
    def __init__(self, names: list[str]):
        """Unknown names fail here, at startup, rather than on the first batch."""
        if not names:
            raise ValueError(f"VerifierService needs at least one verifier; allowed: {sorted(VERIFIERS)}")
        for name in names:
            if name not in VERIFIERS:
                raise ValueError(f"unknown verifier {name!r}; allowed: {sorted(VERIFIERS)}")
        self.names = list(names)

    def score(self, items: list[dict]) -> list[dict[str, float]]:
        """One `{name: value}` per item, or `{"__error__": message}` for an item a verifier
        raised on, so the router can count and drop it instead of training on a fake 0."""
        return [self._score_one(item) for item in items]

    def _score_one(self, item: dict) -> dict[str, float]:
        values = {}
        for name in self.names:
            try:
                values[name] = float(VERIFIERS[name](item["response"], item["task"]))
            except Exception as exc:  # any verifier bug or bad row becomes a counted item error
                return {"__error__": f"verifier {name!r} failed on episode "
                                     f"{item.get('episode_id')!r}: {type(exc).__name__}: {exc}"}
        return values
