"""`rollout.engine: vllm` runs the quickstart end to end on CPU: reward model, SFT warm start,
async GRPO against verifiers + the reward model with the vLLM engine serving every published
version, reward rising."""

import pyarrow.parquet as pq
from conftest import GPU_MEMORY_UTILIZATION

from rlhf_cluster.config import load_config
from rlhf_cluster.driver import run


def test_quickstart_with_vllm_engine_reward_rises(tmp_path, ray_session, tiny_model_dir, synthetic_dir):
    cfg = load_config("configs/quickstart.yaml", [
        f"run.output_dir={tmp_path}", f"model.path={tiny_model_dir}",
        f"data.train_path={synthetic_dir / 'tasks.parquet'}",
        f"data.pairs_path={synthetic_dir / 'pairs.parquet'}", "rl.steps=40",
        "rollout.engine=vllm", f"rollout.gpu_memory_utilization={GPU_MEMORY_UTILIZATION}",
        "learner.num_cpus_per_rank=0.5", "rollout.num_cpus_per_worker=0.5", "run.log_every=10"])
    summary = run(cfg)
    r = summary["reward"]
    assert r["last"] > r["first"] + 0.1, r
    rl = [m for m in pq.read_table(tmp_path / "metrics.parquet").to_pylist() if m["stage"] == "rl"]
    assert [m["weight_version"] for m in rl] == list(range(2, 42))
    rows = pq.read_table(tmp_path / "rollouts" / "rl-step-000040.parquet").to_pylist()
    assert len(rows) == 8 * 8 and {row["policy_version"] for row in rows} == {39}
