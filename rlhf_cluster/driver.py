"""The driver: prepares inputs, starts the actors, and runs the stages a config lists.

One RL step (synchronous, on-policy):
sample prompts -> rollout workers generate n samples each -> reward router scores them ->
group-normalised advantages -> learner group trains one step -> weights pushed to every
rollout worker as the next version. Everything a step produces is written before the next.
"""

from __future__ import annotations

import logging
import math
import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from omegaconf import OmegaConf

from rlhf_cluster.cluster import check_namespace_free, connect, kill_actors, stop_actors
from rlhf_cluster.config import to_yaml
from rlhf_cluster.data.tasks import Task, load_tasks
from rlhf_cluster.elastic import Scaler
from rlhf_cluster.experience import Episode, collate, shard_episodes
from rlhf_cluster.metrics import MetricsSink, Progress, plot_async, plot_rewards, write_rollouts
from rlhf_cluster.rollout_pipeline import RolloutPipeline
from rlhf_cluster.weight_sync import WeightSync, rollout_actor_class

log = logging.getLogger("rlhf_cluster")


def prepare_inputs(cfg: Any) -> None:
    """Build the offline tiny model and the synthetic dataset where the config asks for them."""
    model_dir = Path(cfg.model.path)
    if not (model_dir / "config.json").is_file() and cfg.model.build_tiny_if_missing:
        from rlhf_cluster.tiny_model import build_tiny_model

        print(f"building the tiny offline audio LM in {model_dir}", flush=True)
        build_tiny_model(model_dir, seed=cfg.run.seed, family=cfg.model.tiny_family)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"model.path={model_dir}: no Hugging Face model directory there "
                                "(expected config.json + safetensors weights); set "
                                "model.build_tiny_if_missing=true for the offline tiny model")
    train = Path(cfg.data.train_path)
    if not train.is_file() and cfg.data.synthetic:
        from rlhf_cluster.data.synthetic import generate_synthetic

        print(f"generating the synthetic spoken task in {train.parent}", flush=True)
        paths = generate_synthetic(train.parent, num_tasks=cfg.data.synthetic_num_tasks,
                                   seed=cfg.data.synthetic_seed,
                                   speech_replies=cfg.model.tiny_family == "step_audio")
        if paths["tasks"].resolve() != train.resolve():
            raise ValueError(f"data.train_path={train} but the generator wrote {paths['tasks']}; "
                             "point data.train_path at <dir>/tasks.parquet")


@dataclass
class Actors:
    learner: Any
    router: Any
    services: dict
    sync: WeightSync  # owns the rollout-worker membership (join/leave)
    adapter: Any  # the driver's own copy, for rendering SFT targets and learner masks

    @property
    def workers(self) -> list:
        """The rollout workers: the weight sync's members, so there is one list to keep."""
        return self.sync.workers


def engine_options(cfg: Any) -> dict:
    """Backend-specific engine arguments from `rollout.*` (the HF engine takes none)."""
    if cfg.rollout.engine != "vllm":
        return {}
    return {"tensor_parallel_size": cfg.rollout.tensor_parallel_size,
            "gpu_memory_utilization": cfg.rollout.gpu_memory_utilization}


def start_actors(cfg: Any) -> Actors:
    from learners.group import LearnerGroup
    from reward_services.launch import start_reward_services

    from transformers import AutoTokenizer

    from rlhf_cluster.adapters import make_adapter

    adapter = make_adapter(cfg.model.adapter, cfg.model.path, AutoTokenizer.from_pretrained(cfg.model.path))
    learner_cfg = {**OmegaConf.to_container(cfg.learner, resolve=True),
                   "temperature": cfg.rollout.temperature,
                   "suppress_token_ids": adapter.suppress_token_ids}
    learner = LearnerGroup(cfg.model.path, learner_cfg, dtype=cfg.model.dtype, seed=cfg.run.seed)
    services, workers = {}, []
    try:  # a failed start must not leave named actors behind for the next run
        services, router = start_reward_services(cfg, adapter.pad_id)
        workers = start_rollout_workers(cfg)
        return Actors(learner, router, services, WeightSync.from_config(cfg, workers, learner), adapter)
    except BaseException:
        learner.shutdown()
        stop_actors(workers)
        kill_actors(list(services.values()))
        raise


