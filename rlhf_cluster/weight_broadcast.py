"""Bucketed, versioned weight broadcast from learner rank 0 to rollout workers.

A dedicated torch.distributed process group (rank 0 = learner rank 0, ranks 1.. = rollout
workers) is built from its own TCPStore, independent of the learners' default group. A weight
version is streamed as size-bounded buckets: each bucket is one contiguous byte buffer holding
several tensors (any mix of dtypes, bit-exact), sent with ONE broadcast from rank 0. There are
no per-parameter round trips and no object-store copies.

Both sides derive the same bucket plan from the same `meta` (names, shapes, dtypes in order)
and `bucket_bytes`, so only `meta` (small) travels out of band, e.g. through a Ray call.
The sender packs bucket i+1 while bucket i is on the wire (two buffers); the receiver posts the
receive of bucket i+1 before handing bucket i to its sink.

    # learner rank 0 (actor)              # each rollout worker (actor), rank r in 1..N
    sender = WeightSender()               receiver = WeightReceiver()
    host, port = sender.listen()          receiver.join(host, port, r, N + 1)   # concurrently
    sender.join(host, port, 0, N + 1)
    sender.send(v, named_tensors, bb)     receiver.receive(v, meta, bb, apply_fn)  # concurrently
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

WeightMeta = list[tuple[str, tuple[int, ...], str]]  # (name, shape, dtype_str e.g. "torch.float32")

ALIGN = 16  # every tensor starts at a 16-byte offset in its bucket (so byte views can be re-typed)


def _dtype(dtype_str: str) -> torch.dtype:
    dtype = getattr(torch, dtype_str.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {dtype_str!r}")
    return dtype


def _nbytes(shape, dtype_str: str) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * _dtype(dtype_str).itemsize


def _padded(nbytes: int) -> int:
    return (nbytes + ALIGN - 1) // ALIGN * ALIGN


def weight_meta(named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> WeightMeta:
    """The meta of a state dict, in its iteration order."""
    items = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
    return [(name, tuple(t.shape), str(t.dtype)) for name, t in items]


def plan_buckets(meta: WeightMeta, bucket_bytes: int) -> list[list[int]]:
    """Split meta (in order) into buckets of indices.

    A bucket's size is the sum of its tensors' byte sizes, each rounded up to ALIGN (16) bytes;
    it stays <= bucket_bytes, except a single tensor larger than bucket_bytes travels alone.
    Deterministic: sender and receivers compute the same plan from the same arguments.
    """
    if bucket_bytes <= 0:
        raise ValueError("bucket_bytes must be positive")
    buckets: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, (_, shape, dtype_str) in enumerate(meta):
        size = _padded(_nbytes(shape, dtype_str))
        if current and used + size > bucket_bytes:
            buckets.append(current)
            current, used = [], 0
        current.append(i)
        used += size
        if used > bucket_bytes:  # a single oversized tensor: alone
            buckets.append(current)
            current, used = [], 0
    if current:
        buckets.append(current)
    return buckets


def _layout(meta: WeightMeta, bucket: list[int]) -> tuple[list[int], int]:
    """Byte offsets of the bucket's tensors and the bucket's total (padded) size."""
    offsets, off = [], 0
    for i in bucket:
        offsets.append(off)
        off += _padded(_nbytes(meta[i][1], meta[i][2]))
    return offsets, off


def _view(buf: torch.Tensor, offset: int, shape, dtype_str: str) -> torch.Tensor:
    n = _nbytes(shape, dtype_str)
    dtype = _dtype(dtype_str)
    raw = buf[offset:offset + n]
    if n == 0:
        return torch.empty(shape, dtype=dtype, device=buf.device)
    return raw.view(dtype).view(shape)


@dataclass
class BroadcastGroup:
    """A stand-alone process group plus what the send/recv helpers need to know about it."""

    pg: object  # ProcessGroupGloo | ProcessGroupNCCL
    store: object  # keep the TCPStore alive as long as the group
    rank: int
    world_size: int
    backend: str
    device: torch.device
    broadcasts: int = 0  # number of broadcast calls issued on this group (for tests/metrics)
    keep_buffers: bool = True  # reuse the two bucket buffers across versions (no re-faulting pages)
    _buffers: list = field(default_factory=list, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def broadcast(self, buf: torch.Tensor):
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        opts.rootTensor = 0
        with self._lock:
            self.broadcasts += 1
        return self.pg.broadcast([buf], opts)

    def buffers(self, cap: int, count: int) -> list[torch.Tensor]:
        """`count` byte buffers of at least `cap` bytes; cached when keep_buffers is set."""
        if len(self._buffers) >= count and all(b.numel() >= cap for b in self._buffers[:count]):
            return self._buffers[:count]
        self._buffers = []  # drop old ones before allocating
        bufs = [torch.empty(cap, dtype=torch.uint8, device=self.device) for _ in range(count)]
        if self.keep_buffers:
            self._buffers = bufs
        return bufs


def free_port() -> int:
    """A free TCP port on this node (bind to port 0, read it, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def node_ip() -> str:
    try:
        import ray.util

        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - outside Ray
        return "127.0.0.1"


def open_group(host: str, port: int, rank: int, world_size: int, backend: str = "gloo",
               timeout_s: float = 120) -> BroadcastGroup:
    """Join the dedicated weight-broadcast group; blocks until all world_size ranks joined.

    Rank 0 hosts the TCPStore at (host, port). Independent of any default process group.
    """
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, is_master=(rank == 0), timeout=timeout)
    if backend == "gloo":
        pg = dist.ProcessGroupGloo(store, rank, world_size, timeout)
        device = torch.device("cpu")
    elif backend == "nccl":
        if not dist.is_nccl_available():
            raise RuntimeError("torch was built without NCCL")
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        pg = dist.ProcessGroupNCCL(store, rank, world_size, opts)
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        raise ValueError(f"unknown backend {backend!r} (gloo or nccl)")
    return BroadcastGroup(pg=pg, store=store, rank=rank, world_size=world_size, backend=backend,
                          device=device)


