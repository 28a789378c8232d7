"""The two ends of a weight sync: `SenderEnd` on learner rank 0, `ReceiverEnd` on a rollout worker.

A version leaves rank 0 as size-bounded buckets, packed parameter by parameter from a lazy
iterator (under ZeRO-3 each parameter is gathered just before it is packed), through up to
two transports at once:

- shm: same-node workers. Rank 0 packs the buckets into one slot of a double-buffered
  /dev/shm segment that every same-node worker has mapped; each worker's engine adopts views
  into that slot as its parameters (no copy; an engine without `adopt_weights` copies them
  in). This is the CPU analogue of the CUDA-IPC handles verl/slime pass to colocated engines.
  Versions alternate between the two slots, so only two barriers per version travel over a
  small gloo group: "everyone swapped the previous version in" (so nobody serves from the
  slot about to be overwritten, the one of the version before) and "the new version is
  packed" (which also tells the receivers which slot).
- broadcast: workers on other nodes (or every worker, when configured). One broadcast per
  bucket over a dedicated gloo (CPU) or NCCL (GPU) group into each worker's flat receive
  buffer. When shm is also in use the buckets are broadcast straight out of the segment,
  so rank 0 packs once.

Every receiver ends a version with ONE `apply(version, named_tensors)` (or, on shm, `adopt`)
call holding the complete weight set as views into its receive buffer (the engine contract).
Receiving never touches the engine, so generation pauses only for that final swap. Collectives run with a
timeout: a dead or absent peer raises a `WeightSyncError` instead of hanging.
"""

from __future__ import annotations

import mmap
import os
import time
from collections.abc import Callable, Iterable, Iterator

import torch

from rlhf_cluster.weight_broadcast import BroadcastGroup, Layout, _view, free_port, node_ip, open_group

WEIGHTS_GROUP = "weights"  # the rollout actor's concurrency group for sync calls (see driver)


SLOTS, PAGE = 2, 4096  # shm double buffering: version k of a group is packed into slot k % 2


class WeightSyncError(RuntimeError):
    pass


class ShmSegment:
    """A /dev/shm file mapped as one flat uint8 tensor holding SLOTS page-aligned slots of
    `slot_bytes` each. The creator unlinks it once every receiver has mapped it, so it
    disappears with the last process even after a crash; the mapping lives as long as any
    tensor viewing it (an engine that adopted views keeps serving from it after a re-form)."""

    def __init__(self, path: str, slot_bytes: int, create: bool):
        self.slot_bytes, self.stride = slot_bytes, -(-slot_bytes // PAGE) * PAGE
        nbytes = SLOTS * self.stride
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, max(nbytes, 1))
            self._map = mmap.mmap(fd, max(nbytes, 1))
        finally:
            os.close(fd)
        self.path, self.nbytes = path, nbytes
        self.tensor = torch.frombuffer(self._map, dtype=torch.uint8, count=nbytes) if nbytes else \
            torch.empty(0, dtype=torch.uint8)

    def slot(self, k: int) -> torch.Tensor:
        return self.tensor[k * self.stride:k * self.stride + self.slot_bytes]

    def unlink(self) -> None:
        if os.path.exists(self.path):
            os.unlink(self.path)


def _fail(what: str, version: int, started: float, timeout_s: float, exc: Exception) -> WeightSyncError:
    return WeightSyncError(
        f"weight sync v{version}: {what} failed after {time.perf_counter() - started:.1f}s "
        f"(sync.timeout_s={timeout_s:g}): a receiver is dead, absent or stuck: {exc}")


