"""Model adapters: how a conversation becomes prompt token ids (+ audio inputs) for one family.

The adapter tokenizes each *text* segment on its own and splices placeholder ids for audio, so
prompts are built from ids, never by re-tokenizing generated text. Each audio clip becomes
`<|audio_bos|>` + one `<|AUDIO|>` per encoder output frame + `<|audio_eos|>`, exactly the count
the Qwen2-Audio encoder produces for that clip.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from rlhf_cluster.audio import features_for_clips, num_audio_tokens
from rlhf_cluster.tiny_model import AUDIO_BOS, AUDIO_EOS, AUDIO_TOKEN, AUDIO_MAX_FRAMES, IM_END, IM_START


class ChatAdapter:
    """ChatML rendering (`<|im_start|>role ... <|im_end|>`), shared by Qwen2-Audio and most LMs."""

    supports_audio = False

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.im_start = tokenizer.convert_tokens_to_ids(IM_START)
        self.im_end = tokenizer.convert_tokens_to_ids(IM_END)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.im_end
        self.stop_token_ids = sorted({self.im_end, tokenizer.eos_token_id} - {None})
        self.suppress_token_ids = sorted({self.im_start, self.pad_id} - set(self.stop_token_ids))

    def text_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def render_prompt(self, system: str | None, turns: list) -> tuple[list[int], list[torch.Tensor]]:
        """Token ids for system + turns + the assistant header, and the audio clips in order."""
        ids: list[int] = []
        clips: list[torch.Tensor] = []
        if system:
            ids += [self.im_start] + self.text_ids(f"system\n{system}") + [self.im_end] + self.text_ids("\n")
        for turn in turns:
            ids += [self.im_start] + self.text_ids(f"{turn.role}\n")
            if turn.audio is not None:
                if not self.supports_audio:
                    raise ValueError("this model adapter has no audio input; use an audio LM")
                ids += self.audio_placeholder(turn.audio)
                clips.append(turn.audio)
            if turn.text:
                ids += self.text_ids(turn.text)
            ids += [self.im_end] + self.text_ids("\n")
        ids += [self.im_start] + self.text_ids("assistant\n")
        return ids, clips

    def audio_placeholder(self, wave: torch.Tensor) -> list[int]:
        raise NotImplementedError

    def audio_inputs(self, clips: list[torch.Tensor]) -> dict[str, torch.Tensor] | None:
        return None

    def decode(self, token_ids: list[int]) -> str:
        """Reply text for reward services; stop and pad tokens removed, markers like <think> kept."""
        ids = [t for t in token_ids if t not in self.stop_token_ids and t != self.pad_id]
        return self.tokenizer.decode(ids, skip_special_tokens=False).strip()


class Qwen2AudioAdapter(ChatAdapter):
    supports_audio = True

    def __init__(self, tokenizer: Any, max_frames: int = AUDIO_MAX_FRAMES):
        super().__init__(tokenizer)
        self.max_frames = max_frames
        self.audio_bos, self.audio_token, self.audio_eos = tokenizer.convert_tokens_to_ids(
            [AUDIO_BOS, AUDIO_TOKEN, AUDIO_EOS])
        self.suppress_token_ids = sorted(set(self.suppress_token_ids)
                                         | {self.audio_bos, self.audio_token, self.audio_eos})

    def audio_placeholder(self, wave: torch.Tensor) -> list[int]:
        frames = min(int(wave.shape[-1]) // 160 + 1, self.max_frames)
        return [self.audio_bos] + [self.audio_token] * num_audio_tokens(frames) + [self.audio_eos]

    def audio_inputs(self, clips: list[torch.Tensor]) -> dict[str, torch.Tensor] | None:
        if not clips:
            return None
        feats, mask = features_for_clips(clips, max_frames=self.max_frames)
        return {"input_features": feats, "feature_attention_mask": mask}


def make_adapter(name: str, model_path: str, tokenizer: Any) -> ChatAdapter:
    """Pick the adapter from config (`model.adapter`), or from the model's `model_type` on auto."""
    config = json.loads((Path(model_path) / "config.json").read_text())
    if name == "auto":
        name = "qwen2_audio" if config.get("model_type") == "qwen2_audio" else "causal_lm"
    if name == "qwen2_audio":
        frames = 2 * config.get("audio_config", {}).get("max_source_positions", 1500)
        return Qwen2AudioAdapter(tokenizer, max_frames=frames)
    return ChatAdapter(tokenizer)
