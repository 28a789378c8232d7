"""Episodes (one sampled reply and everything known about it) and their way into a TrainBatch.

An episode keeps the exact token ids the engine produced with the engine's logprobs, the
policy version that produced them, and every reward component; `collate` turns episodes
into a right-padded `TrainBatch` without touching their tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from rlhf_cluster.batch import TrainBatch


@dataclass
class Episode:
    episode_id: str
    prompt_id: str
    sample_index: int
    policy_version: int
    token_ids: list[int]  # prompt + response, exactly as sampled
    loss_mask: list[int]  # 1 where the policy produced the token
    logprobs: list[float]  # behaviour logprob per token (0 where loss_mask is 0)
    response_text: str
    finish_reason: str
    task: dict[str, Any] = field(default_factory=dict)  # answer, choices, meta for rewards
    audio: dict[str, torch.Tensor] | None = None  # model inputs for the prompt's clips
    reward: float | None = None
    rewards: dict[str, float] = field(default_factory=dict)
    advantage: float = 0.0
    reward_error: str | None = None
    staleness: int | None = None  # learner version at train time minus policy_version
    dropped: str | None = None  # why it was not trained on ("reward_failed", "stale"), if so
    turn_rewards: list[dict[str, float]] = field(default_factory=list)  # per assistant turn (router)

    @property
    def num_response_tokens(self) -> int:
        return int(sum(self.loss_mask))

    def to_row(self, step: int) -> dict[str, Any]:
        """One Parquet row: everything but the audio tensors (those live in the dataset)."""
        return {
            "step": step, "episode_id": self.episode_id, "prompt_id": self.prompt_id,
            "sample_index": self.sample_index, "policy_version": self.policy_version,
            "reward": self.reward, "advantage": self.advantage,
            "rewards": {k: float(v) for k, v in self.rewards.items()},
            "reward_error": self.reward_error, "staleness": self.staleness,
            "trained": self.dropped is None, "dropped": self.dropped,
            "response_text": self.response_text,
            "finish_reason": self.finish_reason, "token_ids": self.token_ids,
            "loss_mask": self.loss_mask, "logprobs": self.logprobs,
            "turn_rewards": [{k: float(v) for k, v in t.items()} for t in self.turn_rewards],
        }


def collate(episodes: list[Episode], pad_token_id: int) -> TrainBatch:
    """Right-pad episodes into a TrainBatch; audio clips are concatenated in row order."""
    width = max(len(e.token_ids) for e in episodes)
    n = len(episodes)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    loss_mask = torch.zeros((n, width))
    old_logprobs = torch.zeros((n, width))
    advantages = torch.zeros((n, width))
    for b, ep in enumerate(episodes):
        t = len(ep.token_ids)
        input_ids[b, :t] = torch.tensor(ep.token_ids)
        attention_mask[b, :t] = 1
        loss_mask[b, :t] = torch.tensor(ep.loss_mask, dtype=torch.float)
        old_logprobs[b, :t] = torch.tensor(ep.logprobs)
        advantages[b, :t] = ep.advantage * loss_mask[b, :t]
    model_inputs: dict[str, torch.Tensor] = {}
    with_audio = [e.audio for e in episodes if e.audio]
    if with_audio:
        for key in with_audio[0]:
            model_inputs[key] = torch.cat([a[key] for a in with_audio])
        model_inputs["clips_per_row"] = torch.tensor(
            [len(next(iter(e.audio.values()))) if e.audio else 0 for e in episodes])
    return TrainBatch(input_ids=input_ids, attention_mask=attention_mask, loss_mask=loss_mask,
                      old_logprobs=old_logprobs, advantages=advantages, model_inputs=model_inputs)


def shard_episodes(episodes: list[Episode], num_shards: int) -> list[list[Episode]]:
    """Split whole episodes across learner ranks, balancing token counts (greedy, longest first)."""
    shards: list[list[Episode]] = [[] for _ in range(num_shards)]
    load = [0] * num_shards
    for ep in sorted(episodes, key=lambda e: -len(e.token_ids)):
        k = load.index(min(load))
        shards[k].append(ep)
        load[k] += len(ep.token_ids)
    return shards
