"""Scripted replay: a dataset dialogue's user turns, in order, one segment per assistant turn.

Consecutive non-assistant turns (system, user) form one segment; the dataset's own assistant
turns are not replayed - the policy's replies take their place - so the dialogue has as many
assistant turns as the row has user segments (and `turn_answers`, when given, one per segment).
"""

from __future__ import annotations

from actors.environments.base import Observation, Reply
from rlhf_cluster.data.tasks import Task, Turn


def user_segments(turns: list[Turn]) -> list[list[Turn]]:
    segments: list[list[Turn]] = [[]]
    for turn in turns:
        if turn.role == "assistant":
            if segments[-1]:
                segments.append([])
        else:
            segments[-1].append(turn)
    return [s for s in segments if s]


class ScriptedReplay:
    def __init__(self):
        self._segments: list[list[Turn]] = []

    def reset(self, task: Task) -> Observation:
        self._segments = user_segments(task.turns)
        if not self._segments:
            raise ValueError(f"task {task.prompt_id!r}: no user turn to replay")
        return self._segments.pop(0)

    def step(self, reply: Reply) -> tuple[Observation | None, float | None, bool]:
        if not self._segments:
            return None, None, True
        return self._segments.pop(0), None, False

    def info(self) -> dict:
        return {}