class SenderEnd:
    """Learner rank 0's end: owns the shm segment and the rank-0 side of both groups."""

    def __init__(self):
        self.layout: Layout | None = None
        self.shm_group: BroadcastGroup | None = None
        self.segment: ShmSegment | None = None
        self.bcast_group: BroadcastGroup | None = None
        self.timeout_s = 60.0
        self.version = -1
        self.slot = SLOTS - 1  # the slot of the newest version sent through the current segment
        self.last: dict = {}

    @staticmethod
    def address() -> dict:
        """Where receivers rendezvous: this node and two free ports (shm and broadcast group)."""
        import ray

        return {"host": node_ip(), "node_id": ray.get_runtime_context().get_node_id(),
                "shm_port": free_port(), "bcast_port": free_port()}

    def connect(self, spec: dict) -> None:
        """Open the groups `spec` names (blocks until every receiver joined, or times out)."""
        self.close()
        self.layout = Layout.build(spec["meta"], spec["bucket_bytes"])
        self.timeout_s, self.slot = spec["timeout_s"], SLOTS - 1
        started = time.perf_counter()
        try:
            if spec.get("shm"):
                shm = spec["shm"]
                self.segment = ShmSegment(shm["path"], self.layout.total, create=True)
                self.shm_group = open_group(shm["host"], shm["port"], 0, shm["world_size"], "gloo",
                                            self.timeout_s)
                self.shm_group.barrier()  # every receiver has mapped the segment
                self.segment.unlink()
            if spec.get("broadcast"):
                b = spec["broadcast"]
                self.bcast_group = open_group(b["host"], b["port"], 0, b["world_size"], b["backend"],
                                              self.timeout_s)
        except Exception as exc:
            if self.segment is not None:
                self.segment.unlink()
            self.close()
            raise _fail("forming the sync group", self.version + 1, started, self.timeout_s, exc) from exc

    def close(self) -> None:
        self.shm_group = self.bcast_group = self.segment = self.layout = None

    def send(self, version: int, items: Iterable[tuple[str, torch.Tensor]]) -> dict:
        """Stream one version from `items` ((name, tensor) in meta order, consumed lazily).

        On failure the rest of `items` is still consumed before raising, so learner ranks that
        gather ZeRO-3 parameters alongside this one stay in step instead of hanging.
        """
        if version <= self.version:
            raise ValueError(f"weight versions must increase: got v{version} after v{self.version}")
        if self.layout is None:
            raise WeightSyncError("weight sync: the sender is not connected to a sync group")
        it = iter(items)
        started = time.perf_counter()
        slot = (self.slot + 1) % SLOTS
        try:
            if self.shm_group is not None:
                self.shm_group.barrier()  # every shm receiver swapped the previous version in
            if self.segment is not None or self.bcast_group is not None:
                self._pack_and_broadcast(it, slot)
            if self.shm_group is not None:
                self.shm_group.barrier(slot)  # the slot holds the new version (receivers learn which)
        except Exception as exc:
            for _ in it:
                pass
            raise _fail("sending", version, started, self.timeout_s, exc) from exc
        self.version, self.slot = version, slot
        self.last = {"version": version, "seconds": time.perf_counter() - started,
                     "bytes": self.layout.total, "buckets": len(self.layout.buckets)}
        return self.last

    def _pack_and_broadcast(self, it: Iterator[tuple[str, torch.Tensor]], slot: int) -> None:
        """Pack bucket k (into the segment's `slot`, or into one of two ring buffers) while
        bucket k-1 is on the wire; in the segment every bucket has its own range, so nothing waits."""
        layout, group = self.layout, self.bcast_group
        ring = None
        if self.segment is None:
            ring = group.buffers(layout.max_bucket, min(2, len(layout.buckets)))
        pending = []
        for k, (bucket, (start, end)) in enumerate(zip(layout.buckets, layout.ranges)):
            if ring is not None:
                if len(pending) >= 2:
                    pending.pop(0).wait()  # the ring slot of bucket k-2 is free again
                buf, base = ring[k % 2], start  # flat offset x lives at buf[x - base]
            else:
                buf, base = self.segment.slot(slot), 0
            for i in bucket:
                name, shape, dtype_str = layout.meta[i]
                got = next(it, None)
                if got is None:
                    raise ValueError(f"the weights ended before {name!r}")
                got_name, tensor = got
                if got_name != name or tuple(tensor.shape) != tuple(shape) or str(tensor.dtype) != dtype_str:
                    raise ValueError(f"tensor #{i} is {got_name!r} {tuple(tensor.shape)} {tensor.dtype}, "
                                     f"the sync group was formed for {name!r} {tuple(shape)} {dtype_str}")
                _view(buf, layout.offsets[i] - base, shape, dtype_str).copy_(tensor)
            if group is not None:
                pending.append(group.broadcast(buf[start - base:end - base]))
        for work in pending:
            work.wait()
        if next(it, None) is not None:
            raise ValueError("the weights have more tensors than the sync group was formed for")


