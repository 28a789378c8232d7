"""The training batch handed from the driver to each learner rank.

Positions are aligned with `input_ids`: `loss_mask[b, t] == 1` means token `t` of row `b` was
sampled by the policy, `old_logprobs[b, t]` is the behaviour (engine) logprob of that token and
`advantages[b, t]` its advantage. The learner predicts token `t` from logits at `t - 1`.
Audio clips in `model_inputs` are ordered exactly as their placeholders appear in the rows, so a
shard of rows always carries its own clips (never index audio by prompt id).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class TrainBatch:
    input_ids: torch.Tensor  # long [B, T], right-padded
    attention_mask: torch.Tensor  # long [B, T]
    loss_mask: torch.Tensor  # float [B, T]
    old_logprobs: torch.Tensor  # float [B, T]
    advantages: torch.Tensor  # float [B, T]
    model_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    ref_logprobs: torch.Tensor | None = None  # float [B, T]

    @property
    def num_rows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.loss_mask.sum().item())
