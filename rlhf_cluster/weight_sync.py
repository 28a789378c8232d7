"""The weight-sync subsystem's control side: who gets which version through which transport.

Data never passes through the driver. `publish(version)` asks every learner rank to run
`sync_send` (rank 0 streams the buckets, gathering ZeRO-3 parameters one at a time; the other
ranks join the gathers) and every rollout worker to run `sync_receive`, concurrently; both
ends are in `weight_transport`. Per worker the transport is (`sync.transport`):

    auto          shm for workers on learner rank 0's node (gloo backend), broadcast otherwise
    shm           shm; a worker on another node is an error
    broadcast     one gloo/NCCL group holding rank 0 and every worker
    object_store  rank 0 puts a full copy in the Ray object store; workers copy it in

Versions are monotonic. Every worker answers with the version it serves after the swap, and
a mismatch is an error (a worker silently serving old weights is the bug this guards against).
Membership is elastic: `join` serves a late worker the current version through the object
store before it generates and `leave` drops one; either re-forms the groups at the next
publish. Collectives time out after `sync.timeout_s`, so a dead worker fails a sync loudly in
bounded time; `wait` names it.

Rollout actors must be created with the `weights` concurrency group (`rollout_actor_class`) so
that receiving runs beside generation; otherwise pass `receive_group=None`.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError

from rlhf_cluster.weight_transport import WEIGHTS_GROUP, WeightSyncError

TRANSPORTS = ("auto", "shm", "broadcast", "object_store")


ROLLOUT_CONCURRENCY = 16  # rollout calls a worker holds at once (merged by its CallBatcher)


def rollout_actor_class(cls):
    """`ray.remote(cls)` with a one-thread `weights` concurrency group for the sync calls, and
    room for the queued rollout calls to wait side by side (they are merged into one run)."""
    return ray.remote(concurrency_groups={WEIGHTS_GROUP: 1}, max_concurrency=ROLLOUT_CONCURRENCY)(cls)


def assign_transports(transport: str, sender_node: str, worker_nodes: list[str], backend: str) -> list[str]:
    """The transport of each worker (see the module docstring)."""
    if transport not in TRANSPORTS:
        raise ValueError(f"sync.transport={transport!r}; expected one of {list(TRANSPORTS)}")
    out = []
    for i, node in enumerate(worker_nodes):
        local = node == sender_node
        if transport == "shm" and not local:
            raise ValueError(f"sync.transport=shm but rollout worker #{i} runs on node {node}, not on "
                             f"learner rank 0's node {sender_node}; use auto or broadcast")
        if transport == "auto":
            out.append("shm" if local and backend == "gloo" else "broadcast")
        else:
            out.append(transport)
    return out


@dataclass
class _Publish:
    version: int
    started: float
    learner_refs: list
    worker_refs: list  # (worker index, ref)
    info: dict = field(default_factory=dict)


class WeightSync:
    def __init__(self, workers: list, learner=None, transport: str = "auto", backend: str = "auto",
                 bucket_mb: float = 256.0, timeout_s: float = 120.0, receive_group: str | None = WEIGHTS_GROUP):
        self.workers = list(workers)
        self.learner = learner
        self.transport, self.backend = transport, backend
        self.bucket_bytes = max(16, int(bucket_mb * 2**20))
        self.timeout_s = timeout_s
        self.receive_group = receive_group
        self.version = -1
        self.transports: list[str] = []  # per worker, once the groups are formed
        self.last: dict = {}  # {"version", "seconds", "bytes", "buckets"} of the newest finished sync
        self._inflight: list[_Publish] = []
        self._formed = False  # the groups match the current members
        self._open = False  # some ends are connected (and must be closed before re-forming)
        self._current = None  # object ref of the newest pushed weights (push() only)
        self._meta = None

    @classmethod
    def from_config(cls, cfg, workers: list, learner) -> "WeightSync":
        return cls(workers, learner, transport=cfg.sync.transport, backend=cfg.sync.backend,
                   bucket_mb=cfg.sync.bucket_mb, timeout_s=cfg.sync.timeout_s)

    # ---- calls on the worker's sync thread --------------------------------------------------

    def _call(self, worker, method: str, *args):
        fn = getattr(worker, method)
        if self.receive_group is not None:
            fn = fn.options(concurrency_group=self.receive_group)
        return fn.remote(*args)

    def _name(self, index: int) -> str:
        return f"rollout worker #{index} (actor {self.workers[index]._actor_id.hex()[:8]})"

    # ---- membership ---------------------------------------------------------------------------

    def _form(self) -> None:
        """(Re-)form the groups for the current members: close old ends, open new ones."""
        self._close_ends()
        leader = self.learner.workers[0]
        address = ray.get(leader.sync_address.remote(), timeout=self.timeout_s)
        if self._meta is None:
            self._meta = ray.get(leader.sync_meta.remote(), timeout=self.timeout_s)
        nodes = self._gather([(i, self._call(w, "sync_node")) for i, w in enumerate(self.workers)],
                             self.version + 1, "locating the workers")
        backend = self.backend if self.backend != "auto" else ("nccl" if address["gpu"] else "gloo")
        self.transports = assign_transports(self.transport, address["node_id"], nodes, backend)
        common = {"meta": self._meta, "bucket_bytes": self.bucket_bytes, "timeout_s": self.timeout_s}
        groups = {}
        for kind, port_key in (("shm", "shm_port"), ("broadcast", "bcast_port")):
            members = [i for i, t in enumerate(self.transports) if t == kind]
            if members:
                groups[kind] = {"host": address["host"], "port": address[port_key],
                                "world_size": 1 + len(members), "backend": backend if kind == "broadcast" else "gloo",
                                "members": members}
        if "shm" in groups:
            groups["shm"]["path"] = f"/dev/shm/rlhf-weights-{uuid.uuid4().hex[:12]}"
        if groups:
            refs = [(None, leader.sync_connect.remote({**common, **groups}))]
            for kind, g in groups.items():
                for rank, i in enumerate(g["members"], start=1):
                    refs.append((i, self._call(self.workers[i], "sync_connect",
                                                {**common, kind: g, "kind": kind, "rank": rank})))
            self._open = True
            self._gather(refs, self.version + 1, "forming the sync groups")
        self._formed = True

    def _close_ends(self) -> None:
        if not self._open:
            return
        refs = [self.learner.workers[0].sync_close.remote()]
        refs += [self._call(w, "sync_close") for w in self.workers]
        ray.wait(refs, num_returns=len(refs), timeout=self.timeout_s)  # a dead worker cannot answer
        self._formed = self._open = False

    def join(self, worker) -> int:
        """Add a worker mid-run; it serves the current version before this returns (object
        store), and takes part in the groups from the next publish on."""
        self.wait()
        self.workers.append(worker)
        if self.version >= 0:
            index = len(self.workers) - 1
            ref = self._snapshot(self.version) if self.learner is not None else self._current
            served = self._gather([(index, self._call(worker, "update_weights", self.version, ref))],
                                  self.version, "serving the late worker")
            if served[0] != self.version:
                raise WeightSyncError(f"{self._name(index)} serves v{served[0]} after joining, "
                                      f"expected v{self.version}")
        self._formed = False
        return self.version

    def leave(self, worker) -> None:
        """Drop a worker (dead or scaled down); the groups are re-formed at the next publish."""
        self.workers = [w for w in self.workers if w != worker]
        self._formed = False

    # ---- versions ---------------------------------------------------------------------------

    def _check_version(self, version: int) -> None:
        if version <= self.version:
            raise ValueError(f"weight versions must increase: got v{version} after v{self.version}")

    def _snapshot(self, version: int):
        """The learner's current weights as one object-store copy (every rank gathers)."""
        refs = self.learner.submit("sync_snapshot")
        return self._gather([(None, r) for r in refs], version, "snapshotting the learner")[0]["snapshot"][0]

    def publish(self, version: int, wait: bool = True) -> None:
        """Stream the learner's current weights to every worker as `version`.

        With wait=False this returns once the sync is under way; `wait()` (or the next
        publish) checks it. Calls queued on the learner after this one run after it.
        """
        if self.learner is None:
            raise ValueError("WeightSync.publish needs the learner group; use push() for explicit weights")
        self._check_version(version)
        if not self._formed:
            self.wait()
            self._form()
        fallback = [i for i, t in enumerate(self.transports) if t == "object_store"]
        started = time.perf_counter()
        learner_refs = self.learner.submit("sync_send", version, bool(fallback))
        worker_refs = [(i, self._call(w, "sync_receive", version)) for i, w in enumerate(self.workers)
                       if self.transports[i] != "object_store"]
        if fallback:
            info = self._gather([(None, learner_refs[0])], version, "sending")[0]
            worker_refs += [(i, self._call(self.workers[i], "update_weights", version, info["snapshot"][0]))
                            for i in fallback]
        self._inflight.append(_Publish(version, started, learner_refs, worker_refs))
        self.version = version
        if wait:
            self.wait()

    def push(self, version: int, named_tensors: dict[str, torch.Tensor], wait: bool = True) -> None:
        """Object-store push of explicit weights (tools, tests, weights not from the learner)."""
        self._check_version(version)
        ref = self._current = ray.put(named_tensors)
        started = time.perf_counter()
        refs = [(i, self._call(w, "update_weights", version, ref)) for i, w in enumerate(self.workers)]
        self._inflight.append(_Publish(version, started, [], refs))
        self.version = version
        if wait:
            self.wait()

    def served_gate(self):
        """A callable (safe to run on another thread) that blocks until every worker answered
        the newest sync, or the timeout passed; `wait()` reports failures."""
        refs = [r for _, r in self._inflight[-1].worker_refs] if self._inflight else []
        return lambda: ray.wait(refs, num_returns=len(refs), timeout=self.timeout_s + 30) if refs else None

    def wait(self) -> None:
        """Block until every started sync is served; raise naming a dead, failed or wrong worker."""
        while self._inflight:
            pub = self._inflight.pop(0)
            refs = [(None, r) for r in pub.learner_refs] + pub.worker_refs
            results = self._gather(refs, pub.version, "syncing")
            served = results[len(pub.learner_refs):]
            wrong = [(i, s) for (i, _), s in zip(pub.worker_refs, served) if s != pub.version]
            if wrong:
                raise WeightSyncError(f"weight sync v{pub.version}: " + "; ".join(
                    f"{self._name(i)} serves v{s}" for i, s in wrong))
            info = next((r for r in results[:len(pub.learner_refs)] if r), {})
            self.last = {"version": pub.version, "seconds": time.perf_counter() - pub.started,
                         "bytes": info.get("bytes", 0), "buckets": info.get("buckets", 0)}

    def _gather(self, refs: list, version: int, what: str) -> list:
        """ray.get of (worker index or None for the learner, ref) pairs, failing fast and
        never past the timeout (plus slack for the ends' own timeout to fire first)."""
        pending = [r for _, r in refs]
        deadline = time.monotonic() + self.timeout_s + 30
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                stuck = [self._name(i) if i is not None else "learner" for i, r in refs if r in pending]
                self._formed = False
                raise WeightSyncError(f"weight sync v{version}: {what} timed out after "
                                      f"{self.timeout_s + 30:.0f}s waiting for {stuck}")
            who = next(i for i, r in refs if r == done[0])
            try:
                ray.get(done[0])
            except RayActorError as exc:
                self._formed = False
                name = self._name(who) if who is not None else "a learner rank"
                raise WeightSyncError(f"weight sync v{version}: {what}: {name} died: {exc}") from exc
            except (ray.exceptions.RayTaskError, GetTimeoutError) as exc:
                self._formed = False
                name = self._name(who) if who is not None else "learner"
                raise WeightSyncError(f"weight sync v{version}: {what}: {name} failed: "
                                      f"{str(exc).strip().splitlines()[-1]}") from exc
        return ray.get([r for _, r in refs])

    def close(self) -> None:
        self._inflight = []
        self._close_ends()
