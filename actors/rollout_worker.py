"""`RolloutWorker`: a Ray actor that turns tasks into scored-ready episodes with its engine.

It owns one engine and one model adapter. The driver hands it tasks and sampling settings;
it renders prompts to token ids, generates `n` samples per prompt - single-turn, or whole
dialogues against an environment (`actors.dialogue`) - and returns `Episode`s carrying the
exact sampled ids, the engine's logprobs and the weight version(s) that made them.
"""

from __future__ import annotations

import os

import torch
from transformers import AutoTokenizer

from actors.call_batcher import CallBatcher
from actors.dialogue import DialogueLimits, DialogueRunner
from actors.engine import SamplingParams
from rlhf_cluster.adapters import make_adapter
from rlhf_cluster.data.tasks import Task
from rlhf_cluster.experience import Episode
from rlhf_cluster.weight_transport import ReceiverEnd, SwapGuard


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
                 simulated_token_latency_s: float = 0.0, dialogue: dict | None = None,
                 engine_options: dict | None = None):
        """`dialogue`: the config's `dialogue` section (environment, turn/token limits,
        keep_reasoning); None is single-turn QA. `engine_options`: engine-specific settings."""
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.index = index
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.adapter = make_adapter(adapter, model_path, self.tokenizer)
        self.engine = SwapGuard(make_engine(engine, model_path, dtype, self.adapter.pad_id, seed + 1000 * index,
                                            **(engine_options or {})))
        self.weight_receiver = ReceiverEnd()  # weight-sync transport end (rlhf_cluster.weight_sync)
        self.system_prompt = system_prompt
        self.simulated_token_latency_s = simulated_token_latency_s
        dialogue = dict(dialogue or {"env": "single_turn", "max_turns": 1})
        limits = DialogueLimits(**{k: dialogue.pop(k) for k in list(dialogue)
                                   if k in DialogueLimits.__dataclass_fields__})
        self.dialogue = DialogueRunner(self.engine, self.adapter, system_prompt, dialogue, limits,
                                       seed=seed, simulated_token_latency_s=simulated_token_latency_s)
        self._batcher = CallBatcher(self._rollout_many, key=lambda call: tuple(sorted(call[1].items())))

    def ready(self) -> int:
        return self.index

    def pad_token_id(self) -> int:
        return self.adapter.pad_id

    def weight_version(self) -> int:
        return self.engine.weight_version

    def update_weights(self, version: int, named_tensors: dict[str, torch.Tensor]) -> int:
        self.engine.update_weights(version, named_tensors)
        return self.engine.weight_version

    def named_tensors(self) -> dict[str, torch.Tensor]:
        return self.engine.named_tensors()

    def shutdown(self) -> None:
        """Shut the engine down before this actor is killed (`rlhf_cluster.cluster.stop_actors`)."""
        self.engine.shutdown()

    # ---- weight-sync receiver (driven by rlhf_cluster.weight_sync.WeightSync) ---------------

    def sync_node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def sync_connect(self, spec: dict) -> int:
        self.weight_receiver.connect(spec)
        return self.index

    def sync_receive(self, version: int) -> int:
        """Receive `version` through the group, swap it in (adopted on shm when the engine can);
        returns the version now served."""
        adopt = self.engine.adopt_weights if self.engine.can_adopt else None
        self.weight_receiver.receive(version, self.update_weights, adopt)
        return self.engine.weight_version

    def sync_close(self) -> None:
        self.weight_receiver.close()

    def rollout(self, tasks: list[Task], sampling: dict, step: int) -> list[Episode]:
        """`n` episodes per task, tasks in order, samples in order. Calls that arrive while the
        engine is busy are generated together in the next engine run (`CallBatcher`)."""
        return self._batcher((tasks, sampling, step))

    def merged_runs(self) -> dict[str, int]:
        """How many engine runs served how many rollout calls (calls - runs were merged)."""
        return {"runs": self._batcher.runs, "calls": self._batcher.calls}

    def _rollout_many(self, calls: list[tuple[list[Task], dict, int]]) -> list[list[Episode]]:
        params = SamplingParams(**calls[0][1], stop_token_ids=self.adapter.stop_token_ids,
                                suppress_token_ids=self.adapter.suppress_token_ids)
        batches = self.dialogue.run_many([(tasks, step) for tasks, _, step in calls], params)
        for episode in (e for batch in batches for e in batch):
            episode.worker = self.index
        return batches
