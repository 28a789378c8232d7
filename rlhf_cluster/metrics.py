"""Run outputs that are not checkpoints: per-step metrics, rollout Parquet, progress, plots.

Everything is written as the run goes (metrics.parquet is rewritten each step, one rollouts
file per step), so a crash loses nothing already produced. Step figures are also exported as
Ray metrics so the Ray dashboard (and its Prometheus/Grafana) shows them live.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from rlhf_cluster.experience import Episode

RAY_GAUGES = ("reward_mean", "samples_per_s", "tokens_per_s", "step_time_s", "weight_version",
              "staleness_max", "dropped_episodes", "rollout_workers")


class MetricsSink:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "metrics.parquet"
        self.rows: list[dict[str, Any]] = []
        self._gauges = None

    def log(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        keys = list(dict.fromkeys(k for r in self.rows for k in r))  # stages log different columns
        pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in self.rows]), self.path)
        self._export_to_ray(row)

    def _export_to_ray(self, row: dict[str, Any]) -> None:
        from ray.util import metrics

        if self._gauges is None:
            self._gauges = {k: metrics.Gauge(f"rlhf_{k}", description=f"rlhf-cluster {k}",
                                             tag_keys=("stage",)) for k in RAY_GAUGES}
        for key, gauge in self._gauges.items():
            if isinstance(row.get(key), (int, float)):
                gauge.set(float(row[key]), tags={"stage": str(row.get("stage", ""))})


def write_rollouts(run_dir: Path, step: int, episodes: list[Episode], stage: str = "rl") -> Path:
    """One Parquet file per step; reward components become `reward.<name>` columns."""
    out = Path(run_dir) / "rollouts"
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for ep in episodes:
        row = ep.to_row(step)
        for name, value in row.pop("rewards").items():
            row[f"reward.{name}"] = value
        row["stage"] = stage
        rows.append(row)
    path = out / f"{stage}-step-{step:06d}.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


class Progress:
    """One line per step: rates and an ETA from the mean step time so far."""

    def __init__(self, total_steps: int, stage: str):
        self.total, self.stage, self.start = total_steps, stage, time.perf_counter()

    FIELDS = (("reward_mean", "reward {:.3f}"), ("train.nll", "nll {:.3f}"),
              ("samples_per_s", "samples/s {:.1f}"), ("tokens_per_s", "tokens/s {:.0f}"),
              ("step_time_s", "step {:.2f}s"), ("weight_version", "v{}"), ("rollout_workers", "workers {}"))

    def line(self, step: int, row: dict[str, Any]) -> str:
        elapsed = time.perf_counter() - self.start
        eta = elapsed / step * (self.total - step) if step else math.nan
        shown = " ".join(fmt.format(row[k]) for k, fmt in self.FIELDS if row.get(k) is not None)
        return f"[{self.stage}] step {step}/{self.total} {shown} elapsed {elapsed:.0f}s eta {eta:.0f}s"


def plot_rewards(rows: list[dict[str, Any]], png: Path, keys: tuple[str, ...] = ("reward_mean",)) -> Path:
    """Reward curves of the rl stage. Components bounded in [0, 1] (verifiers) and unbounded
    ones (reward-model logits, z-scores) go on separate panels, so neither flattens the other."""
    plt = _pyplot()
    rows = [r for r in rows if r.get("stage") == "rl"]
    steps = [r["step"] for r in rows]
    names = list(keys) + [k for k in dict.fromkeys(k for r in rows for k in r)
                          if k.startswith("reward.") and k not in keys]
    curves = {k: [r.get(k) for r in rows] for k in names}
    curves = {k: v for k, v in curves.items() if any(x is not None for x in v)}
    bounded = {k: v for k, v in curves.items()
               if all(x is None or -0.05 <= x <= 1.05 for x in v) or k in keys}
    unbounded = {k: v for k, v in curves.items() if k not in bounded}
    panels = [("reward and bounded components", bounded)]
    if unbounded:
        panels.append(("unbounded components (reward model)", unbounded))
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4), squeeze=False)
    for ax, (title, group) in zip(axes[0], panels):
        for key, values in group.items():
            ax.plot(steps, [float("nan") if x is None else x for x in values], label=key)
        ax.set_xlabel("rl step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("reward")
    fig.suptitle("rlhf-cluster: reward per step")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def plot_async(rows: list[dict[str, Any]], png: Path, bound: int) -> Path:
    """How the actor-learner loop behaved, per rl step: staleness against its bound K with the
    episodes dropped for it, the off-policy importance ratios, and where each step's time went
    (a step that waits on generation shows the loop is not hiding it)."""
    plt = _pyplot()
    rows = [r for r in rows if r.get("stage") == "rl"]
    steps = [r["step"] for r in rows]

    def col(key: str) -> list[float]:
        return [float("nan") if r.get(key) is None else float(r[key]) for r in rows]

    fig, (stale_ax, ratio_ax, time_ax) = plt.subplots(1, 3, figsize=(18, 4))
    stale_ax.axhline(bound, color="red", linestyle=":", label=f"bound K={bound}")
    stale_ax.plot(steps, col("staleness_max"), marker=".", label="max")
    stale_ax.plot(steps, col("staleness_mean"), linestyle="--", label="mean")
    stale_ax.set_ylabel("weight versions")
    stale_ax.set_ylim(0, max([bound, *(r.get("staleness_max") or 0 for r in rows)]) + 1)
    dropped_ax = stale_ax.twinx()
    dropped_ax.bar(steps, col("dropped_stale"), color="grey", alpha=0.4, label="dropped as stale")
    dropped_ax.set_ylabel("episodes dropped as stale")
    dropped_ax.set_ylim(0, max([1.0, *(r.get("dropped_stale") or 0 for r in rows)]) * 1.1)
    dropped_ax.legend(fontsize=8, loc="upper right")
    stale_ax.set_title("staleness of trained episodes")
    for key in ("train.ratio_mean", "train.ratio_max", "train.is_weight_mean", "train.clip_frac"):
        if any(r.get(key) is not None for r in rows):
            ratio_ax.plot(steps, col(key), label=key.removeprefix("train."))
    ratio_ax.axhline(1.0, color="black", linewidth=0.5)
    ratio_ax.set_title("importance ratios (learner / behaviour)")
    bottom = [0.0] * len(rows)
    for key, label in (("gen_wait_s", "waiting for rollouts"), ("score_time_s", "scoring"),
                       ("train_time_s", "training"), ("sync_time_s", "weight sync + scaling")):
        values = [0.0 if math.isnan(v) else v for v in col(key)]
        time_ax.bar(steps, values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values)]
    time_ax.set_title("driver time per step (s)")
    for ax in (stale_ax, ratio_ax, time_ax):
        ax.set_xlabel("rl step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"rlhf-cluster: actor-learner loop ({rows[0].get('mode', '?') if rows else '?'} mode)")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
