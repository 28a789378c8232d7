"""Methods mixed into every vLLM worker process (`worker_extension_cls`), called through
`LLM.collective_rpc`. They live in an importable module because vLLM spawns its workers.

Audio features and embeddings cross the RPC boundary as safetensors bytes (vLLM's RPC encoding
turns bare tensor arguments into nested lists); weights come as a file path."""

from __future__ import annotations

import torch
from safetensors.torch import load, save


def pack(tensors: dict[str, torch.Tensor]) -> bytes:
    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def unpack(blob: bytes) -> dict[str, torch.Tensor]:
    return load(bytes(blob))


class VLLMWorkerExtension:
    def load_hf_weights_file(self, path: str) -> int:
        """Copy the checkpoint-named weights of a safetensors file into the running model in place.

        The file is memory-mapped and streamed tensor by tensor. `reload_weights` goes through the
        model's own loader (fused qkv / gate_up, tensor-parallel sharding, the CPU backend's
        repacking), which calling `load_weights` directly skips."""
        from safetensors import safe_open

        with safe_open(path, framework="pt", device="cpu") as f:
            names = list(f.keys())
            self.model_runner.reload_weights(weights_iterator=((k, f.get_tensor(k)) for k in names))
        return len(names)

    @torch.inference_mode()
    def embed_audio(self, blob: bytes) -> bytes:
        """Audio encoder + projector of the served weights on the learner's exact features
        (`input_features`, `feature_attention_mask`): embeddings `0`, `1`, ... one per clip."""
        inputs = unpack(blob)
        model = self.model_runner.get_model()
        weight = next(model.audio_tower.parameters())
        # straight to the encoder: the input schema check insists on 30 s Whisper windows (3000
        # frames), which models with shorter encoders (the tiny one: 200) never receive
        embeds = model._process_audio_input({
            "type": "audio_features",
            "input_features": inputs["input_features"].to(weight.device, weight.dtype),
            "feature_attention_mask": inputs["feature_attention_mask"].to(weight.device)})
        return pack({str(i): e.to(torch.float32) for i, e in enumerate(embeds)})