def create_rollout_workers(cfg: Any, indices: list[int]) -> list:
    """Rollout actors `rollout-<i>` for `indices`, not waited for (see `start_rollout_workers`)."""
    from actors.rollout_worker import RolloutWorker

    worker_cls = rollout_actor_class(RolloutWorker)  # weight sync runs beside generation
    return [
        worker_cls.options(name=f"rollout-{i}", num_cpus=cfg.rollout.num_cpus_per_worker,
                           num_gpus=cfg.rollout.num_gpus_per_worker).remote(
            i, cfg.model.path, adapter=cfg.model.adapter, dtype=cfg.model.dtype,
            engine=cfg.rollout.engine, system_prompt=cfg.data.system_prompt, seed=cfg.run.seed,
            simulated_token_latency_s=cfg.rollout.simulated_token_latency_s,
            dialogue=OmegaConf.to_container(cfg.dialogue, resolve=True),
            engine_options=engine_options(cfg))
        for i in indices
    ]


def start_rollout_workers(cfg: Any) -> list:
    workers = create_rollout_workers(cfg, list(range(cfg.rollout.num_workers)))
    try:
        ray.get([w.ready.remote() for w in workers])
    except BaseException:
        stop_actors(workers)
        raise
    return workers


class TaskSampler:
    """Shuffled passes over the dataset, seeded, so runs are reproducible."""

    def __init__(self, tasks: list[Task], seed: int):
        self.tasks, self.rng, self.order = tasks, random.Random(seed), []

    def sample(self, k: int) -> list[Task]:
        out = []
        while len(out) < k:
            if not self.order:
                self.order = list(range(len(self.tasks)))
                self.rng.shuffle(self.order)
            out.append(self.tasks[self.order.pop()])
        return out


def assign_advantages(episodes: list[Episode], std_norm: bool) -> None:
    """GRPO: each episode's advantage is its reward normalised within its prompt's group."""
    from learners.losses import group_advantages

    groups: dict[str, list[Episode]] = {}
    for ep in episodes:
        groups.setdefault(ep.prompt_id, []).append(ep)
    for group in groups.values():
        rewards = torch.tensor([e.reward for e in group], dtype=torch.float)
        for ep, adv in zip(group, group_advantages(rewards, len(group), std_norm=std_norm).tolist()):
            ep.advantage = adv


def submit_rollouts(actors: Actors, tasks: list[Task], sampling: dict, step: int) -> list:
    """Queue one batch on the workers (round-robin chunks); returns the object refs."""
    workers = actors.workers
    chunks = [tasks[i::len(workers)] for i in range(len(workers))]
    return [w.rollout.remote(c, sampling, step) for w, c in zip(workers, chunks) if c]


def collect_rollouts(refs: list, step: int) -> list[Episode]:
    try:
        return [ep for part in ray.get(refs) for ep in part]
    except ray.exceptions.RayActorError as exc:
        raise RuntimeError(f"a rollout worker died during step {step}: {exc}") from exc


def score(actors: Actors, episodes: list[Episode]) -> list[Episode]:
    """Attach rewards; episodes the router could not score are dropped (and counted by it)."""
    items = [{"episode_id": e.episode_id, "response": e.response_text, "task": e.task,
              "turn_texts": e.turn_texts, "dialogue": e.dialogue,
              "env_turn_rewards": e.env_turn_rewards, "token_ids": e.token_ids,
              "loss_mask": e.loss_mask, "turn_spans": e.turn_spans, "audio": e.audio}
             for e in episodes]
    kept = []
    for ep, scored in zip(episodes, actors.router.score(items)):
        ep.rewards, ep.reward, ep.reward_error = scored.components, scored.reward, scored.error
        ep.turn_rewards = scored.turns
        if scored.reward is not None:
            kept.append(ep)
    return kept


def sft_episodes(adapter: Any, system: str | None, pairs: list) -> list[Episode]:
    """Prompt + chosen reply as training rows; the loss mask covers the reply and its end token."""
    episodes, seen = [], set()
    for pair in pairs:
        if (pair.prompt_id, pair.chosen) in seen:
            continue
        seen.add((pair.prompt_id, pair.chosen))
        prompt_ids, clips = adapter.render_prompt(system, pair.turns)
        reply = adapter.text_ids(pair.chosen) + [adapter.im_end]
        episodes.append(Episode(
            episode_id=f"sft-{pair.pair_id}", prompt_id=pair.prompt_id, sample_index=0,
            policy_version=-1, token_ids=prompt_ids + reply,
            loss_mask=[0] * len(prompt_ids) + [1] * len(reply), logprobs=[0.0] * (len(prompt_ids) + len(reply)),
            response_text=pair.chosen, finish_reason="stop", audio=adapter.audio_inputs(clips)))
    return episodes


