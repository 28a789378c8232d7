"""Rollout calls that queue up while the engine is busy are generated in one engine run, and
every caller still gets exactly its own episodes."""

import threading
import time

import pytest
import ray

from actors.call_batcher import CallBatcher
from actors.rollout_worker import RolloutWorker
from rlhf_cluster.data.tasks import load_tasks
from rlhf_cluster.weight_sync import rollout_actor_class

SYSTEM = "you are a caring voice assistant ."
GREEDY = {"n": 2, "max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0, "greedy": True}


def _start(batcher, item, out):
    t = threading.Thread(target=lambda: out.__setitem__(item, _call(batcher, item)))
    t.start()
    return t


def _call(batcher, item):
    try:
        return batcher(item)
    except RuntimeError as exc:
        return f"error: {exc}"


def test_calls_waiting_while_busy_run_together_by_key():
    release, runs = threading.Event(), []

    def run_many(items):
        runs.append(list(items))
        if items == [("a", 0)]:
            release.wait(10)  # the engine is busy with the first call
        if ("b", 2) in items:
            raise RuntimeError("boom")
        return [f"{k}{v}!" for k, v in items]

    batcher = CallBatcher(run_many, key=lambda item: item[0])
    out = {}
    threads = [_start(batcher, ("a", 0), out)]
    while not runs:
        time.sleep(0.01)
    for item in [("a", 1), ("b", 2), ("a", 3)]:
        threads.append(_start(batcher, item, out))
    time.sleep(0.3)  # all three are waiting behind the busy run
    release.set()
    for t in threads:
        t.join(10)
    assert runs[0] == [("a", 0)]
    assert sorted(runs[1:]) == [[("a", 1), ("a", 3)], [("b", 2)]]  # one run per key
    assert out == {("a", 0): "a0!", ("a", 1): "a1!", ("a", 3): "a3!", ("b", 2): "error: boom"}
    assert (batcher.runs, batcher.calls) == (3, 4)


@pytest.fixture(scope="module")
def tasks(synthetic_dir):
    return load_tasks(synthetic_dir / "tasks.parquet").tasks[:4]


def test_merged_run_gives_each_batch_the_episodes_of_separate_runs(tiny_model_dir, tasks):
    """Greedy decoding: two batches (one prompt in both) generated together equal the same
    batches generated one by one, token for token, with their own step in the episode ids."""
    rollout_many = RolloutWorker(0, str(tiny_model_dir), system_prompt=SYSTEM)._rollout_many
    first, second = tasks[:3], [tasks[2], tasks[3]]
    merged = rollout_many([(first, GREEDY, 5), (second, GREEDY, 6)])
    separate = [rollout_many([(first, GREEDY, 5)])[0], rollout_many([(second, GREEDY, 6)])[0]]
    assert [len(b) for b in merged] == [6, 4]
    for got, want, step, batch in zip(merged, separate, (5, 6), (first, second)):
        assert [e.prompt_id for e in got] == [t.prompt_id for t in batch for _ in range(2)]
        assert [e.sample_index for e in got] == [0, 1] * len(batch)
        assert all(e.episode_id.startswith(f"s{step:06d}-") for e in got)
        assert [e.token_ids for e in got] == [e.token_ids for e in want]
        for g, w in zip(got, want):
            assert g.logprobs == pytest.approx(w.logprobs, abs=1e-4)


def test_rollout_actor_merges_queued_calls(ray_session, tiny_model_dir, tasks):
    """A real rollout actor: calls queued behind a running one share the next engine run."""
    actor = rollout_actor_class(RolloutWorker).options(num_cpus=0).remote(
        0, str(tiny_model_dir), system_prompt=SYSTEM, simulated_token_latency_s=0.05)
    try:
        ray.get(actor.ready.remote())
        sampling = {"n": 2, "max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0}
        refs = [actor.rollout.remote([tasks[k]], sampling, k) for k in range(4)]
        results = ray.get(refs)
        for k, episodes in enumerate(results):
            assert [e.prompt_id for e in episodes] == [tasks[k].prompt_id] * 2
            assert all(e.episode_id.startswith(f"s{k:06d}-") for e in episodes)
        merged = ray.get(actor.merged_runs.remote())
        assert merged["calls"] == 4 and merged["runs"] < 4
    finally:
        ray.kill(actor)
