"""Multi-turn rollouts: many concurrent dialogues per worker, token-in/token-out across turns.

Every live dialogue (all prompts x all n samples) advances one assistant turn per engine call,
so the engine always sees one batch. Turn 1 sends one request per prompt with n samples
(exactly the single-turn rollout); later turns send one request per live dialogue.

Two id sequences are kept per dialogue:
- `record`: the whole dialogue, every assistant turn's exact sampled ids (reasoning included),
  the closing/user/header ids between them rendered from ids by the adapter. It becomes
  `Episode.token_ids`; `turn_spans` locate the sampled ids (the loss mask is 1 exactly there).
- `context`: what the engine is given for the next turn: the same, except that earlier turns'
  `<think>...</think>` blocks are left out unless `keep_reasoning`. The ranges left out are
  recorded as `Episode.context_drops`, from which `Episode.training_rows` rebuilds, for every
  turn, exactly the context the engine sampled it in.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch

from actors.engine import GenerationRequest, GenerationResult, SamplingParams
from actors.environments import Reply, make_environment
from rlhf_cluster.data.tasks import Task
from rlhf_cluster.experience import Episode


@dataclass
class DialogueLimits:
    max_turns: int = 1  # assistant turns per dialogue
    max_total_tokens: int = 1024  # no turn starts whose context + max_new_tokens would exceed it
    keep_reasoning: bool = False  # keep earlier turns' <think> blocks in later contexts


@dataclass
class _Live:
    task: Task
    sample_index: int
    env: object
    record: list[int]
    context: list[int]
    clips: list[torch.Tensor]
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    env_rewards: list[float | None] = field(default_factory=list)
    drops: list[tuple[int, int]] = field(default_factory=list)
    turn_clips: list[int] = field(default_factory=list)
    dialogue: list[dict] = field(default_factory=list)
    finish_reason: str = "length"
    pos: int = 0  # the task's position in the (merged) run
    step: int = 0  # the rollout step its batch was queued for


def _user_text(turns) -> list[dict]:
    return [{"role": t.role, "text": t.text or t.transcript or ""} for t in turns if t.role == "user"]


def _request_id(pos: int, task: Task) -> str:
    return f"{pos}:{task.prompt_id}"


def _key(request_id: str, i: int) -> str:
    """One dialogue: the request id of its turn-1 request, then the sample index."""
    return f"{request_id}\x1f{i}"


class DialogueRunner:
    def __init__(self, engine, adapter, system_prompt: str | None, env_cfg: dict,
                 limits: DialogueLimits, seed: int = 0, simulated_token_latency_s: float = 0.0):
        self.engine, self.adapter, self.system_prompt = engine, adapter, system_prompt
        self.env_cfg, self.limits, self.seed = env_cfg, limits, seed
        self.simulated_token_latency_s = simulated_token_latency_s

    def run(self, tasks: list[Task], params: SamplingParams, step: int) -> list[Episode]:
        """`params.n` episodes per task, tasks in order, samples in order."""
        return self.run_many([(tasks, step)], params)[0]

    def run_many(self, batches: list[tuple[list[Task], int]], params: SamplingParams) -> list[list[Episode]]:
        """Several (tasks, step) batches in ONE set of engine calls (see `actors.call_batcher`);
        each batch's episodes come back on their own, as `run` would return them. Dialogues
        are keyed by position, so a prompt may occur in several batches (or twice in one)."""
        jobs = [(task, step) for tasks, step in batches for task in tasks]
        live: dict[str, _Live] = {}
        requests = []
        for pos, (task, step) in enumerate(jobs):
            opening = None
            for i in range(params.n):
                env = make_environment(self.env_cfg, f"{task.prompt_id}-{i}", self.seed)
                obs = env.reset(task)
                if opening is None:  # same opening for every sample: render it once
                    opening = obs
                    prompt_ids, clips = self.adapter.render_prompt(self.system_prompt, obs)
                live[_key(_request_id(pos, task), i)] = _Live(
                    task, i, env, list(prompt_ids), list(prompt_ids), list(clips),
                    mask=[0] * len(prompt_ids), logprobs=[0.0] * len(prompt_ids),
                    turn_clips=[len(clips)], dialogue=_user_text(obs), pos=pos, step=step)
            requests.append(GenerationRequest(request_id=_request_id(pos, task), prompt_ids=prompt_ids,
                                              audio=self.adapter.audio_inputs(clips), sampling=params))
        results = self._generate(requests)
        active = [(live[_key(r.request_id, r.sample_index)], r) for r in results]
        single = replace(params, n=1)
        finished: list[_Live] = []
        while active:
            requests, by_id = [], {}
            for d, res in active:
                if self._advance(d, res, params.max_new_tokens):
                    rid = _key(_request_id(d.pos, d.task), d.sample_index)
                    by_id[rid] = d
                    requests.append(GenerationRequest(
                        request_id=rid, prompt_ids=list(d.context),
                        audio=self.adapter.audio_inputs(d.clips), sampling=single))
                else:
                    finished.append(d)
            active = [(by_id[r.request_id], r) for r in self._generate(requests)] if requests else []
        finished.sort(key=lambda d: (d.pos, d.sample_index))
        out, k = [], 0
        for tasks, _ in batches:
            size = len(tasks) * params.n
            out.append([self._episode(d, d.step) for d in finished[k:k + size]])
            k += size
        return out

    def _generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        results = self.engine.generate(requests)
        if self.simulated_token_latency_s and results:  # benchmark stand-in for GPU decode time
            time.sleep(self.simulated_token_latency_s * max(len(r.token_ids) for r in results))
        return results

    def _advance(self, d: _Live, res: GenerationResult, max_new_tokens: int) -> bool:
        """Append one sampled turn; returns True when the dialogue goes on (its next user turn
        is then already appended to `record` and `context`)."""
        reply = res.token_ids
        start = len(d.record)
        d.record += reply
        d.mask += [1] * len(reply)
        d.logprobs += res.logprobs
        d.spans.append((start, len(d.record)))
        d.versions.append(res.weight_version)
        text = self.adapter.decode(reply)
        d.texts.append(text)
        d.dialogue.append({"role": "assistant", "text": text})
        d.finish_reason = res.finish_reason
        obs, reward, done = d.env.step(Reply(text, list(reply), res.finish_reason))
        d.env_rewards.append(None if reward is None else float(reward))
        if done or obs is None or len(d.spans) >= self.limits.max_turns:
            return False
        close = self.adapter.close_assistant(reply)
        turn_ids, clips = [], []
        for turn in obs:
            ids, c = self.adapter.render_turn(turn)
            turn_ids += ids
            clips += c
        turn_ids += self.adapter.assistant_header()
        shown = reply
        if not self.limits.keep_reasoning:
            spans = self.adapter.split_output(reply)["reasoning"]
            hidden = {i for s, e in spans for i in range(s, e)}
            shown = [t for i, t in enumerate(reply) if i not in hidden]
            d.drops += [(start + s, start + e) for s, e in spans]
        new_context = d.context + shown + close + turn_ids
        if len(new_context) + max_new_tokens > self.limits.max_total_tokens:
            return False
        d.context = new_context
        d.record += close + turn_ids
        d.mask += [0] * len(close + turn_ids)
        d.logprobs += [0.0] * len(close + turn_ids)
        d.clips += clips
        d.turn_clips.append(len(d.clips))
        d.dialogue += _user_text(obs)
        return True

    def _episode(self, d: _Live, step: int) -> Episode:
        task = d.task
        # Drops inside the last turn's own reply hide nothing from anything: not recorded.
        drops = [(s, e) for s, e in d.drops if e <= d.spans[-1][0]]
        return Episode(
            episode_id=f"s{step:06d}-{task.prompt_id}-{d.sample_index}",
            prompt_id=task.prompt_id, sample_index=d.sample_index,
            policy_version=min(d.versions), token_ids=d.record, loss_mask=d.mask,
            logprobs=d.logprobs, response_text=d.texts[-1], finish_reason=d.finish_reason,
            task={"answer": task.answer, "choices": task.choices, **task.meta, **d.env.info()},
            audio=self.adapter.audio_inputs(d.clips), turn_spans=d.spans, turn_versions=d.versions,
            turn_texts=d.texts, env_turn_rewards=d.env_rewards, context_drops=drops,
            turn_clips=d.turn_clips, dialogue=d.dialogue)
