"""The preference reward service: a trained Bradley-Terry reward model scoring episodes.

Run as a Ray actor (`reward-preference`) with its own resources. It scores the exact token ids
the policy sampled (token-in: nothing is re-tokenized) together with the user's audio inputs,
reading the score at each assistant turn's end token: `{component: last turn's score,
"__turns__": [{component: score_t}, ...]}`. Because it consumes the policy's token ids, the
reward model must share the policy's tokenizer; a mismatch is refused at start-up.
"""

from __future__ import annotations

import os

import torch

ERROR_KEY, TURNS_KEY = "__error__", "__turns__"  # as in reward_services.router


def turn_ends(item: dict) -> list[int]:
    """Position of each assistant turn's last token: from `turn_spans` [start, end), else the
    whole response (the loss-masked tokens) as one turn."""
    spans = item.get("turn_spans")
    if spans:
        return [int(end) - 1 for _, end in spans]
    mask = item.get("loss_mask") or []
    ones = [i for i, m in enumerate(mask) if m]
    if not ones:
        raise ValueError("no turn_spans and no policy tokens in loss_mask: nothing to score")
    return [ones[-1]]


def same_vocabulary(path_a: str, path_b: str) -> bool:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path_a).get_vocab() == AutoTokenizer.from_pretrained(path_b).get_vocab()


class PreferenceService:
    def __init__(self, path: str, component: str = "preference", batch_size: int = 16,
                 dtype: str = "float32", policy_path: str | None = None, pad_token_id: int = 0):
        from learners.reward_model import load_reward_model

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        if policy_path is not None and not same_vocabulary(path, policy_path):
            raise ValueError(
                f"reward model {path} does not share the policy's tokenizer ({policy_path}): it scores "
                "the policy's exact token ids, so train it from the policy's backbone/tokenizer "
                "(rm.init_path) or serve it behind the remote HTTP service, which sends text")
        self.model = load_reward_model(path, dtype).eval()
        self.component, self.batch_size, self.pad_token_id = component, int(batch_size), pad_token_id

    def score(self, items: list[dict]) -> list[dict]:
        out: list[dict | None] = [None] * len(items)
        ready = []
        for i, item in enumerate(items):
            try:
                if not item.get("token_ids"):
                    raise ValueError("the reward item has no token_ids")
                ends = turn_ends(item)
                if max(ends) >= len(item["token_ids"]) or min(ends) < 0:
                    raise ValueError(f"turn end {max(ends)} outside {len(item['token_ids'])} tokens")
                ready.append((i, ends))
            except (ValueError, TypeError) as exc:
                out[i] = {ERROR_KEY: f"preference RM, episode {item.get('episode_id')!r}: {exc}"}
        for start in range(0, len(ready), self.batch_size):
            chunk = ready[start:start + self.batch_size]
            scores = self._forward([items[i] for i, _ in chunk], [ends for _, ends in chunk])
            for (i, _), turn_scores in zip(chunk, scores):
                out[i] = {self.component: turn_scores[-1],
                          TURNS_KEY: [{self.component: s} for s in turn_scores]}
        return out

    @torch.no_grad()
    def _forward(self, batch: list[dict], ends: list[list[int]]) -> list[list[float]]:
        """One padded forward pass for a chunk of episodes; scores at their turn ends."""
        width = max(len(item["token_ids"]) for item in batch)
        ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros_like(ids)
        for b, item in enumerate(batch):
            ids[b, :len(item["token_ids"])] = torch.tensor(item["token_ids"])
            attention[b, :len(item["token_ids"])] = 1
        audio = [item["audio"] for item in batch if item.get("audio")]
        dtype = self.model.backbone.dtype
        inputs = {k: torch.cat([a[k] for a in audio]) for k in audio[0]} if audio else {}
        inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        values = self.model(ids, attention, **inputs)
        return [[float(values[b, t]) for t in row_ends] for b, row_ends in enumerate(ends)]
