"""The transport ends between plain Ray actors: bucket plans and flat layouts against
hand-computed values, bit-exact delivery of mixed dtypes over shm and over gloo broadcast
(one broadcast per bucket, never per parameter), and bounded-time, clear failures when a
receiver is absent or dies."""

import time

import pytest
import torch

from rlhf_cluster.weight_broadcast import Layout, plan_buckets, weight_meta
from rlhf_cluster.weight_transport import ReceiverEnd, SenderEnd

F32, BF16 = "torch.float32", "torch.bfloat16"


def test_plan_buckets_hand_computed():
    meta = [
        ("a", (4,), F32),      # 16 bytes
        ("b", (8,), F32),      # 32
        ("c", (4,), BF16),     # 8 -> padded to 16
        ("d", (40,), F32),     # 160 > 64: alone
        ("e", (16,), F32),     # 64: exactly a bucket
        ("f", (2,), F32),      # 8 -> 16
        ("g", (3,), F32),      # 12 -> 16
    ]
    assert plan_buckets(meta, 64) == [[0, 1, 2], [3], [4], [5, 6]]
    assert plan_buckets(meta, 48) == [[0, 1], [2], [3], [4], [5, 6]]
    assert plan_buckets(meta, 10_000) == [[0, 1, 2, 3, 4, 5, 6]]
    assert plan_buckets([], 64) == []
    for bb in (1, 16, 33, 100, 1000):  # every tensor once, in order
        assert [i for b in plan_buckets(meta, bb) for i in b] == list(range(len(meta)))
    layout = Layout.build(meta, 64)
    assert layout.ranges == [(0, 64), (64, 224), (224, 288), (288, 320)]
    assert layout.offsets == [0, 16, 48, 64, 224, 288, 304]
    assert layout.total == 320 and layout.max_bucket == 160


def _weights(seed):
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(32, 8, generator=g),                       # 1024 B
        "layer.0.q.weight": torch.randn(8, 8, generator=g).to(torch.bfloat16),  # 128 B
        "layer.0.mlp.weight": torch.randn(64, 16, generator=g),                 # 4096 B > bucket
        "layer.0.norm.weight": torch.randn(8, generator=g).to(torch.bfloat16),  # 16 B
        "layer.0.bias": torch.randn(5, generator=g),                            # 20 -> 32 B
        "head.weight": torch.randn(16, 8, generator=g).to(torch.bfloat16),      # 256 B
    }


def _peers(ray):
    @ray.remote(num_cpus=0.25)
    class Sender:
        def __init__(self):
            self.end = SenderEnd()

        def address(self):
            return self.end.address()

        def connect(self, spec):
            self.end.connect(spec)

        def send(self, version, weights):
            info = self.end.send(version, iter(weights.items()))
            groups = [g for g in (self.end.shm_group, self.end.bcast_group) if g]
            return info, sum(g.broadcasts for g in groups)

    @ray.remote(num_cpus=0.25)
    class Receiver:
        def __init__(self):
            self.end = ReceiverEnd()
            self.applied = []  # (version, {name: copy}) per apply call

        def connect(self, spec):
            self.end.connect(spec)

        def receive(self, version):
            return self.end.receive(version, lambda v, named: self.applied.append(
                (v, {k: t.clone() for k, t in named.items()})))

        def applied_versions(self):
            return self.applied

    return Sender, Receiver


def _specs(address, kind, n, timeout_s=30, bucket_bytes=1024):
    meta = weight_meta(_weights(0))
    port = address["shm_port" if kind == "shm" else "bcast_port"]
    group = {"host": address["host"], "port": port, "world_size": n + 1, "backend": "gloo"}
    if kind == "shm":
        group["path"] = f"/dev/shm/rlhf-weights-test-{port}"
    common = {"meta": meta, "bucket_bytes": bucket_bytes, "timeout_s": timeout_s}
    return {**common, kind: group}, [{**common, kind: group, "kind": kind, "rank": r} for r in range(1, n + 1)]


