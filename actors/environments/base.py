"""The environment interface a multi-turn rollout drives.

`reset(task) -> observation` gives the turns that open the dialogue; after every assistant
turn `step(reply) -> (observation | None, turn_reward, done)` gives the next user turn(s), the
environment's own reward for that reply (None when it has no opinion; reward services score
the episode later either way), and whether the dialogue is over. An observation is a list of
`Turn`s (text and/or 16 kHz mono audio) the adapter renders to ids and appends to the exact
ids the engine already saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from rlhf_cluster.data.tasks import Task, Turn

Observation = list[Turn]


@dataclass
class Reply:
    """What the policy said in one assistant turn."""

    text: str  # decoded, reasoning included
    token_ids: list[int]
    finish_reason: str


class Environment(Protocol):
    def reset(self, task: Task) -> Observation: ...

    def step(self, reply: Reply) -> tuple[Observation | None, float | None, bool]: ...

    def info(self) -> dict:
        """Task fields the environment decided while running (e.g. `turn_answers` of a
        simulated user); merged into the episode's task for the reward services."""
        ...
