"""Advantages and the PPO/GRPO policy loss: pure torch, shared by every learner rank and unit-tested alone.

Losses are written as *sums* over this rank's tokens divided by a normaliser, so that a batch split
across ranks and micro-batches can be normalised by the global token (or row) count and the summed
gradients equal those of one pass over the whole batch.
"""

from __future__ import annotations

import torch
from torch import Tensor


def group_advantages(rewards: Tensor, group_size: int, std_norm: bool = True,
                     eps: float = 1e-6) -> Tensor:
    """GRPO advantages: rewards laid out group after group (`group_size` samples of one prompt)."""
    if rewards.numel() % group_size != 0:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    groups = rewards.float().view(-1, group_size)
    adv = groups - groups.mean(dim=1, keepdim=True)
    if std_norm:
        adv = adv / (groups.std(dim=1, unbiased=False, keepdim=True) + eps)
    return adv.view(-1)


def token_logprobs(logits: Tensor, input_ids: Tensor) -> Tensor:
    """log p(input_ids[:, t] | < t) from logits[:, t - 1], in float32; position 0 is 0.

    Rows are done one at a time so only one row of float32 logits exists at once (bf16 logits
    of a large vocabulary would otherwise double in memory).
    """
    out = torch.zeros(input_ids.shape, dtype=torch.float32, device=logits.device)
    for b in range(input_ids.shape[0]):
        row = logits[b, :-1].float()
        picked = row.gather(-1, input_ids[b, 1:, None]).squeeze(-1)
        out[b, 1:] = picked - torch.logsumexp(row, dim=-1)
    return out


def k3_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(policy || ref): unbiased, always >= 0."""
    delta = ref_logprobs - logprobs
    return torch.exp(delta) - delta - 1


def policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, loss_mask: Tensor,
                clip_eps_low: float, clip_eps_high: float, loss_agg: str = "token_mean",
                kl_coef: float = 0.0, ref_logprobs: Tensor | None = None,
                num_tokens_global: float | None = None,
                num_rows_global: float | None = None,
                behaviour_logprobs: Tensor | None = None,
                tis_cap: float = 2.0) -> tuple[Tensor, dict[str, float]]:
    """PPO clipped surrogate (+ kl_coef * k3) aggregated over masked tokens.

    Plain PPO: `old_logprobs` are the engine's behaviour logprobs, so stale samples are
    corrected by the clipped ratio itself. Decoupled PPO (pass `behaviour_logprobs`):
    `old_logprobs` are the proximal policy's (recomputed by the learner before the update),
    the ratio is taken against them, and each token is weighted by the truncated importance
    weight min(exp(proximal - behaviour), tis_cap).

    token_mean: sum over masked tokens / (num_tokens_global or the local masked-token count).
    seq_mean: sum over rows of each row's masked-token mean / (num_rows_global or local rows).
    Metrics are local masked means (diagnostics, independent of the normaliser).
    """
    mask = loss_mask.float()
    on = mask > 0
    # Unmasked positions may hold anything (e.g. 0 or -inf behaviour logprobs): zero them first
    # so exp() cannot turn them into inf * 0 = nan.
    log_ratio = torch.where(on, logprobs - old_logprobs, torch.zeros_like(logprobs))
    ratio = torch.exp(log_ratio)
    surr = ratio * advantages
    surr_clipped = torch.clamp(ratio, 1 - clip_eps_low, 1 + clip_eps_high) * advantages
    pg_tok = -torch.minimum(surr, surr_clipped)
    is_weight = torch.ones_like(pg_tok)
    if behaviour_logprobs is not None:
        log_w = torch.where(on, old_logprobs - behaviour_logprobs, torch.zeros_like(logprobs))
        is_weight = torch.exp(log_w).clamp(max=tis_cap).detach()
        pg_tok = pg_tok * is_weight
    kl_tok = torch.zeros_like(pg_tok)
    if ref_logprobs is not None:
        kl_tok = k3_kl(logprobs, torch.where(on, ref_logprobs, logprobs))
    tok = pg_tok + kl_coef * kl_tok

    if loss_agg == "token_mean":
        denom = num_tokens_global if num_tokens_global is not None else mask.sum().clamp(min=1)
        loss = (tok * mask).sum() / denom
    elif loss_agg == "seq_mean":
        row_mean = (tok * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        denom = num_rows_global if num_rows_global is not None else row_mean.shape[0]
        loss = row_mean.sum() / denom
    else:
        raise ValueError(f"loss_agg={loss_agg!r}; expected 'token_mean' or 'seq_mean'")

    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        metrics = {
            "pg_loss": float((pg_tok * mask).sum() / n),
            "kl": float((kl_tok * mask).sum() / n),
            "clip_frac": float(((surr_clipped < surr).float() * mask).sum() / n),
            "ratio_mean": float((ratio * mask).sum() / n),
            "ratio_max": float(ratio[on].max()) if on.any() else 1.0,
            "is_weight_mean": float((is_weight * mask).sum() / n),
            "is_weight_max": float(is_weight[on].max()) if on.any() else 1.0,
        }
    return loss, metrics


def sft_loss(logprobs: Tensor, loss_mask: Tensor,
             num_tokens_global: float | None = None) -> tuple[Tensor, dict[str, float]]:
    """Token-mean negative log-likelihood of the masked (target reply) tokens: the warm start."""
    mask = loss_mask.float()
    denom = num_tokens_global if num_tokens_global is not None else mask.sum().clamp(min=1)
    nll_sum = -(logprobs * mask).sum()
    with torch.no_grad():
        nll = float(nll_sum / mask.sum().clamp(min=1))
    return nll_sum / denom, {"nll": nll}


def bradley_terry_loss(chosen: Tensor, rejected: Tensor,
                       num_pairs_global: float | None = None) -> tuple[Tensor, dict[str, float]]:
    """Reward-model loss: -log sigmoid(r_chosen - r_rejected), summed over this rank's pairs and
    divided by `num_pairs_global` (or the local pair count), so ranks add up to the global mean."""
    if chosen.shape != rejected.shape:
        raise ValueError(f"chosen {tuple(chosen.shape)} and rejected {tuple(rejected.shape)} scores differ in shape")
    margin = chosen.float() - rejected.float()
    loss_sum = -torch.nn.functional.logsigmoid(margin).sum()
    denom = num_pairs_global if num_pairs_global is not None else max(margin.numel(), 1)
    with torch.no_grad():
        n = max(margin.numel(), 1)
        metrics = {"bt_loss": float(loss_sum / n), "pair_accuracy": float((margin > 0).float().sum() / n),
                   "margin": float(margin.sum() / n)}
    return loss_sum / denom, metrics
