"""The reward model on the real training stack: a LearnerGroup with `model_kind: reward`
(DeepSpeed ZeRO ranks over gloo) trained with the Bradley-Terry objective."""

from dataclasses import asdict

import pytest
import torch
from transformers import AutoTokenizer

from learners.group import LearnerGroup
from rlhf_cluster.adapters import make_adapter
from rlhf_cluster.config import LearnerConfig
from rlhf_cluster.data.tasks import load_pairs
from rlhf_cluster.rm_stage import pair_rows, pair_shards, pairwise_accuracy


def cfg(**kw) -> dict:
    return {**asdict(LearnerConfig(**{"num_cpus_per_rank": 0.25, "lr": 1e-3, **kw})), "model_kind": "reward"}


def test_two_rank_bt_step_matches_one_rank_and_widens_the_margin(ray_session, tiny_model_dir, synthetic_dir):
    adapter = make_adapter("auto", tiny_model_dir, AutoTokenizer.from_pretrained(tiny_model_dir))
    rows = [pair_rows(adapter, "system", p) for p in load_pairs(synthetic_dir / "pairs.parquet").pairs[:4]]
    two = LearnerGroup(tiny_model_dir, cfg(num_ranks=2, zero_stage=2, micro_batch_size=2), name_prefix="rm2")
    one = LearnerGroup(tiny_model_dir, cfg(num_ranks=1, zero_stage=0, micro_batch_size=8), name_prefix="rm1")
    try:
        shards2, shards1 = pair_shards(rows, 2, adapter.pad_id), pair_shards(rows, 1, adapter.pad_id)

        def margins(group, shards, ranks):
            """Chosen - rejected per pair, in pair order (pairs are dealt round-robin to ranks)."""
            per_rank = [s[0::2] - s[1::2] for s in group.scores(shards)]
            return torch.stack([per_rank[i % ranks][i // ranks] for i in range(len(rows))])

        before2, before1 = margins(two, shards2, 2), margins(one, shards1, 1)
        torch.testing.assert_close(before2, before1, atol=1e-5, rtol=0)  # same init on every rank
        m2 = two.train_step(shards2, objective="bt")
        m1 = one.train_step(shards1, objective="bt")
        expected_loss = float(torch.nn.functional.softplus(-before1).mean())  # -log sigmoid(margin)
        assert m1["bt_loss"] == pytest.approx(expected_loss, abs=1e-5)
        assert m2["bt_loss"] == pytest.approx(expected_loss, abs=1e-5)
        assert m2["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-4)  # global mean over ranks
        after2, after1 = margins(two, shards2, 2), margins(one, shards1, 1)
        torch.testing.assert_close(after2, after1, atol=1e-4, rtol=0)
        assert float(after1.mean()) > float(before1.mean())  # one step towards the chosen replies
        for _ in range(15):
            two.train_step(shards2, objective="bt")
        assert pairwise_accuracy(two, rows, 2, adapter.pad_id) == 1.0  # fits 4 pairs
    finally:
        two.shutdown()
        one.shutdown()
