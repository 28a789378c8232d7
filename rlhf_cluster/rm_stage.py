"""The `rm` stage: train a Bradley-Terry reward model on chosen/rejected pairs, report held-out
pairwise accuracy, save it as a loadable directory for the preference reward service.

It reuses the policy's training stack: a `LearnerGroup` (DeepSpeed ZeRO ranks over
torch.distributed) built with `model_kind: reward`, trained with the "bt" objective. Each pair
becomes two rows - the prompt (with the user's audio) plus the chosen or the rejected reply and
its end token - scored at that end token, exactly as the service scores a policy's turn.
"""

from __future__ import annotations

import random
import statistics
import time
import zlib
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from rlhf_cluster.data.tasks import Pair
from rlhf_cluster.experience import Episode, collate
from rlhf_cluster.metrics import MetricsSink, Progress


def rm_output_dir(cfg: Any) -> Path:
    return Path(cfg.rm.output_dir or Path(cfg.run.output_dir) / "reward_model")


def pair_rows(adapter: Any, system: str | None, pair: Pair) -> tuple[Episode, Episode]:
    """(chosen, rejected) rows; the loss mask marks the reply's end token, the scored position."""
    prompt_ids, clips = adapter.render_prompt(system, pair.turns)
    audio = adapter.audio_inputs(clips)
    rows = []
    for side, text in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        ids = prompt_ids + adapter.text_ids(text) + [adapter.im_end]
        mask = [0] * len(ids)
        mask[-1] = 1
        rows.append(Episode(episode_id=f"{pair.pair_id}-{side}", prompt_id=pair.prompt_id,
                            sample_index=0, policy_version=-1, token_ids=ids, loss_mask=mask,
                            logprobs=[0.0] * len(ids), response_text=text, finish_reason="stop",
                            audio=audio))
    return rows[0], rows[1]


def split_heldout(pairs: list[Pair], fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """Hold out whole prompts (a stable hash of prompt_id), so no held-out prompt is trained on."""
    def held(p: Pair) -> bool:
        return zlib.crc32(f"{seed}:{p.prompt_id}".encode()) % 10_000 < fraction * 10_000

    train, heldout = [p for p in pairs if not held(p)], [p for p in pairs if held(p)]
    if not train or not heldout:
        raise ValueError(f"rm.eval_fraction={fraction}: {len(train)} training and {len(heldout)} held-out "
                         "pairs; need both (more pairs or another fraction)")
    return train, heldout


def pair_shards(rows: list[tuple[Episode, Episode]], num_ranks: int, pad_id: int) -> list:
    """Pairs dealt round-robin to ranks, each shard laid out chosen, rejected, chosen, ..."""
    if len(rows) < num_ranks:
        raise ValueError(f"{len(rows)} pairs cannot feed {num_ranks} reward-model ranks")
    return [collate([e for pair in rows[i::num_ranks] for e in pair], pad_id) for i in range(num_ranks)]


def pairwise_accuracy(group: Any, rows: list[tuple[Episode, Episode]], num_ranks: int, pad_id: int) -> float:
    """Fraction of pairs whose chosen reply outscores the rejected one (ties count as wrong)."""
    wins = []
    for scores in group.scores(pair_shards(rows, num_ranks, pad_id)):
        wins += (scores[0::2] > scores[1::2]).tolist()
    return sum(wins) / len(wins)


def rm_stage(cfg: Any, sink: MetricsSink) -> dict[str, Any]:
    """Train, evaluate and save the reward model; returns its path and accuracies."""
    from transformers import AutoTokenizer

    from learners.group import LearnerGroup
    from rlhf_cluster.adapters import make_adapter
    from rlhf_cluster.data.tasks import load_pairs

    rm = cfg.rm
    init = rm.init_path or cfg.model.path
    adapter = make_adapter(cfg.model.adapter, init, AutoTokenizer.from_pretrained(init))
    pair_set = load_pairs(cfg.data.pairs_path, on_bad_row=cfg.data.on_bad_row)
    train, heldout = split_heldout(pair_set.pairs, rm.eval_fraction, cfg.run.seed)
    train_rows = [pair_rows(adapter, cfg.data.system_prompt, p) for p in train]
    heldout_rows = [pair_rows(adapter, cfg.data.system_prompt, p) for p in heldout]
    learner_cfg = {**OmegaConf.to_container(cfg.learner, resolve=True), "model_kind": "reward",
                   "num_ranks": rm.num_ranks, "num_cpus_per_rank": rm.num_cpus_per_rank,
                   "num_gpus_per_rank": rm.num_gpus_per_rank, "zero_stage": rm.zero_stage,
                   "lr": rm.lr, "micro_batch_size": rm.micro_batch_size, "kl_coef": 0.0}
    print(f"[rm] {len(train)} training pairs, {len(heldout)} held-out pairs; backbone {init}", flush=True)
    group = LearnerGroup(init, learner_cfg, dtype=cfg.model.dtype, seed=cfg.run.seed,
                         name_prefix="rm-learner")
    out = rm_output_dir(cfg)
    try:
        rng = random.Random(cfg.run.seed)
        progress = Progress(rm.steps, "rm")
        accuracy = None
        for step in range(1, rm.steps + 1):
            t0 = time.perf_counter()
            batch = rng.sample(train_rows, min(rm.batch_size, len(train_rows)))
            metrics = group.train_step(pair_shards(batch, rm.num_ranks, adapter.pad_id), objective="bt")
            row = {"stage": "rm", "step": step, "samples": len(batch),
                   "samples_per_s": len(batch) / (time.perf_counter() - t0),
                   "step_time_s": time.perf_counter() - t0,
                   **{f"train.{k}": v for k, v in metrics.items()}}
            if step % rm.eval_every == 0 or step == rm.steps:
                accuracy = pairwise_accuracy(group, heldout_rows, rm.num_ranks, adapter.pad_id)
                row["rm.heldout_accuracy"] = accuracy
            sink.log(row)
            if step % cfg.run.log_every == 0 or "rm.heldout_accuracy" in row:
                extra = f" bt_loss {metrics['bt_loss']:.3f} train_acc {metrics['pair_accuracy']:.2f}"
                if "rm.heldout_accuracy" in row:
                    extra += f" heldout_acc {accuracy:.3f}"
                print(progress.line(step, row) + extra, flush=True)
        group.save(str(out))
    finally:
        group.shutdown()
    recent = [r["train.pair_accuracy"] for r in sink.rows if r.get("stage") == "rm"][-10:]
    print(f"[rm] held-out pairwise accuracy {accuracy:.3f} on {len(heldout)} pairs; "
          f"reward model saved to {out}", flush=True)
    if accuracy < rm.min_heldout_accuracy:
        raise RuntimeError(f"rm: held-out pairwise accuracy {accuracy:.3f} is below "
                           f"rm.min_heldout_accuracy={rm.min_heldout_accuracy}")
    return {"path": str(out), "heldout_accuracy": accuracy, "heldout_pairs": len(heldout),
            "train_accuracy": statistics.fmean(recent)}
