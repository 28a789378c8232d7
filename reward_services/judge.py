"""The rubric judge service: a generative model on an engine grades each episode against rubric items.

Run as a Ray actor (`reward-judge`). Rubric items come from the task (`task["rubric"]`, a list
of strings) or, for the whole dataset, from config. The prompt and the strict parser live in
rubric.py: output the parser cannot read is an `__error__` for that item (the router counts
and drops it) and is counted here in `counters["malformed"]` - never a crash, never a zero.
Components: `<component>` (mean verdict) and `<component>.<i>` per item (0-based).
"""

from __future__ import annotations

import os

import torch

from reward_services.rubric import build_judge_prompt, parse_verdicts

ERROR_KEY = "__error__"  # as in reward_services.router


def conversation_text(item: dict) -> str:
    """The dialogue as text (user transcripts and assistant replies), or the reply alone."""
    dialogue = item.get("dialogue") or [{"role": "assistant", "text": item.get("response", "")}]
    return "\n".join(f"{turn['role']}: {turn['text']}" for turn in dialogue)


class RubricJudgeService:
    def __init__(self, model_path: str, rubric: list[str] | None = None, component: str = "rubric",
                 max_new_tokens: int = 32, batch_size: int = 8, engine: str = "hf",
                 dtype: str = "float32", seed: int = 0, engine_obj=None):
        """`engine_obj`: an already built engine (tests); otherwise one is made from config."""
        from transformers import AutoTokenizer

        from actors.engine import SamplingParams
        from actors.rollout_worker import make_engine
        from rlhf_cluster.adapters import make_adapter

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.adapter = make_adapter("auto", model_path, AutoTokenizer.from_pretrained(model_path))
        self.engine = engine_obj or make_engine(engine, model_path, dtype, self.adapter.pad_id, seed)
        self.rubric = list(rubric or [])
        self.component, self.batch_size = component, int(batch_size)
        self.sampling = SamplingParams(n=1, max_new_tokens=max_new_tokens, greedy=True,
                                       stop_token_ids=self.adapter.stop_token_ids,
                                       suppress_token_ids=self.adapter.suppress_token_ids)
        self.counters = {"judged": 0, "malformed": 0, "no_rubric": 0}

    def score(self, items: list[dict]) -> list[dict]:
        from actors.engine import GenerationRequest
        from rlhf_cluster.data.tasks import Turn

        out: list[dict | None] = [None] * len(items)
        jobs = []
        for i, item in enumerate(items):
            rubric = (item.get("task") or {}).get("rubric") or self.rubric
            if not rubric:
                self.counters["no_rubric"] += 1
                out[i] = {ERROR_KEY: f"rubric judge, episode {item.get('episode_id')!r}: no rubric items "
                                     "(task['rubric'] or reward.services.judge.rubric)"}
                continue
            prompt = build_judge_prompt(list(rubric), conversation_text(item))
            ids, _ = self.adapter.render_prompt(None, [Turn(role="user", text=prompt)])
            jobs.append((i, list(rubric), GenerationRequest(request_id=str(i), prompt_ids=ids,
                                                            sampling=self.sampling)))
        for start in range(0, len(jobs), self.batch_size):
            chunk = jobs[start:start + self.batch_size]
            results = self.engine.generate([req for _, _, req in chunk])
            for (i, rubric, _), result in zip(chunk, results):
                out[i] = self._verdict(items[i], rubric, self.adapter.decode(result.token_ids))
        return out

    def _verdict(self, item: dict, rubric: list[str], text: str) -> dict:
        self.counters["judged"] += 1
        verdicts = parse_verdicts(text, rubric)
        if verdicts is None:
            self.counters["malformed"] += 1
            return {ERROR_KEY: f"rubric judge, episode {item.get('episode_id')!r}: malformed judge "
                               f"output {text[:200]!r} (expected one 'N. yes|no' line per item)"}
        return {(self.component + key[len("rubric"):]): value for key, value in verdicts.items()}

    def stats(self) -> dict[str, int]:
        return dict(self.counters)
