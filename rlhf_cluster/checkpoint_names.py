"""Parameter names as checkpoints on the Hub store them, which is what vLLM's loaders expect.

transformers 5 renames modules on load (`language_model.model.*` -> `model.language_model.*`)
and its save path does not always reverse that cleanly, so the names a learner's
`named_parameters()` yields are mapped back here, in one place, for every writer and reader
of checkpoint-named weights.
"""

from __future__ import annotations

# (runtime prefix, checkpoint prefix), first match wins; families not listed keep their names
HUB_PREFIXES: dict[str, tuple[tuple[str, str], ...]] = {
    "qwen2_audio": (("model.language_model.", "language_model.model."),
                    ("lm_head.", "language_model.lm_head."),
                    ("model.audio_tower.", "audio_tower."),
                    ("model.multi_modal_projector.", "multi_modal_projector.")),
}


def checkpoint_name(model_type: str | None, name: str) -> str:
    for runtime, stored in HUB_PREFIXES.get(model_type or "", ()):
        if name.startswith(runtime):
            return stored + name[len(runtime):]
    return name