def send_weights(group: BroadcastGroup, named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                 meta: WeightMeta, bucket_bytes: int) -> int:
    """Rank 0: broadcast the tensors bucket by bucket; returns the number of buckets.

    `named_tensors` may be a dict or a lazy iterable (e.g. a generator that gathers one ZeRO-3
    parameter at a time): it is consumed in meta order, so only ~2 buckets are held at once.
    Names, shapes and dtypes must match meta exactly (checked).
    """
    if group.rank != 0:
        raise RuntimeError("send_weights runs on rank 0 of the broadcast group")
    items = iter(named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors)
    plan = plan_buckets(meta, bucket_bytes)
    cap = max((_layout(meta, b)[1] for b in plan), default=0)
    buffers = group.buffers(cap, min(2, len(plan)))
    pending = [None, None]
    for k, bucket in enumerate(plan):
        slot = k % 2
        if pending[slot] is not None:  # buffer still on the wire from bucket k-2
            pending[slot].wait()
        offsets, size = _layout(meta, bucket)
        buf = buffers[slot][:size]
        for i, off in zip(bucket, offsets):
            name, shape, dtype_str = meta[i]
            try:
                got_name, tensor = next(items)
            except StopIteration:
                raise ValueError(f"named_tensors ended before {name!r}") from None
            if got_name != name or tuple(tensor.shape) != tuple(shape) or str(tensor.dtype) != dtype_str:
                raise ValueError(f"tensor #{i} is {got_name!r} {tuple(tensor.shape)} {tensor.dtype}, "
                                 f"meta says {name!r} {tuple(shape)} {dtype_str}")
            _view(buf, off, shape, dtype_str).copy_(tensor)
        pending[slot] = group.broadcast(buf)
    for work in pending:
        if work is not None:
            work.wait()
    if next(items, None) is not None:
        raise ValueError("named_tensors has more tensors than meta")
    return len(plan)


