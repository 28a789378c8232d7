"""Model adapters, one module per family behind one interface (see `chat.ChatAdapter`):
`chat` (any plain Hugging Face causal LM, text-only), `qwen2_audio`, `step_audio`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rlhf_cluster.adapters.chat import ChatAdapter
from rlhf_cluster.adapters.qwen2_audio import Qwen2AudioAdapter
from rlhf_cluster.adapters.step_audio import StepAudioAdapter

ADAPTERS = ("auto", "qwen2_audio", "step_audio", "causal_lm")


def make_adapter(name: str, model_path: str, tokenizer: Any) -> ChatAdapter:
    """Pick the adapter from config (`model.adapter`), or on auto from the model's config:
    `speech_token_range` present -> step_audio, `model_type` qwen2_audio -> qwen2_audio."""
    config = json.loads((Path(model_path) / "config.json").read_text())
    if name == "auto":
        if config.get("speech_token_range"):
            name = "step_audio"
        else:
            name = "qwen2_audio" if config.get("model_type") == "qwen2_audio" else "causal_lm"
    frames = 2 * config.get("audio_config", {}).get("max_source_positions", 1500)
    if name == "step_audio":
        if not config.get("speech_token_range"):
            raise ValueError(f"model.adapter=step_audio but {model_path}/config.json has no "
                             "speech_token_range [first, end); expected a Step-Audio-style model")
        return StepAudioAdapter(tokenizer, tuple(config["speech_token_range"]), max_frames=frames)
    if name == "qwen2_audio":
        return Qwen2AudioAdapter(tokenizer, max_frames=frames)
    return ChatAdapter(tokenizer)


__all__ = ["ADAPTERS", "ChatAdapter", "Qwen2AudioAdapter", "StepAudioAdapter", "make_adapter"]