class ReceiverEnd:
    """A rollout worker's end: one transport (shm or broadcast) and its flat receive buffer."""

    def __init__(self):
        self.kind: str | None = None
        self.layout: Layout | None = None
        self.group: BroadcastGroup | None = None
        self.flat: torch.Tensor | None = None  # broadcast: the receive buffer
        self.segment: ShmSegment | None = None  # shm
        self.timeout_s = 60.0
        self.version = -1

    def connect(self, spec: dict) -> None:
        """Join the group `spec["kind"]` ("shm" or "broadcast") at rank `spec["rank"]`."""
        self.close()
        self.kind, self.timeout_s = spec["kind"], spec["timeout_s"]
        self.layout = Layout.build(spec["meta"], spec["bucket_bytes"])
        g = spec[self.kind]
        started = time.perf_counter()
        try:
            if self.kind == "shm":
                self.group = open_group(g["host"], g["port"], spec["rank"], g["world_size"], "gloo",
                                        self.timeout_s)
                self.segment = ShmSegment(g["path"], self.layout.total, create=False)
                self.group.barrier()  # mapped: the sender may unlink the file
            elif self.kind == "broadcast":
                self.group = open_group(g["host"], g["port"], spec["rank"], g["world_size"], g["backend"],
                                        self.timeout_s)
                self.flat = torch.empty(self.layout.total, dtype=torch.uint8, device=self.group.device)
            else:
                raise ValueError(f"unknown weight transport {self.kind!r} (shm or broadcast)")
        except Exception as exc:
            self.close()
            raise _fail(f"joining the {spec['kind']} sync group", self.version + 1, started,
                        self.timeout_s, exc) from exc

    def close(self) -> None:
        # An engine that adopted views keeps the old mapping alive (and serves from it) until
        # the first version over the new group: never mmap.close() it here.
        self.kind = self.layout = self.group = self.flat = self.segment = None

    def receive(self, version: int, apply: Callable[[int, dict[str, torch.Tensor]], object],
                adopt: Callable[[int, dict[str, torch.Tensor]], object] | None = None) -> int:
        """Receive one version, then hand the complete set of views to the engine once: on shm
        to `adopt` when given (views into the shared slot, valid and unchanged until the next
        version), else to `apply`, which copies them in (the broadcast buffer is single)."""
        if self.group is None:
            raise WeightSyncError("weight sync: this worker is not connected to a sync group")
        started = time.perf_counter()
        try:
            if self.kind == "shm":
                self.group.barrier()  # we swapped the previous version: the sender may overwrite
                flat = self.segment.slot(round(self.group.barrier()))  # the new version is in this slot
            else:
                works = [self.group.broadcast(self.flat[start:end]) for start, end in self.layout.ranges]
                for work in works:
                    work.wait()
                flat = self.flat
        except Exception as exc:
            raise _fail(f"receiving ({self.kind})", version, started, self.timeout_s, exc) from exc
        swap = adopt if adopt is not None and self.kind == "shm" else apply
        swap(version, self.layout.views(flat))
        self.version = version
        return version


def gathered_items(named_params: Iterable[tuple[str, torch.nn.Parameter]]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) one parameter at a time; ZeRO-3 shards are gathered only while the
    consumer copies them (the next `next()` releases the gather)."""
    import deepspeed

    for name, param in named_params:
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            yield name, param.detach()


def param_meta(named_params: Iterable[tuple[str, torch.nn.Parameter]]) -> list[tuple[str, tuple, str]]:
    """The full shapes of (possibly ZeRO-3 partitioned) parameters, without gathering them."""
    return [(name, tuple(getattr(p, "ds_shape", p.shape)), str(p.dtype)) for name, p in named_params]


class SwapGuard:
    """Engine proxy whose `generate` and weight swaps (`update_weights`, `adopt_weights`)
    never overlap.

    Sync calls run on their own thread of the rollout actor (concurrency group `weights`), so
    a version is received while the engine keeps generating; only the swap waits for the
    current `generate` call to end, and the next one waits for the swap.
    """

    def __init__(self, engine):
        import threading

        self._engine = engine
        self._lock = threading.Lock()

    def generate(self, *args, **kwargs):
        with self._lock:
            return self._engine.generate(*args, **kwargs)

    def update_weights(self, version: int, named_tensors: dict[str, torch.Tensor]) -> None:
        with self._lock:
            self._engine.update_weights(version, named_tensors)

    @property
    def can_adopt(self) -> bool:
        """The engine implements the optional `adopt_weights` (actors.engine)."""
        return hasattr(self._engine, "adopt_weights")

    def adopt_weights(self, version: int, named_tensors: dict[str, torch.Tensor]) -> None:
        with self._lock:
            self._engine.adopt_weights(version, named_tensors)

    def shutdown(self) -> None:
        """The engine's optional `shutdown`, once its current `generate` has returned."""
        with self._lock:
            if hasattr(self._engine, "shutdown"):
                self._engine.shutdown()

    def __getattr__(self, name):
        return getattr(self._engine, name)
