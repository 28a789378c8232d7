"""Zero-copy shm sync: rollout engines serve the learner's weights straight out of the
double-buffered segment (no copy-in), bit for bit, version after version, alternating slots;
re-formed groups move them into the new segment; a copy (object store) after an adoption never
writes into the segment the other workers serve from; mismatched dtypes fall back to a private
copy; tied weights stay tied; incomplete sets are refused."""

import pytest
import ray
import torch

from actors.hf_engine import HFEngine
from actors.rollout_worker import RolloutWorker
from learners.group import LearnerGroup
from rlhf_cluster.data.tasks import load_tasks
from rlhf_cluster.weight_adopt import adopt_into
from rlhf_cluster.weight_sync import WeightSync, rollout_actor_class
from test_weight_sync import (SAMPLING, SYSTEM, assert_learner_recomputes, assert_serving, learner_cfg,
                              train_once)


def _probed_worker_class():
    """A real RolloutWorker that can also say where its engine's parameters live (defined in a
    function so Ray ships it by value: the test module is not importable in workers)."""

    class ProbedWorker(RolloutWorker):
        def storage(self) -> dict:
            """{"slots": {name: slot of the current segment, or None}, "borrowed": [names]}"""
            segment = self.weight_receiver.segment
            engine = self.engine._engine
            slots = {}
            for name, p in engine.model.named_parameters():
                slots[name] = None
                if segment is not None:
                    offset = p.data_ptr() - segment.tensor.data_ptr()
                    k = offset // segment.stride
                    if 0 <= offset and k < 2 and offset - k * segment.stride < segment.slot_bytes:
                        slots[name] = k
            return {"slots": slots, "borrowed": sorted(engine._borrowed)}

    return rollout_actor_class(ProbedWorker)


def start(model_dir, i):
    return _probed_worker_class().options(num_cpus=0.25).remote(i, model_dir, system_prompt=SYSTEM)


def served_slot(worker) -> int:
    """The one slot of the current segment every parameter of `worker` lives in."""
    report = ray.get(worker.storage.remote())
    slots = set(report["slots"].values())
    assert len(slots) == 1 and None not in slots, f"parameters outside one slot of the segment: {slots}"
    assert report["borrowed"] == sorted(report["slots"])
    return slots.pop()


@pytest.fixture(scope="module")
def rig(ray_session, tiny_model_dir, synthetic_dir):
    tasks = load_tasks(synthetic_dir / "tasks.parquet").tasks[:4]
    probe = RolloutWorker(0, tiny_model_dir)
    group = LearnerGroup(tiny_model_dir, learner_cfg(2, probe.adapter.suppress_token_ids),
                         name_prefix="adopt-test-learner")
    workers = [start(tiny_model_dir, i) for i in range(2)]
    yield group, workers, tasks, probe
    group.shutdown()
    for w in workers:
        ray.kill(w)


def test_shm_sync_serves_from_the_segment_in_alternating_slots(rig):
    group, workers, tasks, probe = rig
    sync = WeightSync(workers, group, transport="shm", bucket_mb=0.01, timeout_s=30)
    try:
        slots = []
        for version in (1, 2, 3):
            train_once(group, workers[0], tasks, probe, version)
            # worker 1 generates while the version is received and adopted beside it
            previous = ray.get(workers[1].weight_version.remote())
            busy = workers[1].rollout.remote(tasks, SAMPLING, version)
            sync.publish(version)
            episodes = ray.get(busy, timeout=120)
            assert len(episodes) == len(tasks) * SAMPLING["n"]
            assert {ep.policy_version for ep in episodes} <= {previous, version}
            assert_serving(workers, version, group.named_tensors())
            slots.append({served_slot(w) for w in workers})
        assert slots == [{0}, {1}, {0}]  # both workers adopted, version after version
        # the adopted engine generates with the learner's weights (logprobs recomputed equal)
        episodes = ray.get(workers[0].rollout.remote(tasks, SAMPLING, 9))
        assert {ep.policy_version for ep in episodes} == {3}
        assert_learner_recomputes(group, episodes, probe)
    finally:
        sync.close()


