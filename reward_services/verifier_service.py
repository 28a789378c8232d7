"""Runs a configured set of verifiers over a batch; the driver wraps it as a Ray actor.

Turn-aware: an item whose task carries `turn_answers` (a multi-turn dialogue) is checked turn
by turn - assistant reply t (`item["turn_texts"][t]`) against `turn_answers[t]` - and gets
`__turns__` (one `{name: value}` per turn) plus the episode value = the mean over turns. A turn
the dialogue never reached (cut by a turn/token limit) scores 0, so stopping early never pays.
"""

from __future__ import annotations

import statistics

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

    def _score_one(self, item: dict) -> dict:
        task = item["task"]
        try:
            answers = task.get("turn_answers")
            if answers is None:
                return self._values(item["response"], task)
            if not answers:
                raise ValueError("task turn_answers is empty; expected one answer per user turn")
            texts = item.get("turn_texts") or [item["response"]]
            turns = [self._values(texts[t], {**task, "answer": str(a)}) if t < len(texts)
                     else {name: 0.0 for name in self.names} for t, a in enumerate(answers)]
            return {**{name: statistics.fmean(turn[name] for turn in turns) for name in self.names},
                    "__turns__": turns}
        except Exception as exc:  # any verifier bug or bad row becomes a counted item error
            return {"__error__": f"verifier failed on episode {item.get('episode_id')!r}: "
                                 f"{type(exc).__name__}: {exc}"}

    def _values(self, response: str, task: dict) -> dict[str, float]:
        values = {}
        for name in self.names:
            try:
                values[name] = float(VERIFIERS[name](response, task))
            except Exception as exc:
                raise type(exc)(f"verifier {name!r}: {exc}") from None
        return values
