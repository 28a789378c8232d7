"""Step-Audio-2-style models: a text vocabulary plus a contiguous range of discrete speech
tokens; replies interleave text with speech spans `<tts_start> <audio_i>... <tts_end>` after
`<think>` reasoning. Audio input goes through the same Whisper-style encoder path as
Qwen2-Audio, so the tiny built-in model takes this shape with `family="step_audio"`.
"""

from __future__ import annotations

from typing import Any

from rlhf_cluster.adapters.chat import marked_spans
from rlhf_cluster.adapters.qwen2_audio import Qwen2AudioAdapter
from rlhf_cluster.tiny_model import TTS_END, TTS_START


class StepAudioAdapter(Qwen2AudioAdapter):
    def __init__(self, tokenizer: Any, speech_token_range: tuple[int, int], **kwargs):
        """`speech_token_range`: [first, end) ids of the discrete speech tokens."""
        super().__init__(tokenizer, **kwargs)
        self.speech_first, self.speech_end = speech_token_range
        self.tts_start, self.tts_end = self._special_id(TTS_START), self._special_id(TTS_END)
        if self.tts_start is None or self.tts_end is None:
            raise ValueError(f"step_audio adapter: the tokenizer lacks {TTS_START} / {TTS_END}")

    def _speech_spans(self, token_ids: list[int]) -> list[tuple[int, int]]:
        return marked_spans(token_ids, self.tts_start, self.tts_end)
