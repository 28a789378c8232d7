"""Building blocks of the weight-sync transports: bucket plans, flat layouts, process groups.

A weight version is a list of tensors described by `meta` (names, shapes, dtypes, in order).
It travels as size-bounded buckets: each bucket is one contiguous byte range holding several
tensors (any mix of dtypes, bit-exact, each at a 16-byte aligned offset). Sender and receivers
derive the same plan from the same `meta` and `bucket_bytes`, so only `meta` (small) travels
out of band. The buckets laid end to end form the `Layout` of one flat byte buffer: the
receive buffer of a broadcast receiver, or the shared-memory segment of same-node workers.

The dedicated torch.distributed group (rank 0 = learner rank 0, ranks 1.. = rollout workers)
is built from its own TCPStore, independent of the learners' default group, with a timeout
so a dead or absent peer raises instead of hanging (`weight_transport` uses all of this).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterable, Mapping
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
class Layout:
    """Where every tensor of a version lives in one flat byte buffer: buckets end to end."""

    meta: WeightMeta
    buckets: list[list[int]]  # tensor indices per bucket (`plan_buckets`)
    ranges: list[tuple[int, int]]  # [start, end) of each bucket in the flat buffer
    offsets: list[int]  # flat byte offset of each tensor (meta order)
    total: int  # bytes of the flat buffer

    @classmethod
    def build(cls, meta: WeightMeta, bucket_bytes: int) -> "Layout":
        buckets = plan_buckets(meta, bucket_bytes)
        ranges, offsets, start = [], [0] * len(meta), 0
        for bucket in buckets:
            rel, size = _layout(meta, bucket)
            for i, off in zip(bucket, rel):
                offsets[i] = start + off
            ranges.append((start, start + size))
            start += size
        return cls(meta, buckets, ranges, offsets, start)

    @property
    def max_bucket(self) -> int:
        return max((end - start for start, end in self.ranges), default=0)

    def view(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        _, shape, dtype_str = self.meta[i]
        return _view(flat, self.offsets[i], shape, dtype_str)

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """name -> tensor view into `flat` (a complete weight set; no copy)."""
        return {name: self.view(flat, i) for i, (name, _, _) in enumerate(self.meta)}


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

    def barrier(self, value: float = 0.0) -> float:
        """All ranks meet (a one-element all-reduce); raises after the group's timeout. Returns
        the sum of every rank's `value`: rank 0 can hand the others a small number with it."""
        flag = torch.full((1,), float(value), dtype=torch.float32, device=self.device)
        self.pg.allreduce([flag]).wait()
        return float(flag.item())

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
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"unknown backend {backend!r} (gloo or nccl)")
    if backend == "nccl" and not (dist.is_nccl_available() and torch.cuda.is_available()):
        raise RuntimeError("the nccl weight-sync backend needs torch with NCCL and a CUDA device in "
                           "every process of the group; set sync.backend=gloo on CPU")
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, is_master=(rank == 0), timeout=timeout)
    if backend == "gloo":
        pg = dist.ProcessGroupGloo(store, rank, world_size, timeout)
        device = torch.device("cpu")
    else:
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        pg = dist.ProcessGroupNCCL(store, rank, world_size, opts)
        device = torch.device("cuda", torch.cuda.current_device())
    return BroadcastGroup(pg=pg, store=store, rank=rank, world_size=world_size, backend=backend,
                          device=device)
