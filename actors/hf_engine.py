"""Hugging Face `generate` engine: the embedded CPU default behind the `Engine` interface.

Prompts are left-padded into one batch (each request repeated `n` times, its audio clips
repeated with it, in order). The logprob recorded for each sampled token is
`log_softmax(logits / temperature)` of the raw logits, which is what the learner recomputes.
"""

from __future__ import annotations

import torch

from actors.engine import GenerationRequest, GenerationResult
from rlhf_cluster.models import load_model
from rlhf_cluster.weight_adopt import adopt_into, copy_into


class HFEngine:
    def __init__(self, model_path: str, dtype: str = "float32", pad_token_id: int = 0, seed: int = 0):
        self.model = load_model(model_path, dtype).eval()
        self.pad_token_id = pad_token_id
        self._version = -1
        self._generator_seed = seed
        self._calls = 0
        self._borrowed: set[str] = set()  # parameters whose storage is adopted (shared), see weight_adopt

    @property
    def weight_version(self) -> int:
        return self._version

    @torch.no_grad()
    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        if not requests:
            return []
        sp = requests[0].sampling
        if any(r.sampling != sp for r in requests):
            raise ValueError("HFEngine.generate: all requests in one call must share sampling params")
        rows = [(r, i) for r in requests for i in range(sp.n)]
        width = max(len(r.prompt_ids) for r, _ in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for b, (r, _) in enumerate(rows):
            input_ids[b, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            attention_mask[b, width - len(r.prompt_ids):] = 1
        kwargs = self._audio_kwargs([r for r, _ in rows])
        torch.manual_seed(sp.seed if sp.seed is not None else self._generator_seed + self._calls)
        self._calls += 1
        out = self.model.generate(
            input_ids=input_ids, attention_mask=attention_mask, **kwargs,
            do_sample=not sp.greedy, temperature=sp.temperature if not sp.greedy else None,
            top_p=sp.top_p if not sp.greedy else None, top_k=0 if not sp.greedy else None,
            max_new_tokens=sp.max_new_tokens, eos_token_id=sp.stop_token_ids or None,
            suppress_tokens=sp.suppress_token_ids or None,
            pad_token_id=self.pad_token_id, output_logits=True, return_dict_in_generate=True)
        new_tokens = out.sequences[:, width:]
        temperature = 1.0 if sp.greedy else sp.temperature
        logits = torch.stack(out.logits, dim=1).float() / temperature  # [B, new, V]
        logits[..., sp.suppress_token_ids] = float("-inf")
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
        results = []
        stops = set(sp.stop_token_ids)
        for b, (r, i) in enumerate(rows):
            toks = new_tokens[b].tolist()
            end = next((k + 1 for k, t in enumerate(toks) if t in stops), None)
            finish = "stop" if end is not None else "length"
            end = end or len(toks)
            results.append(GenerationResult(
                request_id=r.request_id, sample_index=i, token_ids=toks[:end],
                logprobs=logprobs[b, :end].tolist(), finish_reason=finish,
                weight_version=self._version))
        return results

    @staticmethod
    def _audio_kwargs(requests: list[GenerationRequest]) -> dict[str, torch.Tensor]:
        with_audio = [r.audio for r in requests if r.audio]
        if not with_audio:
            return {}
        return {k: torch.cat([a[k] for a in with_audio]) for k in with_audio[0]}

    def update_weights(self, version: int, named_tensors: dict[str, torch.Tensor]) -> None:
        """In-place copy; every parameter must be covered, and no unknown name is accepted."""
        copy_into(version, dict(self.model.named_parameters()), named_tensors, self._borrowed)
        self._version = version

    def adopt_weights(self, version: int, named_tensors: dict[str, torch.Tensor]) -> None:
        """Serve these tensors as the parameters' storage (no copy) where shape and dtype match,
        copy the rest; the caller keeps them valid and unchanged until the next swap. Tied
        weights stay tied: `named_parameters` yields a shared parameter once."""
        adopt_into(version, dict(self.model.named_parameters()), named_tensors, self._borrowed)
        self._version = version

    def named_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.named_parameters()}