@pytest.mark.parametrize("kind", ["shm", "broadcast"])
def test_versions_arrive_bit_exact_between_actors(kind, ray_session):
    ray = ray_session
    Sender, Receiver = _peers(ray)
    sender, receivers = Sender.remote(), [Receiver.remote() for _ in range(2)]
    send_spec, recv_specs = _specs(ray.get(sender.address.remote()), kind, 2)
    ray.get([sender.connect.remote(send_spec)] + [r.connect.remote(s) for r, s in zip(receivers, recv_specs)],
            timeout=60)
    buckets = len(plan_buckets(send_spec["meta"], 1024))
    assert 1 < buckets < len(send_spec["meta"])  # several tensors share buckets; the big one is alone
    for version, seed in ((1, 0), (2, 1)):
        done = [r.receive.remote(version) for r in receivers]
        info, broadcasts = ray.get(sender.send.remote(version, _weights(seed)), timeout=60)
        assert ray.get(done, timeout=60) == [version, version]
        assert info["buckets"] == buckets
        # shm: only barriers travel; broadcast: exactly one broadcast per bucket
        assert broadcasts == (0 if kind == "shm" else version * buckets)
        expected = _weights(seed)
        for r in receivers:
            v, named = ray.get(r.applied_versions.remote())[-1]
            assert v == version and named.keys() == expected.keys()  # one complete set per version
            for name, tensor in expected.items():
                assert named[name].dtype == tensor.dtype and torch.equal(named[name], tensor), name
    with pytest.raises(ray.exceptions.RayTaskError, match="must increase"):
        ray.get(sender.send.remote(2, _weights(0)), timeout=30)
    for actor in [sender, *receivers]:
        ray.kill(actor)


def test_absent_receiver_fails_group_forming_in_bounded_time(ray_session):
    ray = ray_session
    Sender, Receiver = _peers(ray)
    sender, receiver = Sender.remote(), Receiver.remote()
    send_spec, recv_specs = _specs(ray.get(sender.address.remote()), "broadcast", 2, timeout_s=5)
    t0 = time.monotonic()
    refs = [sender.connect.remote(send_spec), receiver.connect.remote(recv_specs[0])]  # rank 2 never comes
    for ref in refs:
        with pytest.raises(ray.exceptions.RayTaskError, match="forming the sync group|joining the broadcast"):
            ray.get(ref, timeout=60)
    assert time.monotonic() - t0 < 30
    for actor in (sender, receiver):
        ray.kill(actor)


@pytest.mark.parametrize("kind", ["shm", "broadcast"])
def test_dead_receiver_fails_the_send_in_bounded_time(kind, ray_session):
    ray = ray_session
    Sender, Receiver = _peers(ray)
    sender, receivers = Sender.remote(), [Receiver.remote() for _ in range(2)]
    send_spec, recv_specs = _specs(ray.get(sender.address.remote()), kind, 2, timeout_s=5)
    ray.get([sender.connect.remote(send_spec)] + [r.connect.remote(s) for r, s in zip(receivers, recv_specs)],
            timeout=60)
    ray.kill(receivers[1])
    alive = receivers[0].receive.remote(1)
    t0 = time.monotonic()
    with pytest.raises(ray.exceptions.RayTaskError, match=r"weight sync v1: sending failed .*sync.timeout_s=5"):
        ray.get(sender.send.remote(1, _weights(0)), timeout=60)
    assert time.monotonic() - t0 < 30
    with pytest.raises(ray.exceptions.RayTaskError, match="weight sync v1: receiving"):
        ray.get(alive, timeout=60)
    for actor in (sender, receivers[0]):
        ray.kill(actor)


def test_nccl_backend_without_cuda_is_a_clear_error():
    from rlhf_cluster.weight_broadcast import free_port, open_group

    if torch.cuda.is_available():
        pytest.skip("this box has CUDA: the NCCL group would form")
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="sync.backend=gloo"):
        open_group("127.0.0.1", free_port(), 0, 2, "nccl", timeout_s=60)
    assert time.monotonic() - t0 < 5  # refused before any rendezvous
    with pytest.raises(ValueError, match="gloo or nccl"):
        open_group("127.0.0.1", free_port(), 0, 2, "mpi")
