"""Dialogue environments (see `base` for the interface) and the factory the rollout worker uses."""

from __future__ import annotations

from actors.environments.base import Environment, Observation, Reply
from actors.environments.scripted import ScriptedReplay
from actors.environments.simulated_user import RuleBasedUser, SimulatedUser
from actors.environments.single_turn import SingleTurnQA
from actors.environments.synthesizer import SYNTHESIZERS, make_synthesizer

ENVIRONMENTS = ("single_turn", "scripted", "simulated_user")
USER_POLICIES = ("rule_based",)


def make_environment(cfg: dict, episode_key: str, seed: int = 0) -> Environment:
    """A fresh environment for one episode; `episode_key` (prompt id + sample index) seeds the
    simulated user so every sample of a prompt meets its own user, reproducibly."""
    name = cfg.get("env", "single_turn")
    if name == "single_turn":
        return SingleTurnQA()
    if name == "scripted":
        return ScriptedReplay()
    if name == "simulated_user":
        if cfg.get("user_policy", "rule_based") != "rule_based":
            raise ValueError(f"dialogue.user_policy={cfg.get('user_policy')!r}; expected one of {list(USER_POLICIES)}")
        return SimulatedUser(RuleBasedUser(f"{seed}-{episode_key}"),
                             make_synthesizer(cfg.get("synthesizer", "procedural"), seed))
    raise ValueError(f"dialogue.env={name!r}; expected one of {list(ENVIRONMENTS)}")


__all__ = ["ENVIRONMENTS", "Environment", "Observation", "Reply", "SYNTHESIZERS", "USER_POLICIES",
           "make_environment"]