def sft_stage(cfg: Any, actors: Actors, run_dir: Path, sink: MetricsSink) -> None:
    """Warm start: NLL on chosen replies, then push the weights so RL starts from them."""
    from rlhf_cluster.data.tasks import load_pairs

    pair_set = load_pairs(cfg.data.pairs_path, on_bad_row=cfg.data.on_bad_row)
    episodes = sft_episodes(actors.adapter, cfg.data.system_prompt, pair_set.pairs)
    if len(episodes) < cfg.learner.num_ranks:
        raise ValueError(f"data.pairs_path={cfg.data.pairs_path}: {len(episodes)} usable replies, "
                         f"need at least learner.num_ranks={cfg.learner.num_ranks}")
    rng = random.Random(cfg.run.seed)
    progress = Progress(cfg.sft.steps, "sft")
    actors.learner.set_lr(cfg.sft.lr)
    for step in range(1, cfg.sft.steps + 1):
        t0 = time.perf_counter()
        batch = rng.sample(episodes, min(cfg.sft.batch_size, len(episodes)))
        shards = [collate(s, actors.adapter.pad_id) for s in shard_episodes(batch, cfg.learner.num_ranks)]
        metrics = actors.learner.train_step(shards, objective="sft")
        dt = time.perf_counter() - t0
        n_tokens = sum(e.num_response_tokens for e in batch)
        row = {"stage": "sft", "step": step, "samples": len(batch), "samples_per_s": len(batch) / dt,
               "tokens_per_s": n_tokens / dt, "step_time_s": dt,
               "weight_version": actors.sync.version, **{f"train.{k}": v for k, v in metrics.items()}}
        sink.log(row)
        if step % cfg.run.log_every == 0 or step == cfg.sft.steps:
            print(progress.line(step, row), flush=True)
    actors.sync.publish(actors.sync.version + 1)
    actors.learner.set_lr(cfg.learner.lr)


def staleness_bound(cfg: Any) -> int:
    """K, the most weight versions a trained episode may lag the learner, in `rl.mode`."""
    return {"sync": 0, "one_step_off": 1, "async": cfg.rl.max_staleness}[cfg.rl.mode]


def rl_stage(cfg: Any, actors: Actors, tasks: list[Task], run_dir: Path, sink: MetricsSink) -> list[float]:
    """GRPO steps in one of three execution modes (`rl.mode`).

    Rollout batches are queued on the workers `ahead` batches in advance of the one being
    trained (sync 0, one_step_off 1, async `rl.max_buffered_batches`), so generation overlaps
    training. At train time every episode's staleness (learner version - policy version) is
    checked against the bound K (sync 0, one_step_off 1, async `rl.max_staleness`): stale ones
    are dropped and counted, or kept (`rl.on_stale=keep`) and corrected by the off-policy loss.
    """
    sampling = {"n": cfg.rollout.samples_per_prompt, "max_new_tokens": cfg.rollout.max_new_tokens,
                "temperature": cfg.rollout.temperature, "top_p": cfg.rollout.top_p}
    mode = cfg.rl.mode
    ahead = {"sync": 0, "one_step_off": 1, "async": cfg.rl.max_buffered_batches}[mode]
    bound = staleness_bound(cfg)
    sampler = TaskSampler(tasks, cfg.run.seed)
    progress = Progress(cfg.rl.steps, "rl")
    scaler = Scaler(cfg, actors, run_dir)  # `rlhf-cluster scale N` while this runs
    # `ahead` batches stay queued on the workers and are scored on driver threads while the
    # learner trains; rollout Parquet files are written by a writer thread
    pipeline = RolloutPipeline(
        submit=lambda b: scaler.submit(b, lambda: submit_rollouts(
            actors, sampler.sample(cfg.rollout.prompts_per_step), sampling, b)),
        collect=collect_rollouts, score=lambda eps: score(actors, eps),
        num_batches=cfg.rl.steps, in_flight=1 + ahead)
    writer = ThreadPoolExecutor(1, thread_name_prefix="rollout-writer")
    writes = []
    rewards = []
    try:
        for step in range(1, cfg.rl.steps + 1):
            rewards.append(_rl_step(cfg, actors, pipeline, scaler, writer, writes, run_dir, sink, progress,
                                    step, mode, bound))
        for w in writes:
            w.result()  # a failed write fails the run
    finally:
        pipeline.close()
        writer.shutdown(wait=True)
        scaler.close()
    actors.sync.wait()
    return rewards


