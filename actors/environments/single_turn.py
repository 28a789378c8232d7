"""Single-turn QA: the task's turns are the prompt, one reply ends the episode (the default)."""

from __future__ import annotations

from actors.environments.base import Observation, Reply
from rlhf_cluster.data.tasks import Task


class SingleTurnQA:
    def reset(self, task: Task) -> Observation:
        return list(task.turns)

    def step(self, reply: Reply) -> tuple[Observation | None, float | None, bool]:
        return None, None, True

    def info(self) -> dict:
        return {}