def recv_weights(group: BroadcastGroup, meta: WeightMeta, bucket_bytes: int,
                 sink: Callable[[dict[str, torch.Tensor]], None]) -> int:
    """Ranks 1..: receive every bucket and call sink({name: tensor}) once per bucket, in order.

    The tensors handed to sink are views into a reused receive buffer: sink must copy them
    (e.g. param.copy_(t)) before it returns. Returns the number of buckets.
    """
    if group.rank == 0:
        raise RuntimeError("recv_weights runs on ranks 1.. of the broadcast group")
    plan = plan_buckets(meta, bucket_bytes)
    layouts = [_layout(meta, b) for b in plan]
    cap = max((size for _, size in layouts), default=0)
    buffers = group.buffers(cap, min(2, len(plan)))

    def post(k):
        return group.broadcast(buffers[k % 2][:layouts[k][1]])

    work = post(0) if plan else None
    for k, bucket in enumerate(plan):
        work.wait()
        if k + 1 < len(plan):
            work = post(k + 1)  # the other buffer: its previous bucket was handed to sink already
        buf = buffers[k % 2]
        offsets, _ = layouts[k]
        sink({meta[i][0]: _view(buf, off, meta[i][1], meta[i][2]) for i, off in zip(bucket, offsets)})
    return len(plan)


class WeightSender:
    """Mixin/helper for learner rank 0: owns the sender end of the broadcast group."""

    def __init__(self):
        self._wb_group: BroadcastGroup | None = None
        self.sent_version = -1
        self.last_buckets = 0

    def listen(self) -> tuple[str, int]:
        """Pick this node's IP and a free port for the group's TCPStore; pass them to every rank."""
        return node_ip(), free_port()

    def join(self, host: str, port: int, rank: int = 0, world_size: int = 2, backend: str = "gloo",
             timeout_s: float = 120) -> int:
        if rank != 0:
            raise ValueError("the sender is rank 0")
        self._wb_group = open_group(host, port, 0, world_size, backend, timeout_s)
        return rank

    def send(self, version: int, named_tensors, bucket_bytes: int, meta: WeightMeta | None = None) -> int:
        """Broadcast one version; with a lazy iterable pass meta (a dict's meta is derived)."""
        if self._wb_group is None:
            raise RuntimeError("join the broadcast group first")
        if version <= self.sent_version:
            raise ValueError(f"weight versions must increase: got v{version} after v{self.sent_version}")
        if meta is None:
            if not isinstance(named_tensors, Mapping):
                raise ValueError("pass meta when named_tensors is not a dict")
            meta = weight_meta(named_tensors)
        self.last_buckets = send_weights(self._wb_group, named_tensors, meta, bucket_bytes)
        self.sent_version = version
        return version


class WeightReceiver:
    """Mixin/helper for a rollout worker: owns a receiver end of the broadcast group."""

    def __init__(self):
        self._wb_group: BroadcastGroup | None = None
        self.weights_version = -1
        self.last_buckets = 0

    def join(self, host: str, port: int, rank: int, world_size: int, backend: str = "gloo",
             timeout_s: float = 120) -> int:
        if rank < 1:
            raise ValueError("receivers are ranks 1..world_size-1")
        self._wb_group = open_group(host, port, rank, world_size, backend, timeout_s)
        return rank

    def receive(self, version: int, meta: WeightMeta, bucket_bytes: int,
                apply_fn: Callable[[dict[str, torch.Tensor]], None]) -> int:
        """Receive one version bucket by bucket into apply_fn; the version is recorded only after
        the last bucket was applied (a failure part-way leaves weights_version unchanged)."""
        if self._wb_group is None:
            raise RuntimeError("join the broadcast group first")
        if version <= self.weights_version:
            raise ValueError(f"weight versions must increase: got v{version} after v{self.weights_version}")
        self.last_buckets = recv_weights(self._wb_group, meta, bucket_bytes, apply_fn)
        self.weights_version = version
        return version


def copy_into(params: Mapping[str, torch.Tensor]) -> Callable[[dict[str, torch.Tensor]], None]:
    """An apply_fn that copies each received tensor in place into params[name] (no_grad)."""

    def apply(bucket: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, tensor in bucket.items():
                params[name].copy_(tensor)

    return apply