def _rl_step(cfg: Any, actors: Actors, pipeline: RolloutPipeline, scaler: Scaler, writer: ThreadPoolExecutor,
             writes: list, run_dir: Path, sink: MetricsSink, progress: Progress, step: int, mode: str,
             bound: int) -> float:
    """One step of `rl_stage`: take the next scored batch, drop stale episodes, train, publish,
    then resize the rollout workers toward the scale target."""
    t0 = time.perf_counter()
    batch_id, episodes, scored, score_s = pipeline.next()
    t_gen = time.perf_counter()
    curation = curate(cfg.rl.curation, scored)
    version = actors.sync.version
    trainable = []
    for ep in episodes:
        ep.staleness = version - ep.policy_version
        if ep.reward is None:
            ep.dropped = "reward_failed"
        elif ep.dropped == "curated":
            pass
        elif ep.staleness > bound and cfg.rl.on_stale == "drop":
            ep.dropped = "stale"
        else:
            trainable.append(ep)
    assign_advantages(trainable, cfg.learner.advantage_std_norm)
    if cfg.run.save_rollouts:
        writes.append(writer.submit(write_rollouts, run_dir, step, episodes))
    t_score = time.perf_counter()
    train_metrics = {}
    if len(trainable) >= cfg.learner.num_ranks:
        shards = [collate(s, actors.adapter.pad_id) for s in shard_episodes(trainable, cfg.learner.num_ranks)]
        train_metrics = actors.learner.train_step(shards)
        t_train = time.perf_counter()
        actors.sync.publish(version + 1, wait=(mode == "sync"))
    else:
        print(f"[rl] step {step}: only {len(trainable)} of {len(episodes)} episodes trainable "
              f"(stale or unscored); step skipped", flush=True)
        t_train = time.perf_counter()
    scaler.apply(step, batch_id)  # a worker that joins serves the version just published
    pipeline.release(actors.sync.served_gate())  # the next batch is generated by the new weights
    t_end = time.perf_counter()
    n_tokens = sum(e.num_response_tokens for e in episodes)
    reward_mean = statistics.fmean(e.reward for e in scored) if scored else math.nan
    stale = [e.staleness for e in trainable]
    row = {"stage": "rl", "step": step, "mode": mode, "reward_mean": reward_mean,
           **{f"reward.{k}": statistics.fmean(e.rewards[k] for e in scored if k in e.rewards)
              for k in dict.fromkeys(k for e in scored for k in e.rewards)},
           **reward_counters(actors.router), **curation,
           "samples": len(episodes), "trained_samples": len(trainable),
           "dropped_episodes": len(episodes) - len(trainable),
           "dropped_stale": sum(e.dropped == "stale" for e in episodes),
           "dropped_reward_failed": sum(e.dropped == "reward_failed" for e in episodes),
           "dropped_curated": sum(e.dropped == "curated" for e in episodes),
           "samples_per_s": len(episodes) / (t_end - t0), "tokens_per_s": n_tokens / (t_end - t0),
           "response_len_mean": n_tokens / len(episodes),
           "step_time_s": t_end - t0, "gen_wait_s": t_gen - t0, "score_time_s": score_s,
           "train_time_s": t_train - t_score, "sync_time_s": t_end - t_train,
           "weight_version": actors.sync.version, "rollout_workers": len(actors.workers),
           "staleness_max": max(stale, default=0), "staleness_mean": statistics.fmean(stale) if stale else 0.0,
           **{f"train.{k}": v for k, v in train_metrics.items()}}
    sink.log(row)
    if step % cfg.run.log_every == 0 or step == cfg.rl.steps:
        print(progress.line(step, row), flush=True)
    return reward_mean
