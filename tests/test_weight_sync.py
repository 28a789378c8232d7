"""After a sync, every rollout engine serves the learner's exact weights (ZeRO-2 and ZeRO-3),
and the engine's behaviour logprobs equal the learner's recomputation on the same tokens."""

import pytest
import ray
import torch

from actors.rollout_worker import RolloutWorker
from learners.group import LearnerGroup
from rlhf_cluster.data.tasks import load_tasks
from rlhf_cluster.driver import assign_advantages
from rlhf_cluster.experience import collate, shard_episodes
from rlhf_cluster.weight_sync import WeightSync

SAMPLING = {"n": 2, "max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0}


def learner_cfg(stage, suppress):
    return {"num_ranks": 2, "num_cpus_per_rank": 0.5, "num_gpus_per_rank": 0, "backend": "gloo",
            "zero_stage": stage, "lr": 1e-2, "weight_decay": 0.0, "grad_clip": 1.0,
            "micro_batch_size": 4, "ppo_epochs": 1, "clip_eps_low": 0.2, "clip_eps_high": 0.2,
            "kl_coef": 0.0, "loss_agg": "token_mean", "advantage_std_norm": True,
            "temperature": 1.0, "suppress_token_ids": suppress}


@pytest.mark.parametrize("stage", [2, 3])
def test_rollout_weights_equal_learner_weights_after_each_sync(stage, ray_session, tiny_model_dir, synthetic_dir):
    tasks = load_tasks(synthetic_dir / "tasks.parquet").tasks[:4]
    workers = [ray.remote(RolloutWorker).options(num_cpus=0.25, name=f"sync-test-rollout-{stage}-{i}")
               .remote(i, tiny_model_dir, system_prompt="you are a caring voice assistant .")
               for i in range(2)]
    probe = RolloutWorker(0, tiny_model_dir)  # in-process: the adapter's pad and masked ids
    group = LearnerGroup(tiny_model_dir, learner_cfg(stage, probe.adapter.suppress_token_ids),
                         name_prefix=f"sync-test-learner-z{stage}")
    try:
        sync = WeightSync(workers)
        initial = ray.get(workers[0].named_tensors.remote())
        for version in (1, 2):
            episodes = ray.get(workers[0].rollout.remote(tasks, SAMPLING, version))
            for i, ep in enumerate(episodes):
                ep.reward = float(i % 2)
            assign_advantages(episodes, std_norm=True)
            shards = [collate(s, probe.pad_token_id()) for s in shard_episodes(episodes, 2)]
            group.train_step(shards)
            learner_weights = group.named_tensors()
            sync.push(version, learner_weights)
            for w in workers:
                assert ray.get(w.weight_version.remote()) == version
                served = ray.get(w.named_tensors.remote())
                assert served.keys() == learner_weights.keys()
                for name, tensor in learner_weights.items():
                    assert torch.equal(served[name], tensor), name
        assert any(not torch.equal(initial[k], learner_weights[k]) for k in initial)
        # the synced engine samples; the learner recomputes the same logprobs on those tokens
        episodes = ray.get(workers[1].rollout.remote(tasks, SAMPLING, 3))
        assert {ep.policy_version for ep in episodes} == {2}
        shards = [collate(s, probe.pad_token_id()) for s in shard_episodes(episodes, 2)]
        for shard, lp in zip(shards, group.logprobs(shards)):
            mask = shard.loss_mask.bool()
            assert torch.allclose(lp[mask], shard.old_logprobs[mask], atol=1e-4)
        with pytest.raises(ValueError, match="must increase"):
            sync.push(2, learner_weights)
    finally:
        group.shutdown()
        for w in workers:
            ray.kill(w)
