"""`LearnerGroup`: the learner ranks as Ray actors in one placement group, driven in lockstep.

Every call goes to all ranks at once (ZeRO collectives need every rank) and results are awaited
with `ray.wait`, so a rank that dies surfaces at once as `RuntimeError("learner-1 died: ...")`
while its peers may still be blocked in a collective waiting for it.
"""

from __future__ import annotations

import socket

import ray
import torch
from ray.exceptions import RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from learners.worker import LearnerWorker
from rlhf_cluster.batch import TrainBatch
from rlhf_cluster.cluster import stop_actors


@ray.remote(num_cpus=0)
def _node_ip_and_free_port() -> tuple[str, int]:
    """Runs in rank 0's bundle: the rendezvous address must be reachable on rank 0's node."""
    with socket.socket() as s:
        s.bind(("", 0))
        return ray.util.get_node_ip_address(), s.getsockname()[1]


class LearnerGroup:
    def __init__(self, model_path: str, cfg: dict, dtype: str = "float32", seed: int = 0,
                 name_prefix: str = "learner", placement_strategy: str = "PACK",
                 ready_timeout_s: float = 600.0):
        self.num_ranks = int(cfg["num_ranks"])
        bundle = {"CPU": float(cfg["num_cpus_per_rank"])}
        num_gpus = float(cfg.get("num_gpus_per_rank", 0.0))
        if num_gpus > 0:
            bundle["GPU"] = num_gpus
        self.pg = placement_group([dict(bundle)] * self.num_ranks, strategy=placement_strategy,
                                  name=f"{name_prefix}-pg")
        try:
            ray.get(self.pg.ready(), timeout=ready_timeout_s)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(self.pg)
            raise RuntimeError(
                f"{name_prefix}: no room for {self.num_ranks} x {bundle} ({placement_strategy}) after "
                f"{ready_timeout_s:.0f}s; cluster has {ray.available_resources()} free") from None

        def in_bundle(i: int) -> PlacementGroupSchedulingStrategy:
            return PlacementGroupSchedulingStrategy(placement_group=self.pg,
                                                    placement_group_bundle_index=i)

        addr, port = ray.get(_node_ip_and_free_port.options(scheduling_strategy=in_bundle(0)).remote())
        self.names = [f"{name_prefix}-{i}" for i in range(self.num_ranks)]
        actor_cls = ray.remote(LearnerWorker)
        self.workers = [
            actor_cls.options(name=name, num_cpus=bundle["CPU"], num_gpus=num_gpus,
                              scheduling_strategy=in_bundle(i)).remote(
                i, self.num_ranks, addr, port, str(model_path), dict(cfg), dtype, seed)
            for i, name in enumerate(self.names)]
        try:
            self._call("ping")  # constructors (and the process-group rendezvous) done on all ranks
        except Exception:
            self.shutdown()
            raise

    def _call(self, method: str, *args, per_rank: list | None = None) -> list:
        """Call `method` on every rank (rank i gets `per_rank[i]` first if given); fail fast."""
        refs = [getattr(w, method).remote(*([per_rank[i]] if per_rank else []), *args)
                for i, w in enumerate(self.workers)]
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(done[0])
            except RayActorError as exc:
                raise RuntimeError(f"{self.names[refs.index(done[0])]} died: {exc}") from exc
        return ray.get(refs)

    def _check_shards(self, shards: list[TrainBatch]) -> None:
        if len(shards) != self.num_ranks:
            raise ValueError(f"got {len(shards)} shards for {self.num_ranks} learner ranks")
        empty = [i for i, s in enumerate(shards) if s.num_rows == 0]
        if empty:
            raise ValueError(f"shards {empty} are empty; every rank needs at least one row")

    def train_step(self, shards: list[TrainBatch], objective: str = "policy") -> dict[str, float]:
        """One shard per rank; returns metrics averaged over ranks weighted by loss tokens.
        `objective` is "policy" (RL), "sft" (warm start on target replies) or "bt" (reward
        model on chosen/rejected rows; the group must be built with `model_kind: reward`)."""
        self._check_shards(shards)
        tokens = [float(s.num_tokens) for s in shards]
        rows = sum(s.num_rows for s in shards)
        results = self._call("train_step", sum(tokens), rows, objective, per_rank=shards)
        weights = tokens if sum(tokens) > 0 else [1.0] * len(tokens)
        return {k: sum(w * r[k] for w, r in zip(weights, results)) / sum(weights)
                for k in results[0]}

    def logprobs(self, shards: list[TrainBatch]) -> list[torch.Tensor]:
        self._check_shards(shards)
        return self._call("logprobs", per_rank=shards)

    def submit(self, method: str, *args) -> list[ray.ObjectRef]:
        """Start `method` on every rank without waiting (weight sync runs beside the driver);
        calls queued after it on the ranks run once it is done."""
        return [getattr(w, method).remote(*args) for w in self.workers]
    def scores(self, shards: list[TrainBatch]) -> list[torch.Tensor]:
        """Reward model groups: each row's score at its last loss-mask position."""
        self._check_shards(shards)
        return self._call("scores", per_rank=shards)

    def named_tensors(self) -> dict[str, torch.Tensor]:
        return self._call("named_tensors")[0]

    def set_lr(self, lr: float) -> None:
        self._call("set_lr", float(lr))

    def save(self, out_dir: str) -> None:
        self._call("save", str(out_dir))

    def shutdown(self) -> None:
        """Best-effort clean exit (a rank stuck in a collective will not answer), then kill."""
        stop_actors(self.workers, timeout_s=10)  # waits, so the names are free for the next group
        remove_placement_group(self.pg)