def curate(cur: Any, scored: list[Episode]) -> dict[str, int]:
    """Pass-rate curation (`rl.curation`): whole groups outside [low, high] are marked
    dropped="curated" (recorded, not trained); returns the counts for the metrics row."""
    if not cur.enabled:
        return {}
    from rlhf_cluster.curation import filter_by_pass_rate

    kept, counts = filter_by_pass_rate(scored, cur.component, low=cur.low, high=cur.high,
                                       threshold=cur.threshold)
    kept_ids = {e.episode_id for e in kept}
    for ep in scored:
        if ep.episode_id not in kept_ids:
            ep.dropped = "curated"
    return {f"curation.{k}": v for k, v in counts.items()}


def reward_counters(router: Any) -> dict[str, int]:
    """Cumulative reward-service failure counts, overall and per service."""
    out = {f"reward_{k}": v for k, v in router.counters.items()}
    for name, counts in router.service_counters.items():
        out.update({f"reward_{k}.{name}": v for k, v in counts.items()})
    return out


def summarize(rewards: list[float], window: int = 10) -> dict[str, float]:
    k = min(window, max(1, len(rewards) // 2))
    return {"first": statistics.fmean(rewards[:k]), "last": statistics.fmean(rewards[-k:]), "window": k}


def run(cfg: Any, address: str | None = None, token_path: str | None = None) -> dict:
    """Run every stage in `cfg.run.stages`; returns a summary (also printed)."""
    run_dir = Path(cfg.run.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    torch.manual_seed(cfg.run.seed)
    prepare_inputs(cfg)
    task_set = load_tasks(cfg.data.train_path, on_bad_row=cfg.data.on_bad_row)
    if not task_set.tasks:
        raise ValueError(f"data.train_path={cfg.data.train_path}: no usable tasks")
    info = connect(cfg.cluster, address=address, token_path=token_path)
    check_namespace_free()
    print(f"ray: {info['address']} dashboard: {info['dashboard']}  run dir: {run_dir}", flush=True)
    started = time.perf_counter()
    sink = MetricsSink(run_dir)
    summary: dict[str, Any] = {"run_dir": str(run_dir), "skipped_rows": len(task_set.skipped)}
    if "rm" in cfg.run.stages:  # on its own learner ranks, released before the policy's start
        from rlhf_cluster.rm_stage import rm_stage

        summary["rm"] = rm_stage(cfg, sink)
    actors = start_actors(cfg)
    try:
        actors.sync.publish(0)
        if "sft" in cfg.run.stages:
            sft_stage(cfg, actors, run_dir, sink)
        if "rl" in cfg.run.stages:
            rewards = rl_stage(cfg, actors, task_set.tasks, run_dir, sink)
            summary["reward"] = summarize(rewards)
            for key in ("correct", "preference"):
                curve = [r[f"reward.{key}"] for r in sink.rows
                         if r.get("stage") == "rl" and r.get(f"reward.{key}") is not None]
                if curve:
                    summary[key] = summarize(curve)
            plot_rewards(sink.rows, run_dir / "reward_curve.png")
            plot_async(sink.rows, run_dir / "async_loop.png", staleness_bound(cfg))
        actors.learner.save(run_dir / "checkpoint")
        summary["wall_time_s"] = time.perf_counter() - started
        if "reward" in summary:
            r = summary["reward"]
            print(f"mean reward: first {r['window']} steps {r['first']:.3f} -> "
                  f"last {r['window']} steps {r['last']:.3f}", flush=True)
            for key in ("correct", "preference"):
                if key in summary:
                    c = summary[key]
                    print(f"mean {key}: first {c['window']} steps {c['first']:.3f} -> "
                          f"last {c['window']} steps {c['last']:.3f}", flush=True)
        if "rm" in summary:
            print(f"reward model: held-out pairwise accuracy {summary['rm']['heldout_accuracy']:.3f} "
                  f"({summary['rm']['path']})", flush=True)
        print(f"done in {summary['wall_time_s']:.0f}s; checkpoint: {run_dir / 'checkpoint'}", flush=True)
        return summary
    finally:
        actors.sync.close()
        actors.learner.shutdown()
        stop_actors(actors.sync.workers)
        kill_actors(list(actors.services.values()))
