"""The engine interface every rollout backend implements (HF `generate` on CPU, vLLM on GPU).

Token-in, token-out: a request carries prompt token ids (already rendered by the model
adapter, audio placeholders expanded) and a result carries the exact sampled ids with the
engine's own logprob for each. Nothing here ever sees text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class SamplingParams:
    n: int = 1
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    greedy: bool = False
    stop_token_ids: list[int] = field(default_factory=list)
    # Input-only tokens (audio placeholders, chat openers) the policy must never emit: a sampled
    # <|AUDIO|> would corrupt the next forward pass. The learner masks the same ids.
    suppress_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None


@dataclass
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    # Model-specific extra inputs for this prompt (e.g. Qwen2-Audio `input_features` of shape
    # [clips, mels, frames] and `feature_attention_mask` [clips, frames]); clips are in the order
    # their placeholders appear in `prompt_ids`.
    audio: dict[str, torch.Tensor] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class GenerationResult:
    request_id: str
    sample_index: int
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" | "length"
    weight_version: int


class Engine(Protocol):
    """What a `RolloutWorker` drives. Results come back grouped: for each request, `n` results
    in sample order, requests in the order given."""

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]: ...

    def update_weights(self, version: int, named_tensors: dict[str, torch.Tensor]) -> None: ...

    # Optional (`HFEngine` has it, vLLM does not): `adopt_weights(version, named_tensors)` takes
    # the tensors themselves as the parameters' storage instead of copying them; the caller
    # guarantees they stay valid and unchanged until the next adopt/update. The shm weight sync
    # uses it so a version is copied once (into the shared segment); same name checks as
    # `update_weights`, and a later `update_weights` must not write into adopted storage.

    # Optional: `shutdown()` releases what would outlive the process if it were killed outright
    # (vLLM's shared-memory queues in /dev/shm); called before a rollout worker is killed.

    def named_tensors(self) -> dict[str, torch.Tensor]: ...

    @property
    def weight_version(self) -> int: ...