def test_regrouping_and_object_store_after_adopt_keep_the_served_weights(rig, tiny_model_dir):
    group, workers, tasks, probe = rig
    sync = WeightSync(list(workers), group, transport="shm", bucket_mb=0.01, timeout_s=30)
    late = start(tiny_model_dir, 2)
    try:
        train_once(group, workers[0], tasks, probe, 10)
        sync.publish(10)
        # every end closed, the segment file gone: the engines still serve from their mapping
        sync.close()
        assert_serving(workers, 10, group.named_tensors())
        assert all(set(ray.get(w.storage.remote())["borrowed"]) for w in workers)
        # join: the newcomer is served a private copy; the others keep serving their slot
        assert sync.join(late) == 10
        assert ray.get(late.storage.remote())["borrowed"] == []
        assert_serving(workers + [late], 10, group.named_tensors())
        # re-formed group (new segment): the first version moves everyone into it
        train_once(group, workers[0], tasks, probe, 11)
        sync.publish(11)
        assert sync.transports == ["shm"] * 3
        assert_serving(workers + [late], 11, group.named_tensors())
        assert {served_slot(w) for w in workers + [late]} == {0}  # slot 0 of the NEW segment
        # leave: re-formed again without it, still right
        sync.leave(late)
        train_once(group, workers[0], tasks, probe, 12)
        sync.publish(12)
        learner = group.named_tensors()
        assert_serving(workers, 12, learner)
        assert {served_slot(w) for w in workers} == {0}
        # an object-store push to worker 0 after it adopted: copied into private storage, not
        # into the segment worker 1 serves from
        pushed = {k: v + 1 for k, v in learner.items()}
        WeightSync([workers[0]], receive_group="weights").push(100, pushed)
        assert_serving([workers[0]], 100, pushed)
        assert ray.get(workers[0].storage.remote())["borrowed"] == []
        assert set(ray.get(workers[0].storage.remote())["slots"].values()) == {None}
        assert_serving([workers[1]], 12, learner)
        # and the next shm version is adopted again
        train_once(group, workers[1], tasks, probe, 13)
        sync.publish(13)
        assert_serving(workers, 13, group.named_tensors())
        assert {served_slot(w) for w in workers} == {1}
    finally:
        sync.close()
        ray.kill(late)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return HFEngine(tiny_model_dir)


def test_mismatched_dtype_falls_back_to_a_private_copy(engine):
    params = dict(engine.model.named_parameters())
    names = sorted(params)
    first = {k: torch.randn_like(p) for k, p in params.items()}
    engine.adopt_weights(1, first)
    assert engine.weight_version == 1
    assert all(params[k].data_ptr() == first[k].data_ptr() for k in names)  # adopted, no copy
    # half the tensors come as bfloat16: those are copied (converted) into private storage
    second = {k: (torch.randn_like(p).to(torch.bfloat16) if i % 2 else torch.randn_like(p))
              for i, (k, p) in enumerate(sorted(params.items()))}
    snapshot = {k: t.clone() for k, t in first.items()}
    engine.adopt_weights(2, second)
    params = dict(engine.model.named_parameters())
    for i, k in enumerate(names):
        assert torch.equal(params[k], second[k].to(params[k].dtype)), k
        assert params[k].dtype == torch.float32
        if i % 2:
            assert params[k].data_ptr() not in (second[k].data_ptr(), first[k].data_ptr()), k
        else:
            assert params[k].data_ptr() == second[k].data_ptr(), k
    assert engine._borrowed == {k for i, k in enumerate(names) if not i % 2}
    # the previously adopted tensors were never written (other workers may serve them)
    assert all(torch.equal(first[k], snapshot[k]) for k in names)
    # a plain update after the adoption copies into private storage, the adopted tensors untouched
    kept = {k: t.clone() for k, t in second.items()}
    third = {k: torch.randn_like(p) for k, p in params.items()}
    engine.update_weights(3, third)
    params = dict(engine.model.named_parameters())
    assert engine._borrowed == set() and engine.weight_version == 3
    for k in names:
        assert torch.equal(params[k], third[k]) and params[k].data_ptr() != third[k].data_ptr()
        assert torch.equal(second[k], kept[k]), k
    served = engine.named_tensors()
    assert all(served[k].data_ptr() != params[k].data_ptr() for k in names)  # clones


def test_adopt_refuses_unknown_and_missing_names(engine):
    named = {k: torch.zeros_like(p) for k, p in engine.model.named_parameters()}
    dropped = sorted(named)[0]
    version = engine.weight_version
    with pytest.raises(KeyError, match=rf"missing \['{dropped}'\]"):
        engine.adopt_weights(7, {k: v for k, v in named.items() if k != dropped})
    with pytest.raises(KeyError, match=r"unknown names \['not.a.param'\]"):
        engine.adopt_weights(7, {**named, "not.a.param": torch.zeros(1)})
    assert engine.weight_version == version  # nothing swapped


def test_tied_weights_stay_tied():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.head = torch.nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight

    model = Tied()
    params = dict(model.named_parameters())
    assert sorted(params) == ["embed.weight"]  # named_parameters yields a shared parameter once
    weight = torch.randn(10, 4)
    borrowed: set[str] = set()
    assert adopt_into(1, params, {"embed.weight": weight}, borrowed) == 1
    assert model.head.weight is model.embed.weight
    assert model.head.weight.data_ptr() == weight.data_ptr() and borrowed == {"embed.weight"}
    assert torch.equal(model.head(torch.eye(4)), weight.T)
