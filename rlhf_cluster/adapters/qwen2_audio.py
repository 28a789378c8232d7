"""Qwen2-Audio: Whisper-style encoder input, one `<|AUDIO|>` placeholder per encoder frame.

Each audio clip becomes `<|audio_bos|>` + one `<|AUDIO|>` per encoder output frame +
`<|audio_eos|>`, exactly the count the Qwen2-Audio encoder produces for that clip.
"""

from __future__ import annotations

from typing import Any

import torch

from rlhf_cluster.adapters.chat import ChatAdapter
from rlhf_cluster.audio import features_for_clips, num_audio_tokens
from rlhf_cluster.tiny_model import AUDIO_BOS, AUDIO_EOS, AUDIO_MAX_FRAMES, AUDIO_TOKEN


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
        """16 kHz mono clips (datasets resample any rate / channel count on load) -> 128-mel
        `input_features` [clips, 128, max_frames] + `feature_attention_mask`."""
        if not clips:
            return None
        feats, mask = features_for_clips(clips, max_frames=self.max_frames)
        return {"input_features": feats, "feature_attention_mask": mask}
