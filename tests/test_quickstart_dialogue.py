"""The dialogue quickstart, shortened: real actors end to end over 3-turn spoken dialogues with
a simulated user, a Step-Audio-shaped tiny model and the turn-aware verifier service."""

import pyarrow.parquet as pq
import pytest

from rlhf_cluster.config import load_config
from rlhf_cluster.driver import run


@pytest.fixture(scope="module")
def dialogue_run(tmp_path_factory, ray_session):
    out = tmp_path_factory.mktemp("dialogue")
    cfg = load_config("configs/quickstart_dialogue.yaml", [
        f"run.output_dir={out / 'run'}", f"model.path={out / 'model'}",
        f"data.train_path={out / 'data' / 'tasks.parquet'}",
        f"data.pairs_path={out / 'data' / 'pairs.parquet'}", "data.synthetic_num_tasks=16",
        "sft.steps=5", "rl.steps=3", "rl.mode=sync", "rollout.prompts_per_step=2",
        "rollout.samples_per_prompt=3", "learner.num_cpus_per_rank=0.5",
        "rollout.num_cpus_per_worker=0.5"])
    return out / "run", run(cfg)


def test_dialogue_rollouts_are_recorded_turn_by_turn(dialogue_run):
    out, summary = dialogue_run
    rows = pq.read_table(out / "rollouts" / "rl-step-000003.parquet").to_pylist()
    assert len(rows) == 2 * 3
    for row in rows:
        spans = row["turn_spans"]
        assert len(spans) == len(row["turn_versions"]) == len(row["turn_texts"]) == 3
        assert row["turn_versions"] == [row["policy_version"]] * 3  # sync: one version per step
        assert row["staleness"] == 0 and row["trained"]
        assert [i for i, m in enumerate(row["loss_mask"]) if m] == [i for s, e in spans for i in range(s, e)]
        assert [d["role"] for d in row["dialogue"]] == ["user", "assistant"] * 3
        assert row["response_text"] == row["turn_texts"][-1]
        # the simulated user checks each reply with the same rule as the verifier, turn by turn
        assert set(row["env_turn_rewards"]) <= {0.0, 1.0}
        assert row["reward.correct"] == pytest.approx(sum(row["env_turn_rewards"]) / 3)
        assert row["reward"] == pytest.approx(0.7 * row["reward.correct"] + 0.1 * row["reward.reasoning_present"]
                                              + 0.2 * row["reward.speech_span"])
    metrics = [m for m in pq.read_table(out / "metrics.parquet").to_pylist() if m["stage"] == "rl"]
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(m["trained_samples"] == 6 for m in metrics)
    assert (out / "checkpoint").is_dir()
