"""Samples/s of the execution modes side by side, and loop efficiency.

    python bench/async_loop.py [--steps 12] [--latency auto|SECONDS] [--variants cpu,latency]

For each mode (sync, one_step_off, async) the same config runs `--steps` RL steps; samples/s
is measured over the steps after the first (warm-up). Generation-only and training-only
throughputs are measured on the same actors, and loop efficiency is
achieved / min(generation-only, training-only). The `latency` variant adds a per-token sleep in
the rollout worker: a stand-in for GPU decoding that leaves the CPU to the learner, so overlap
is measurable on a 2-core machine; `--latency auto` picks the sleep that makes generation-only
as slow as training-only (the balanced case, where a 2-stage pipeline can at best halve the
step time). Prints a table; never asserts.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlhf_cluster.cluster import kill_actors  # noqa: E402
from rlhf_cluster.config import load_config  # noqa: E402
from rlhf_cluster.driver import (TaskSampler, assign_advantages, collect_rollouts, prepare_inputs,  # noqa: E402
                                 run, score, start_actors, submit_rollouts)
from rlhf_cluster.data.tasks import load_tasks  # noqa: E402
from rlhf_cluster.experience import collate, shard_episodes  # noqa: E402


def base_overrides(out: Path, steps: int, latency: float) -> list[str]:
    return [f"run.output_dir={out}", "run.stages=[rl]", f"rl.steps={steps}", "run.log_every=1000",
            "run.save_rollouts=false", f"rollout.simulated_token_latency_s={latency}",
            "learner.num_cpus_per_rank=0.5", "rollout.num_cpus_per_worker=0.5",
            "cluster.num_cpus=4", "reward.services.preference.enabled=false",  # no rm stage here
            "reward.weights.preference=0", "reward.normalize.preference=none"]


def mode_throughput(tmp: Path, mode: str, steps: int, latency: float) -> float:
    out = tmp / f"{mode}-{latency}"
    cfg = load_config("configs/quickstart.yaml", base_overrides(out, steps, latency) + [
        f"rl.mode={mode}", "rl.max_staleness=2", "rl.max_buffered_batches=1"])
    run(cfg)
    rows = [r for r in pq.read_table(out / "metrics.parquet").to_pylist() if r["stage"] == "rl"][1:]
    return sum(r["samples"] for r in rows) / sum(r["step_time_s"] for r in rows)


def component_throughputs(tmp: Path, steps: int, latency: float) -> tuple[float, float]:
    """Generation-only and training-only samples/s on the same actors and batch size."""
    cfg = load_config("configs/quickstart.yaml", base_overrides(tmp / "parts", steps, latency))
    prepare_inputs(cfg)
    tasks = load_tasks(cfg.data.train_path).tasks
    actors = start_actors(cfg)
    try:
        sampling = {"n": cfg.rollout.samples_per_prompt, "max_new_tokens": cfg.rollout.max_new_tokens,
                    "temperature": 1.0, "top_p": 1.0}
        sampler = TaskSampler(tasks, 0)
        gen_times, batches = [], []
        for step in range(steps):
            t0 = time.perf_counter()
            eps = collect_rollouts(submit_rollouts(actors, sampler.sample(cfg.rollout.prompts_per_step),
                                                   sampling, step), step)
            gen_times.append(time.perf_counter() - t0)
            batches.append(eps)
        train_times = []
        for eps in batches:
            scored = score(actors, eps)
            assign_advantages(scored, True)
            shards = [collate(s, actors.adapter.pad_id) for s in shard_episodes(scored, cfg.learner.num_ranks)]
            t0 = time.perf_counter()
            actors.learner.train_step(shards)
            actors.sync.publish(actors.sync.version + 1)
            train_times.append(time.perf_counter() - t0)
        n = len(batches[0])
        return n / statistics.fmean(gen_times[1:]), n / statistics.fmean(train_times[1:])
    finally:
        actors.sync.close()
        actors.learner.shutdown()
        kill_actors([*actors.sync.workers, *actors.services.values()])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--latency", default="auto",
                        help="seconds per token of the latency variant; auto: generation ~= training")
    parser.add_argument("--variants", default="cpu,latency")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-async-"))
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    print(f"{'variant':<13}{'mode':<14}{'samples/s':>10}{'vs sync':>9}{'gen-only':>10}{'train-only':>11}{'loop eff':>9}")
    for label in args.variants.split(","):
        latency = 0.0
        if label == "latency" and args.latency == "auto":
            # the sleep per token that makes a batch's generation take as long as its training
            cfg = load_config("configs/quickstart.yaml", base_overrides(tmp, 1, 0.0))
            gen0, train0 = component_throughputs(tmp, args.steps, 0.0)
            n = cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt
            latency = max(0.0, (n / train0 - n / gen0) / cfg.rollout.max_new_tokens)
            print(f"calibrated latency: {latency * 1000:.1f} ms/token (cpu gen-only {gen0:.1f}, "
                  f"train-only {train0:.1f} samples/s)", flush=True)
        elif label == "latency":
            latency = float(args.latency)
        gen, train = component_throughputs(tmp, args.steps, latency)
        sync = None
        for mode in ("sync", "one_step_off", "async"):
            sps = mode_throughput(tmp, mode, args.steps, latency)
            sync = sync or sps
            print(f"{label + f'({latency * 1000:.0f}ms)':<13}{mode:<14}{sps:>10.1f}{sps / sync:>9.2f}{gen:>10.1f}{train:>11.1f}"
                  f"{sps / min(gen, train):>9.2f}", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
