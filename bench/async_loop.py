"""Samples/s of the execution modes side by side, and loop efficiency.

    python bench/async_loop.py [--steps 12] [--latencies 0,auto,0.008] [--buffered 2] [--learner-ranks 1]

For each mode (sync, one_step_off, async with `--buffered` batches ahead and max_staleness
equal to it) the same config runs `--steps` RL steps; samples/s is measured over the steps
after the first (warm-up). Generation-only and training-only throughputs are measured on the
same actors: generation-only keeps as many batches queued as async mode does (so the worker
merges them exactly as it may in async mode; "gen@1" is one batch at a time, as in sync
mode), and loop efficiency = achieved / min(generation-only, training-only).

Each latency is a row group. A non-zero latency adds a per-token sleep per engine call in the
rollout worker: a stand-in for GPU decoding, whose step costs about the same for one batch
or several (memory-bound decode). `auto` picks the sleep that makes one batch's generation as
slow as its training (the balanced case). The learner gets `--learner-ranks` ranks (default
1): on a GPU cluster generation and training run on their own devices, here each stage gets
one of the 2 cores. Prints a table; never asserts.
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


def base_overrides(out: Path, steps: int, latency: float, ranks: int) -> list[str]:
    return [f"run.output_dir={out}", "run.stages=[rl]", f"rl.steps={steps}", "run.log_every=1000",
            "run.save_rollouts=false", f"rollout.simulated_token_latency_s={latency}",
            f"learner.num_ranks={ranks}",
            "learner.num_cpus_per_rank=0.5", "rollout.num_cpus_per_worker=0.5",
            "cluster.num_cpus=4", "reward.services.preference.enabled=false",  # no rm stage here
            "reward.weights.preference=0", "reward.normalize.preference=none"]


def mode_throughput(tmp: Path, mode: str, args: argparse.Namespace, latency: float) -> float:
    out = tmp / f"{mode}-{latency}"
    cfg = load_config("configs/quickstart.yaml", base_overrides(out, args.steps, latency, args.learner_ranks) + [
        f"rl.mode={mode}", f"rl.max_staleness={args.buffered}", f"rl.max_buffered_batches={args.buffered}"])
    run(cfg)
    rows = [r for r in pq.read_table(out / "metrics.parquet").to_pylist() if r["stage"] == "rl"][1:]
    return sum(r["samples"] for r in rows) / sum(r["step_time_s"] for r in rows)


def generation_throughput(actors, sampler: TaskSampler, sampling: dict, prompts: int, steps: int,
                          depth: int) -> tuple[float, list]:
    """Samples/s with `depth` batches queued on the workers at all times (first batch excluded)."""
    queued = [submit_rollouts(actors, sampler.sample(prompts), sampling, b) for b in range(depth)]
    batches, done_at = [], []
    for step in range(steps):
        batches.append(collect_rollouts(queued.pop(0), step))
        done_at.append(time.perf_counter())
        if step + depth < steps:
            queued.append(submit_rollouts(actors, sampler.sample(prompts), sampling, step + depth))
    return len(batches[0]) * (steps - 1) / (done_at[-1] - done_at[0]), batches


def component_throughputs(tmp: Path, args: argparse.Namespace, latency: float) -> tuple[float, float, float]:
    """Generation-only (one batch at a time, and `1 + buffered` queued) and training-only
    samples/s on the same actors and batch size."""
    cfg = load_config("configs/quickstart.yaml", base_overrides(tmp / "parts", args.steps, latency,
                                                                 args.learner_ranks))
    prepare_inputs(cfg)
    tasks = load_tasks(cfg.data.train_path).tasks
    actors = start_actors(cfg)
    try:
        sampling = {"n": cfg.rollout.samples_per_prompt, "max_new_tokens": cfg.rollout.max_new_tokens,
                    "temperature": 1.0, "top_p": 1.0}
        sampler = TaskSampler(tasks, 0)
        prompts, steps = cfg.rollout.prompts_per_step, args.steps
        gen1, batches = generation_throughput(actors, sampler, sampling, prompts, steps, 1)
        gen_deep, _ = generation_throughput(actors, sampler, sampling, prompts, steps, 1 + args.buffered)
        train_times = []
        for eps in batches:
            scored = score(actors, eps)
            assign_advantages(scored, True)
            shards = [collate(s, actors.adapter.pad_id) for s in shard_episodes(scored, cfg.learner.num_ranks)]
            t0 = time.perf_counter()
            actors.learner.train_step(shards)
            actors.sync.publish(actors.sync.version + 1)
            train_times.append(time.perf_counter() - t0)
        return gen1, gen_deep, len(batches[0]) / statistics.fmean(train_times[1:])
    finally:
        actors.sync.close()
        actors.learner.shutdown()
        kill_actors([*actors.sync.workers, *actors.services.values()])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--latencies", default="0,auto",
                        help="comma list of seconds per token (0: CPU only); auto: one batch's "
                             "generation ~= its training")
    parser.add_argument("--buffered", type=int, default=2, help="async: rl.max_buffered_batches (= max_staleness)")
    parser.add_argument("--learner-ranks", type=int, default=1)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-async-"))
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    rows = []
    for spec in args.latencies.split(","):
        latency = 0.0 if spec == "auto" else float(spec)
        if spec == "auto":  # the sleep per token that makes a batch's generation take as long as its training
            cfg = load_config("configs/quickstart.yaml", base_overrides(tmp, 1, 0.0, args.learner_ranks))
            gen0, _, train0 = component_throughputs(tmp, args, 0.0)
            n = cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt
            latency = max(0.0, (n / train0 - n / gen0) / cfg.rollout.max_new_tokens)
            print(f"calibrated latency: {latency * 1000:.1f} ms/token (cpu gen@1 {gen0:.1f}, "
                  f"train-only {train0:.1f} samples/s)", flush=True)
        gen1, gen, train = component_throughputs(tmp, args, latency)
        sync = None
        for mode in ("sync", "one_step_off", "async"):
            sps = mode_throughput(tmp, mode, args, latency)
            sync = sync or sps
            rows.append(f"{f'{latency * 1000:.1f} ms/token':<16}{mode:<14}{sps:>10.1f}{sps / sync:>9.2f}"
                        f"{gen1:>8.1f}{gen:>10.1f}{train:>11.1f}{sps / min(gen, train):>9.2f}")
            print(rows[-1], flush=True)
    print(f"\nlearner ranks {args.learner_ranks}, async buffers {args.buffered}; samples/s over steps 2-{args.steps}")
    print(f"{'latency':<16}{'mode':<14}{'samples/s':>10}{'vs sync':>9}{'gen@1':>8}{'gen-only':>10}"
          f"{'train-only':>11}{'loop eff':>9}")
    print("\n".join(rows))
    ray.shutdown()


if __name__ == "__main__":
    main()
