"""Two simulated nodes (`ray.cluster_utils.Cluster`): with `sync.transport=auto` the worker on
learner rank 0's node is served through shared memory and the worker on the other node over
the broadcast group, in the same publish, and both serve the learner's exact weights after
every version (ZeRO-3). Runs in a subprocess: it needs its own Ray cluster, not the tests'."""

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = r"""
import sys
import ray
from ray.cluster_utils import Cluster

sys.path.insert(0, "tests")
from test_weight_sync import SYSTEM, assert_serving, learner_cfg, train_once
from actors.rollout_worker import RolloutWorker
from learners.group import LearnerGroup
from rlhf_cluster.data.tasks import load_tasks
from rlhf_cluster.weight_sync import WeightSync, rollout_actor_class

model_dir, tasks_path = sys.argv[1], sys.argv[2]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4})
cluster.add_node(num_cpus=0, resources={"node_b": 1})  # no CPUs: the learner cannot land there
ray.init(address=cluster.address)
try:
    cls = rollout_actor_class(RolloutWorker)
    workers = [cls.options(num_cpus=0.25).remote(0, model_dir, system_prompt=SYSTEM),
               cls.options(num_cpus=0, resources={"node_b": 0.5}).remote(1, model_dir, system_prompt=SYSTEM)]
    probe = RolloutWorker(0, model_dir)
    group = LearnerGroup(model_dir, learner_cfg(3, probe.adapter.suppress_token_ids), name_prefix="mn-learner")
    nodes = ray.get([w.sync_node.remote() for w in workers])
    assert nodes[0] != nodes[1], nodes
    tasks = load_tasks(tasks_path).tasks[:4]
    sync = WeightSync(workers, group, transport="auto", bucket_mb=0.01, timeout_s=60)
    for version in (1, 2, 3):
        train_once(group, workers[0], tasks, probe, version)
        sync.publish(version)
        assert_serving(workers, version, group.named_tensors())
    assert sync.transports == ["shm", "broadcast"], sync.transports
    assert sync.last["buckets"] > 1
    sync.close()
    group.shutdown()
    print("MIXED-TRANSPORTS-OK", sync.transports, flush=True)
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def test_shm_and_broadcast_in_one_publish_across_two_nodes(tiny_model_dir, synthetic_dir):
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_model_dir), str(synthetic_dir / "tasks.parquet")],
                         capture_output=True, text=True, timeout=600, env=env, cwd=root)
    assert out.returncode == 0 and "MIXED-TRANSPORTS-OK" in out.stdout, (out.stdout[-3000:], out.stderr[-5000:])
