"""Load a policy / reference model from a local Hugging Face directory.

One loader for the tiny built-in model and for real checkpoints: the class is picked from the
directory's `config.json` (`model_type`), so nothing downstream special-cases the tiny model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_class(path: str | Path):
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(
            f"model.path={path!s}: no config.json there; expected a Hugging Face model directory "
            "(build the tiny one with `rlhf-cluster make-tiny-model DIR`)"
        )
    model_type = json.loads(cfg_file.read_text()).get("model_type")
    import transformers

    if model_type == "qwen2_audio":
        return transformers.Qwen2AudioForConditionalGeneration
    return transformers.AutoModelForCausalLM


def load_model(path: str | Path, dtype: str = "float32") -> torch.nn.Module:
    """Weights come from safetensors only (`use_safetensors=True`): no pickle is ever loaded."""
    cls = model_class(path)
    model = cls.from_pretrained(str(path), dtype=DTYPES[dtype], use_safetensors=True)
    return model
