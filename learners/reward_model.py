"""Bradley-Terry reward model: the audio-LM backbone plus a scalar head, trained and served here.

The backbone is the policy's own architecture (for the built-in model, Qwen2-Audio), run with
the user's `input_features`, so the score can depend on how the user sounded, not only on the
transcript. The head reads the last hidden state at a chosen position (the end token of an
assistant turn). A saved reward model is an ordinary Hugging Face directory of the backbone
(safetensors, tokenizer) plus `reward_head.safetensors` and `reward_model.json`, so the backbone
loads like any model and the whole thing loads with safetensors only.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rlhf_cluster.models import load_model

HEAD_FILE = "reward_head.safetensors"
META_FILE = "reward_model.json"


class RewardModel(nn.Module):
    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.get_text_config().hidden_size
        self.head = nn.Linear(hidden, 1)
        nn.init.normal_(self.head.weight, std=hidden ** -0.5)
        nn.init.zeros_(self.head.bias)
        out, inp = backbone.get_output_embeddings(), backbone.get_input_embeddings()
        if out is not None and out.weight is not inp.weight:
            out.requires_grad_(False)  # the LM head is unused: no gradient, no optimizer state

    @property
    def config(self):
        return self.backbone.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **model_inputs) -> torch.Tensor:
        """A score per position [B, T]; callers pick the positions they score (turn ends)."""
        model_inputs.pop("use_cache", None)
        hidden = self.backbone.model(input_ids=input_ids, attention_mask=attention_mask,
                                     use_cache=False, **model_inputs).last_hidden_state
        return self.head(hidden).squeeze(-1).float()

    def save_pretrained(self, out_dir, state_dict: dict | None = None, safe_serialization: bool = True,
                        **_) -> None:
        """Same signature as a HF model's, so `LearnerWorker.save` writes a reward model too."""
        state = self.state_dict() if state_dict is None else state_dict
        out = Path(out_dir)
        prefix = "backbone."
        self.backbone.save_pretrained(out, state_dict={k[len(prefix):]: v for k, v in state.items()
                                                       if k.startswith(prefix)},
                                      safe_serialization=True)
        save_file({"weight": state["head.weight"].contiguous(), "bias": state["head.bias"].contiguous()},
                  str(out / HEAD_FILE))
        (out / META_FILE).write_text(json.dumps(
            {"kind": "bradley_terry", "head": HEAD_FILE,
             "score_position": "end token of each assistant turn"}, indent=2))


def is_reward_model_dir(path) -> bool:
    return (Path(path) / HEAD_FILE).is_file() and (Path(path) / META_FILE).is_file()


def load_reward_model(path, dtype: str = "float32") -> RewardModel:
    """Backbone via `load_model` (safetensors only), head via `safetensors.torch.load_file`."""
    path = Path(path)
    if not is_reward_model_dir(path):
        raise FileNotFoundError(f"{path}: not a reward model directory; expected {HEAD_FILE} and "
                                f"{META_FILE} next to the backbone (written by the `rm` stage)")
    model = RewardModel(load_model(path, dtype))
    head = load_file(str(path / HEAD_FILE))
    with torch.no_grad():
        model.head.weight.copy_(head["weight"])
        model.head.bias.copy_(head["bias"])
    return model.to(model.backbone.dtype)


def end_positions(loss_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of a [B, T] mask (the position a row is scored at)."""
    t = torch.arange(loss_mask.shape[1], device=loss_mask.device)
    on = loss_mask > 0
    if not bool(on.any(dim=1).all()):
        raise ValueError("every row needs at least one scored position (a 1 in loss_mask)")
    return torch.where(on, t, -1).max(dim=1).values
