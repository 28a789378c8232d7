"""Simulated user: a user policy reads the assistant's last reply and decides the next user
turn; a synthesizer voices it.

The rule-based default (for the built-in syllable task) checks the reply's answer, reacts in
words ("thanks ." / "no .") and with its mood: its emotion shifts every turn - towards happy /
calm after a right answer, sad / angry after a wrong one - and it speaks a new clip with a new
syllable count. Its `turn_reward` is that check (1.0 right, 0.0 wrong). Another LM on its own
engine can be a user policy too: implement `first(task)` and `next(reply)`.
"""

from __future__ import annotations

import random
import zlib
from typing import Protocol

from actors.environments.base import Observation, Reply
from actors.environments.synthesizer import Synthesizer
from rlhf_cluster.data.synthetic import CHOICES, QUESTION
from rlhf_cluster.data.tasks import Task, Turn
from reward_services.verifiers import correct

MOOD_AFTER = {True: ("happy", "calm"), False: ("sad", "angry")}
REACTION = {True: "thanks . next :", False: "no . again please :"}


class UserPolicy(Protocol):
    def first(self, task: Task) -> None: ...

    def next(self, reply: Reply) -> tuple[str, dict, float | None] | None:
        """(text, style for the synthesizer, turn_reward) of the next user turn, or None to end."""
        ...

    def info(self) -> dict: ...


class RuleBasedUser:
    def __init__(self, seed: str | int):
        self.rng = random.Random(zlib.crc32(str(seed).encode()))
        self.answers: list[str] = []
        self.emotions: list[str] = []

    def first(self, task: Task) -> None:
        if task.answer is None or "emotion" not in task.meta:
            raise ValueError(f"task {task.prompt_id!r}: the rule-based user needs `answer` and "
                             "`emotion` (the built-in syllable task)")
        self.answers, self.emotions = [str(task.answer)], [str(task.meta["emotion"])]

    def next(self, reply: Reply) -> tuple[str, dict, float | None] | None:
        right = bool(correct(reply.text, {"answer": self.answers[-1], "choices": CHOICES}))
        moods = [m for m in MOOD_AFTER[right] if m != self.emotions[-1]]
        emotion = self.rng.choice(moods)
        k = self.rng.randint(1, 3)
        self.answers.append(str(k))
        self.emotions.append(emotion)
        style = {"emotion": emotion, "syllables": k, "utterance": self.rng.getrandbits(31)}
        return f"{REACTION[right]} {QUESTION}", style, float(right)

    def info(self) -> dict:
        return {"turn_answers": list(self.answers), "turn_emotions": list(self.emotions)}


class SimulatedUser:
    def __init__(self, policy: UserPolicy, synthesizer: Synthesizer):
        self.policy, self.synthesizer = policy, synthesizer
        self.replies = 0

    def reset(self, task: Task) -> Observation:
        self.policy.first(task)
        self.replies = 0
        return list(task.turns)

    def step(self, reply: Reply) -> tuple[Observation | None, float | None, bool]:
        self.replies += 1
        decided = self.policy.next(reply)
        if decided is None:
            return None, None, True
        text, style, reward = decided
        audio = self.synthesizer.speak(text, style)
        return [Turn(role="user", text=text, audio=audio, transcript=text)], reward, False

    def info(self) -> dict:
        """Per-turn fields for the turns that got a reply (a turn planned after the last
        reply, cut by the turn limit, is not part of the episode)."""
        return {k: v[:self.replies] for k, v in self.policy.info().items()}
