"""Speech synthesizers that voice a simulated user's turns.

Interface: `speak(text, style) -> float32 mono 16 kHz tensor`. `style` carries what the user
policy decided beyond the words (e.g. `emotion`, and for the built-in task `syllables`). The
default is procedural and offline (the synthetic task's own generator); a real TTS model from a
local path implements the same method (load it in `__init__` from `path`, render `text` with
the requested style, resample to 16 kHz with `rlhf_cluster.audio`).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from rlhf_cluster.data.synthetic import EMOTIONS, synth_clip


class Synthesizer(Protocol):
    def speak(self, text: str, style: dict) -> torch.Tensor: ...


class ProceduralSynthesizer:
    """Speech-like audio whose syllable count and prosody follow `style` (CPU, no model)."""

    def __init__(self, seed: int = 0):
        self.seed = seed

    def speak(self, text: str, style: dict) -> torch.Tensor:
        emotion = style.get("emotion", "calm")
        if emotion not in EMOTIONS:
            raise ValueError(f"procedural synthesizer: emotion {emotion!r}; expected one of {EMOTIONS}")
        syllables = int(style.get("syllables") or max(1, min(3, len(text.split()))))
        rng = np.random.default_rng([self.seed, int(style.get("utterance", 0))])
        return torch.from_numpy(synth_clip(syllables, emotion, rng))


SYNTHESIZERS = ("procedural",)


def make_synthesizer(name: str, seed: int = 0) -> Synthesizer:
    if name == "procedural":
        return ProceduralSynthesizer(seed)
    raise ValueError(f"dialogue.synthesizer={name!r}; expected one of {list(SYNTHESIZERS)}")
