"""After every sync, through every transport, each rollout engine serves the learner's exact
weights and version (ZeRO-2 and ZeRO-3); a late worker serves the current version before its
first episode; a dead worker fails a sync with a clear error in bounded time, and the
group re-forms without it; the engine's behaviour logprobs equal the learner's recomputation."""

import time

import pytest
import ray
import torch

from actors.rollout_worker import RolloutWorker
from learners.group import LearnerGroup
from rlhf_cluster.data.tasks import load_tasks
from rlhf_cluster.driver import assign_advantages
from rlhf_cluster.experience import collate, shard_episodes
from rlhf_cluster.weight_sync import WeightSync, assign_transports, rollout_actor_class
from rlhf_cluster.weight_transport import WeightSyncError

SAMPLING = {"n": 2, "max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0}
SYSTEM = "you are a caring voice assistant ."


def learner_cfg(stage, suppress):
    return {"num_ranks": 2, "num_cpus_per_rank": 0.5, "num_gpus_per_rank": 0, "backend": "gloo",
            "zero_stage": stage, "lr": 1e-2, "weight_decay": 0.0, "grad_clip": 1.0,
            "micro_batch_size": 4, "ppo_epochs": 1, "clip_eps_low": 0.2, "clip_eps_high": 0.2,
            "kl_coef": 0.0, "loss_agg": "token_mean", "advantage_std_norm": True,
            "temperature": 1.0, "suppress_token_ids": suppress}


def start_worker(model_dir, i):
    return rollout_actor_class(RolloutWorker).options(num_cpus=0.25).remote(i, model_dir, system_prompt=SYSTEM)


def train_once(group, worker, tasks, probe, step):
    episodes = ray.get(worker.rollout.remote(tasks, SAMPLING, step))
    for i, ep in enumerate(episodes):
        ep.reward = float(i % 2)
    assign_advantages(episodes, std_norm=True)
    group.train_step([collate(s, probe.pad_token_id()) for s in shard_episodes(episodes, 2)])


def assert_serving(workers, version, learner_weights):
    for w in workers:
        assert ray.get(w.weight_version.remote()) == version
        served = ray.get(w.named_tensors.remote())
        assert served.keys() == learner_weights.keys()
        for name, tensor in learner_weights.items():
            assert torch.equal(served[name], tensor), name


def assert_learner_recomputes(group, episodes, probe):
    """The learner's logprobs of the sampled tokens equal the engine's: it served the weights."""
    shards = [collate(s, probe.pad_token_id()) for s in shard_episodes(episodes, 2)]
    for shard, lp in zip(shards, group.logprobs(shards)):
        mask = shard.loss_mask.bool()
        assert torch.allclose(lp[mask], shard.old_logprobs[mask], atol=1e-4)


def test_assign_transports():
    nodes = ["a", "b", "a"]
    assert assign_transports("auto", "a", nodes, "gloo") == ["shm", "broadcast", "shm"]
    assert assign_transports("auto", "a", nodes, "nccl") == ["broadcast"] * 3
    assert assign_transports("broadcast", "a", nodes, "gloo") == ["broadcast"] * 3
    assert assign_transports("object_store", "a", nodes, "gloo") == ["object_store"] * 3
    with pytest.raises(ValueError, match="worker #1 runs on node b"):
        assign_transports("shm", "a", nodes, "gloo")


@pytest.mark.parametrize("stage", [2, 3])
def test_every_transport_serves_the_learner_weights_after_each_sync(stage, ray_session, tiny_model_dir, synthetic_dir):
    tasks = load_tasks(synthetic_dir / "tasks.parquet").tasks[:4]
    workers = [start_worker(tiny_model_dir, i) for i in range(2)]
    probe = RolloutWorker(0, tiny_model_dir)  # in-process: the adapter's pad and masked ids
    group = LearnerGroup(tiny_model_dir, learner_cfg(stage, probe.adapter.suppress_token_ids),
                         name_prefix=f"sync-test-learner-z{stage}")
    try:
        initial = ray.get(workers[0].named_tensors.remote())
        version = 0
        # tiny buckets: many buckets per version, tensors larger than a bucket travel alone
        for transport in ("shm", "broadcast", "object_store"):
            sync = WeightSync(workers, group, transport=transport, bucket_mb=0.01, timeout_s=30)
            for _ in range(2):
                version += 1
                train_once(group, workers[0], tasks, probe, version)
                sync.publish(version)
                assert_serving(workers, version, group.named_tensors())
            if transport != "object_store":
                assert sync.last["buckets"] > 1 and sync.last["bytes"] > 0
            with pytest.raises(ValueError, match="must increase"):
                sync.publish(version)
            sync.close()
        learner_weights = group.named_tensors()
        assert any(not torch.equal(initial[k], learner_weights[k]) for k in initial)
        # the synced engine samples; the learner recomputes the same logprobs on those tokens
        episodes = ray.get(workers[1].rollout.remote(tasks, SAMPLING, 99))
        assert {ep.policy_version for ep in episodes} == {version}
        assert_learner_recomputes(group, episodes, probe)
    finally:
        group.shutdown()
        for w in workers:
            ray.kill(w)


def test_late_worker_and_dead_worker(ray_session, tiny_model_dir, synthetic_dir):
    """Elastic membership over the default (auto = shm here) transport."""
    tasks = load_tasks(synthetic_dir / "tasks.parquet").tasks[:4]
    probe = RolloutWorker(0, tiny_model_dir)
    workers = [start_worker(tiny_model_dir, 0)]
    group = LearnerGroup(tiny_model_dir, learner_cfg(3, probe.adapter.suppress_token_ids),
                         name_prefix="sync-test-elastic")
    late = None
    try:
        sync = WeightSync(workers, group, timeout_s=10)
        sync.publish(0)
        train_once(group, workers[0], tasks, probe, 1)
        sync.publish(1)
        assert sync.transports == ["shm"]
        # scale up mid-run: the newcomer serves v1 before it generates anything
        late = start_worker(tiny_model_dir, 1)
        assert sync.join(late) == 1
        assert_serving([late], 1, group.named_tensors())
        episodes = ray.get(late.rollout.remote(tasks[:1], SAMPLING, 2))
        assert {e.policy_version for e in episodes} == {1}
        train_once(group, workers[0], tasks, probe, 2)
        sync.publish(2)  # the group is re-formed with the newcomer in it
        assert sync.transports == ["shm", "shm"]
        assert_serving([workers[0], late], 2, group.named_tensors())
        # a worker dies: the next sync fails loudly and in bounded time, naming it
        ray.kill(late)
        train_once(group, workers[0], tasks, probe, 3)
        t0 = time.monotonic()
        with pytest.raises(WeightSyncError, match=r"rollout worker #1 .*died"):
            sync.publish(3)
        assert time.monotonic() - t0 < 60
        # drop it: the group re-forms with the survivors and syncing goes on
        sync.leave(late)
        sync.publish(4)
        assert_serving(workers, 4, group.named_tensors())
        sync.close()
    finally:
        group.shutdown()
        for w in workers + ([late] if late else []):
            ray.kill(w)
