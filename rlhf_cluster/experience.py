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
    # Multi-turn (a single-turn episode has one of each). `token_ids` is the whole dialogue with
    # every assistant turn's exact sampled ids, reasoning included; `turn_spans` locate them.
    turn_spans: list[tuple[int, int]] = field(default_factory=list)
    turn_versions: list[int] = field(default_factory=list)  # policy version per assistant turn
    turn_texts: list[str] = field(default_factory=list)  # decoded reply per turn (reasoning kept)
    env_turn_rewards: list[float | None] = field(default_factory=list)  # environment's turn_reward
    turn_rewards: list[dict[str, float]] = field(default_factory=list)  # per-turn components
    # Ranges of `token_ids` (earlier turns' reasoning) the engine did NOT see when it sampled
    # later turns; non-empty -> one training row per assistant turn (see `training_rows`).
    context_drops: list[tuple[int, int]] = field(default_factory=list)
    turn_clips: list[int] = field(default_factory=list)  # audio clips in each turn's context
    dialogue: list[dict[str, str]] = field(default_factory=list)  # {"role", "text"} per turn
    worker: int = -1  # index of the rollout worker that generated it

    @property
    def num_response_tokens(self) -> int:
        return int(sum(self.loss_mask))

    def training_rows(self) -> list[tuple[list[int], list[int], list[float], int | None]]:
        """(token_ids, loss_mask, logprobs, clips or None for all) per learner row.

        Every row is exactly a context the engine saw plus the ids it sampled there. Without
        `context_drops` every turn's context is a prefix of `token_ids`, so the whole dialogue is
        one row with every assistant span in the mask. With them (earlier reasoning stripped from
        later contexts), turn k's row is `token_ids[:start_k]` minus the dropped ranges plus turn
        k's sampled ids, masked over turn k only: each sampled token is trained once, in the
        context it was sampled in."""
        if not self.context_drops:
            return [(self.token_ids, self.loss_mask, self.logprobs, None)]
        rows = []
        for k, (start, end) in enumerate(self.turn_spans):
            keep = [i for i in range(start)
                    if not any(a <= i < b for a, b in self.context_drops)]
            ids = [self.token_ids[i] for i in keep] + self.token_ids[start:end]
            rows.append((ids, [0] * len(keep) + self.loss_mask[start:end],
                         [0.0] * len(keep) + self.logprobs[start:end], self.turn_clips[k]))
        return rows

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
            "turn_spans": [list(s) for s in self.turn_spans], "turn_versions": self.turn_versions,
            "turn_texts": self.turn_texts, "env_turn_rewards": self.env_turn_rewards,
            "turn_rewards": [{k: float(v) for k, v in t.items()} for t in self.turn_rewards],
            "context_drops": [list(s) for s in self.context_drops],
            "dialogue": self.dialogue, "worker": self.worker,
        }


def collate(episodes: list[Episode], pad_token_id: int) -> TrainBatch:
    """Right-pad episodes' training rows (one, or one per assistant turn, see
    `Episode.training_rows`) into a TrainBatch; audio clips are concatenated in row order."""
    rows = [(ep, row) for ep in episodes for row in ep.training_rows()]
    width = max(len(ids) for _, (ids, *_rest) in rows)
    n = len(rows)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    loss_mask = torch.zeros((n, width))
    old_logprobs = torch.zeros((n, width))
    advantages = torch.zeros((n, width))
    clips: list[dict[str, torch.Tensor] | None] = []
    for b, (ep, (ids, mask, logprobs, num_clips)) in enumerate(rows):
        t = len(ids)
        input_ids[b, :t] = torch.tensor(ids)
        attention_mask[b, :t] = 1
        loss_mask[b, :t] = torch.tensor(mask, dtype=torch.float)
        old_logprobs[b, :t] = torch.tensor(logprobs)
        advantages[b, :t] = ep.advantage * loss_mask[b, :t]
        audio = ep.audio
        if audio and num_clips is not None:  # this turn's context holds only the first clips
            audio = {k: v[:num_clips] for k, v in audio.items()} if num_clips else None
        clips.append(audio)
    model_inputs: dict[str, torch.Tensor] = {}
    with_audio = [a for a in clips if a]
    if with_audio:
        for key in with_audio[0]:
            model_inputs[key] = torch.cat([a[key] for a in with_audio])
        model_inputs["clips_per_row"] = torch.tensor(
            [len(next(iter(a.values()))) if a else 0 for a in clips])
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
