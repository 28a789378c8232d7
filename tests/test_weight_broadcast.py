"""Bucketed weight broadcast over a dedicated gloo group between Ray actors."""

import pytest
import torch

from rlhf_cluster.weight_broadcast import (
    WeightReceiver,
    WeightSender,
    copy_into,
    plan_buckets,
    weight_meta,
)


def test_plan_buckets_hand_computed():
    f32, bf16 = "torch.float32", "torch.bfloat16"
    meta = [
        ("a", (4,), f32),      # 16 bytes
        ("b", (8,), f32),      # 32
        ("c", (4,), bf16),     # 8 -> padded to 16
        ("d", (40,), f32),     # 160 > 64: alone
        ("e", (16,), f32),     # 64: exactly a bucket
        ("f", (2,), f32),      # 8 -> 16
        ("g", (3,), f32),      # 12 -> 16
    ]
    assert plan_buckets(meta, 64) == [[0, 1, 2], [3], [4], [5, 6]]
    assert plan_buckets(meta, 48) == [[0, 1], [2], [3], [4], [5, 6]]
    assert plan_buckets(meta, 10_000) == [[0, 1, 2, 3, 4, 5, 6]]
    assert plan_buckets([], 64) == []
    # every tensor once, in order
    for bb in (1, 16, 33, 100, 1000):
        assert [i for b in plan_buckets(meta, bb) for i in b] == list(range(len(meta)))


def _peer_class(ray):
    @ray.remote(num_cpus=0.25)
    class Peer:
        def __init__(self, sender: bool):
            self.end = WeightSender() if sender else WeightReceiver()
            self.params = {}
            self.seen_versions = []  # receiver's version as seen while each bucket is applied

        def address(self):
            return self.end.listen()

        def join(self, host, port, rank, world_size):
            return self.end.join(host, port, rank, world_size, backend="gloo", timeout_s=60)

        def send(self, version, tensors, bucket_bytes):
            self.end.send(version, tensors, bucket_bytes)
            return self.end.last_buckets, self.end._wb_group.broadcasts

        def receive(self, version, meta, bucket_bytes):
            if not self.params:
                self.params = {n: torch.zeros(s, dtype=getattr(torch, d.split(".")[-1])) for n, s, d in meta}
            copy = copy_into(self.params)

            def apply(bucket):
                self.seen_versions.append((self.end.weights_version, sorted(bucket)))
                copy(bucket)

            self.end.receive(version, meta, bucket_bytes, apply)
            return self.end.weights_version, self.end.last_buckets, self.end._wb_group.broadcasts

        def state(self):
            return self.params, self.seen_versions

    return Peer


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


def test_broadcast_between_ray_actors(ray_session):
    ray = ray_session
    Peer = _peer_class(ray)
    sender = Peer.remote(True)
    receivers = [Peer.remote(False) for _ in range(2)]
    host, port = ray.get(sender.address.remote())
    assert host and port > 0
    joins = [sender.join.remote(host, port, 0, 3)] + [
        r.join.remote(host, port, i + 1, 3) for i, r in enumerate(receivers)]
    assert ray.get(joins, timeout=90) == [0, 1, 2]

    bucket_bytes = 1024
    total_broadcasts = 0
    for version, seed in ((1, 0), (2, 1)):
        weights = _weights(seed)
        meta = weight_meta(weights)
        plan = plan_buckets(meta, bucket_bytes)
        # the 4096-byte tensor is larger than a bucket and travels alone; still fewer buckets than tensors
        assert [2] in plan and 1 < len(plan) < len(meta)
        recv_refs = [r.receive.remote(version, meta, bucket_bytes) for r in receivers]
        buckets, broadcasts = ray.get(sender.send.remote(version, weights, bucket_bytes), timeout=60)
        total_broadcasts += len(plan)
        assert buckets == len(plan)
        assert broadcasts == total_broadcasts  # one broadcast per bucket, not per parameter
        for served, rbuckets, rbroadcasts in ray.get(recv_refs, timeout=60):
            assert (served, rbuckets, rbroadcasts) == (version, len(plan), total_broadcasts)
        for r in receivers:
            params, seen = ray.get(r.state.remote())
            assert set(params) == set(weights)
            for name, tensor in weights.items():
                assert params[name].dtype == tensor.dtype
                assert torch.equal(params[name], tensor), name
            # while buckets of this version were being applied the old version was still reported
            this = seen[-len(plan):]
            assert [v for v, _ in this] == [version - 1 if version > 1 else -1] * len(plan)
            assert [names for _, names in this] == [sorted(meta[i][0] for i in b) for b in plan]

    # versions must increase
    with pytest.raises(ray.exceptions.RayTaskError):
        ray.get(sender.send.remote(2, _weights(0), bucket_bytes), timeout=30)
    for actor in [sender, *receivers]:
        ray.kill(actor)
