"""`RolloutWorker`: a Ray actor that turns tasks into scored-ready episodes with its engine.

It owns one engine and one model adapter. The driver hands it tasks and sampling settings;
it renders prompts to token ids, generates `n` samples per prompt and returns `Episode`s
carrying the exact sampled ids, the engine's logprobs and the weight version that made them.
"""

from __future__ import annotations

import os
import time

import torch
from transformers import AutoTokenizer

from actors.engine import GenerationRequest, SamplingParams
from rlhf_cluster.adapters import make_adapter
from rlhf_cluster.data.tasks import Task
from rlhf_cluster.experience import Episode


def make_engine(kind: str, model_path: str, dtype: str, pad_token_id: int, seed: int, **kwargs):
    if kind == "hf":
        from actors.hf_engine import HFEngine

        return HFEngine(model_path, dtype=dtype, pad_token_id=pad_token_id, seed=seed)
    if kind == "vllm":
        try:
            from actors.vllm_engine import VLLMEngine
        except ImportError as exc:
            raise ValueError(f"rollout.engine='vllm' needs vLLM in the rollout workers' environment "
                             f"(pip install '.[vllm]', or .ci/vllm_env.sh on CPU): {exc}") from exc
        return VLLMEngine(model_path, dtype=dtype, pad_token_id=pad_token_id, seed=seed, **kwargs)
    raise ValueError(f"rollout.engine={kind!r} is not available in this build; expected 'hf' or 'vllm'")


class RolloutWorker:
    def __init__(self, index: int, model_path: str, adapter: str = "auto", dtype: str = "float32",
                 engine: str = "hf", system_prompt: str | None = None, seed: int = 0,
                 simulated_token_latency_s: float = 0.0, engine_options: dict | None = None):
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.index = index
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.adapter = make_adapter(adapter, model_path, self.tokenizer)
        self.engine = make_engine(engine, model_path, dtype, self.adapter.pad_id, seed + 1000 * index,
                                  **(engine_options or {}))
        self.system_prompt = system_prompt
        self.simulated_token_latency_s = simulated_token_latency_s

    def ready(self) -> int:
        return self.index

    def pad_token_id(self) -> int:
        return self.adapter.pad_id

    def weight_version(self) -> int:
        return self.engine.weight_version

    def update_weights(self, version: int, named_tensors: dict[str, torch.Tensor]) -> int:
        self.engine.update_weights(version, named_tensors)
        return version

    def named_tensors(self) -> dict[str, torch.Tensor]:
        return self.engine.named_tensors()

    def rollout(self, tasks: list[Task], sampling: dict, step: int) -> list[Episode]:
        params = SamplingParams(**sampling, stop_token_ids=self.adapter.stop_token_ids,
                                suppress_token_ids=self.adapter.suppress_token_ids)
        requests, task_of = [], {}
        for task in tasks:
            prompt_ids, clips = self.adapter.render_prompt(self.system_prompt, task.turns)
            requests.append(GenerationRequest(request_id=task.prompt_id, prompt_ids=prompt_ids,
                                              audio=self.adapter.audio_inputs(clips), sampling=params))
            task_of[task.prompt_id] = task
        results = self.engine.generate(requests)
        if self.simulated_token_latency_s:  # benchmark stand-in for GPU decode time
            time.sleep(self.simulated_token_latency_s * max(len(r.token_ids) for r in results))
        request_of = {r.request_id: r for r in requests}
        episodes = []
        for res in results:
            req, task = request_of[res.request_id], task_of[res.request_id]
            n_prompt = len(req.prompt_ids)
            episodes.append(Episode(
                episode_id=f"s{step:06d}-{task.prompt_id}-{res.sample_index}",
                prompt_id=task.prompt_id, sample_index=res.sample_index,
                policy_version=res.weight_version,
                token_ids=req.prompt_ids + res.token_ids,
                loss_mask=[0] * n_prompt + [1] * len(res.token_ids),
                logprobs=[0.0] * n_prompt + res.logprobs,
                response_text=self.adapter.decode(res.token_ids), finish_reason=res.finish_reason,
                task={"answer": task.answer, "choices": task.choices, **task.meta},
                audio=req.audio))
        return episodes
