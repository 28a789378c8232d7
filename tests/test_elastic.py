"""Elastic rollout workers with real actors: a worker added while a job runs serves the
learner's current weights before its first episode, a removed one delivers the batches it
already holds and is killed only then, and the client's target is validated."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import torch

from rlhf_cluster import cli
from rlhf_cluster.config import ConfigError, load_config
from rlhf_cluster.data.tasks import load_tasks
from rlhf_cluster.cluster import kill_actors, stop_actors
from rlhf_cluster.driver import collect_rollouts, start_actors, submit_rollouts
from rlhf_cluster.elastic import Scaler, ScaleControl, scale_rollout_workers
from rlhf_cluster.experience import collate

NO_RM = ["reward.services.preference.enabled=false", "reward.weights.preference=0",
         "reward.normalize.preference=none"]
SAMPLING = {"n": 2, "max_new_tokens": 6, "temperature": 1.0, "top_p": 1.0}


def _config(tmp_path, tiny_model_dir, synthetic_dir, *overrides):
    return load_config("configs/quickstart.yaml", [
        f"run.output_dir={tmp_path}", f"model.path={tiny_model_dir}",
        f"data.train_path={synthetic_dir / 'tasks.parquet'}", "learner.num_ranks=1",
        "learner.num_cpus_per_rank=0.5", "rollout.num_cpus_per_worker=0.5", *NO_RM, *overrides])


def _apply_until(scaler, step, trained_batch, done, timeout_s=120):
    import time

    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "the scaler did not reach its target in time"
        scaler.apply(step, trained_batch)
        time.sleep(0.2)


def test_scale_up_and_down_keeps_weights_versions_and_episodes(tmp_path, ray_session, tiny_model_dir,
                                                               synthetic_dir):
    cfg = _config(tmp_path, tiny_model_dir, synthetic_dir, "rollout.max_workers=2")
    tasks = load_tasks(cfg.data.train_path).tasks
    actors = start_actors(cfg)
    scaler = None
    try:
        actors.sync.publish(0)
        scaler = Scaler(cfg, actors, tmp_path)
        # train one step so that the learner's weights are not the model files' any more
        batch = collect_rollouts(scaler.submit(1, lambda: submit_rollouts(actors, tasks[:2], SAMPLING, 1)), 1)
        actors.learner.train_step([collate(batch, actors.adapter.pad_id)], objective="sft")
        actors.sync.publish(1)

        assert scale_rollout_workers(2)["target"] == 2  # what `rlhf-cluster scale 2` does
        with pytest.raises(ValueError, match="rollout.max_workers=2"):
            scale_rollout_workers(3)
        _apply_until(scaler, 2, 1, lambda: len(actors.workers) == 2)
        new = actors.workers[1]
        assert ray.get(new.weight_version.remote()) == 1  # the current version, before any episode
        learner = actors.learner.named_tensors()
        served = ray.get(new.named_tensors.remote())
        assert served.keys() == learner.keys()
        assert all(torch.equal(served[k], learner[k]) for k in learner)

        eps = collect_rollouts(scaler.submit(2, lambda: submit_rollouts(actors, tasks[:4], SAMPLING, 2)), 2)
        assert {e.worker for e in eps} == {0, 1} and {e.policy_version for e in eps} == {1}
        actors.sync.publish(2)  # the groups are re-formed with the newcomer in them
        assert ray.get([w.weight_version.remote() for w in actors.workers]) == [2, 2]

        held = scaler.submit(3, lambda: submit_rollouts(actors, tasks[:4], SAMPLING, 3))
        scale_rollout_workers(1)
        scaler.apply(3, 2)  # batch 3 is not collected yet: worker 1 leaves but stays alive
        assert actors.workers == actors.sync.workers and len(actors.workers) == 1
        eps = collect_rollouts(held, 3)
        assert {e.worker for e in eps} == {0, 1}  # nothing it held is lost
        scaler.apply(4, 3)  # now it is killed
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(new.ready.remote(), timeout=30)
        actors.sync.publish(3)
        assert ray.get(actors.workers[0].weight_version.remote()) == 3

        events = [json.loads(line) for line in (tmp_path / "scaling.jsonl").read_text().splitlines()]
        assert [(e["action"], e["worker"]) for e in events] == [
            ("starting", 1), ("joined", 1), ("left", 1), ("killed", 1)]
        assert events[1]["version"] == 1
        assert ray.get(scaler.control.status.remote())["workers"] == 1
    finally:
        if scaler:
            scaler.close()
        stop_actors(actors.sync.workers)
        kill_actors(list(actors.services.values()))
        actors.sync.close()
        actors.learner.shutdown()


def test_scale_without_a_running_job_and_bad_limits(tmp_path, ray_session, tiny_model_dir, synthetic_dir, capsys):
    assert cli.main(["scale", "2", "--namespace", "no-such-job"]) == 2
    assert "no RL stage running in Ray namespace 'no-such-job'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="rollout.max_workers=1 must be >= rollout.num_workers=2"):
        _config(tmp_path, tiny_model_dir, synthetic_dir, "rollout.num_workers=2", "rollout.max_workers=1")



def test_a_second_job_in_a_busy_namespace_fails_before_starting_actors(tmp_path, ray_session, tiny_model_dir,
                                                                        synthetic_dir):
    from rlhf_cluster.driver import run

    holder = ray.remote(ScaleControl).options(name="rollout-scale", num_cpus=0).remote(1, None)
    ray.get(holder.target.remote())
    try:
        with pytest.raises(RuntimeError, match=r"cluster.namespace='rlhf-tests' already has running named "
                                               r"actors \(rollout-scale\).*cluster.namespace=rlhf-tests-2"):
            run(_config(tmp_path, tiny_model_dir, synthetic_dir, "run.stages=[rl]"))
        assert sorted(ray.util.list_named_actors()) == ["rollout-scale"]  # it started nothing
    finally:
        kill_actors([holder])


HOLDER = """
import sys, ray
from rlhf_cluster.elastic import CONTROL_NAME, ScaleControl
ray.init(num_cpus=1, include_dashboard=False, namespace="job-ns")  # token auth on (Ray's default)
control = ray.remote(ScaleControl).options(name=CONTROL_NAME, num_cpus=0).remote(1, 4)
ray.get(control.report.remote({"workers": 1, "starting": 0, "retiring": 0, "step": 7, "version": 7}))
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()  # until the test is done
print("target", ray.get(control.target.remote()), flush=True)
"""


def test_scale_cli_joins_a_token_auth_cluster_from_another_process():
    """`rlhf-cluster scale` from a fresh process: token auth on, the job's actor found by name."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    holder = subprocess.Popen([sys.executable, "-c", HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=env, cwd=root)
    try:
        address = holder.stdout.readline().strip()
        assert address, "the job stand-in did not start"
        out = subprocess.run([sys.executable, "-m", "rlhf_cluster.cli", "scale", "3", "--address", address,
                              "--namespace", "job-ns"], capture_output=True, text=True, timeout=120, env=env,
                             cwd=root)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "rollout workers: target 3, running 1" in out.stdout
        rest, _ = holder.communicate(input="", timeout=60)
        assert "target 3" in rest
    finally:
        holder.kill()
