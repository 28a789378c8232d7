"""One learner rank: a DeepSpeed engine over a `torch.distributed` group (gloo on CPU, NCCL on GPU).

`LearnerGroup` wraps this plain class with `ray.remote`, one actor per rank. Every public method
that touches parameters is collective under ZeRO-2/3 (gradient buckets, parameter gathers), so
the group always calls it on all ranks, and each rank runs the same number of micro-batches
through the same modules (short shards are padded with zero-weight micro-batches).
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from learners.losses import bradley_terry_loss, policy_loss, sft_loss, token_logprobs
from learners.reward_model import RewardModel, end_positions
from rlhf_cluster.batch import TrainBatch
from rlhf_cluster.models import DTYPES, load_model
from rlhf_cluster.weight_transport import SenderEnd, gathered_items, param_meta

# Tensors of `model_inputs` indexed by audio clip rather than by row.
CLIP_KEYS = ("input_features", "feature_attention_mask")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")


class LearnerWorker:
    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int,
                 model_path: str, cfg: dict, dtype: str = "float32", seed: int = 0):
        import deepspeed

        # Ray gives each GPU actor its own CUDA_VISIBLE_DEVICES, so the local device is always 0.
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK="0")
        backend = cfg.get("backend", "auto")
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        # DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce (~1 min) used only
        # by its inference path; training collectives go through torch.distributed, so skip it.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend=backend)
        torch.manual_seed(seed)

        self.rank, self.world_size, self.cfg = rank, world_size, cfg
        self.model_path, self.dtype = str(model_path), DTYPES[dtype]
        model = load_model(model_path, dtype)
        if cfg.get("model_kind", "policy") == "reward":  # the `rm` stage: backbone + scalar head
            model = RewardModel(model).to(self.dtype)
        self.audio_token_id = getattr(model.config, "audio_token_id", None)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                      lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        # A plain fp32 torch optimizer at stage 0 reports no grad norm through DeepSpeed: measure
        # and clip it ourselves, on the already all-reduced gradients, just before AdamW steps.
        own_clip = cfg["zero_stage"] == 0 and dtype != "bfloat16"
        if own_clip:
            optimizer.register_step_pre_hook(self._clip_hook)
        self._grad_norm = None
        ds_config = {
            "train_micro_batch_size_per_gpu": cfg["micro_batch_size"],
            "gradient_accumulation_steps": 1,
            # We own the accumulation boundary: backward() per micro-batch, one step() per epoch.
            "managed_gradient_accumulation": False,
            "gradient_clipping": 0.0 if own_clip else cfg["grad_clip"],
            "zero_optimization": {"stage": cfg["zero_stage"]},
            "bf16": {"enabled": dtype == "bfloat16"},
            "zero_allow_untested_optimizer": True,  # plain torch AdamW: no JIT-compiled DS ops
            "steps_per_print": 2**31 - 1,
        }
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        self.device = self.engine.device
        self.weight_sender = SenderEnd() if rank == 0 else None  # weight-sync end (rank 0 streams)
        self.ref = None
        if cfg["kl_coef"] > 0:
            self.ref = load_model(model_path, dtype).to(self.device).eval().requires_grad_(False)

    def _clip_hook(self, optimizer, args, kwargs):
        params = [p for g in optimizer.param_groups for p in g["params"]]
        max_norm = self.cfg["grad_clip"] or math.inf  # 0 disables clipping, as in DeepSpeed
        self._grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    # ---- batches -----------------------------------------------------------------------

    def _clips_per_row(self, batch: TrainBatch) -> torch.Tensor:
        """Clips per row: given, or counted as runs of audio placeholders in each row."""
        if "clips_per_row" in batch.model_inputs:
            return batch.model_inputs["clips_per_row"].long().cpu()
        ids = batch.input_ids
        is_audio = ids == self.audio_token_id
        starts = is_audio & ~torch.nn.functional.pad(is_audio[:, :-1], (1, 0))
        return starts.sum(dim=1).cpu()

    def _micro_batches(self, batch: TrainBatch) -> list[tuple[TrainBatch, bool]]:
        """Row slices of `micro_batch_size` with their own clips, padded to the longest rank.

        Returns (micro_batch, real) pairs; padding entries repeat the first micro-batch and get
        zero loss weight. Raises if ranks disagree on which micro-batches carry audio: the audio
        tower would then run on some ranks only, and ZeRO-2/3 collectives would hang.
        """
        mbs = self.cfg["micro_batch_size"]
        has_clips = any(k in batch.model_inputs for k in CLIP_KEYS)
        clip_ends = torch.cumsum(self._clips_per_row(batch), 0) if has_clips else None
        out = []
        for start in range(0, batch.num_rows, mbs):
            end = min(start + mbs, batch.num_rows)
            c0 = int(clip_ends[start - 1]) if has_clips and start > 0 else 0
            c1 = int(clip_ends[end - 1]) if has_clips else 0
            inputs = {}
            for key, value in batch.model_inputs.items():
                if key == "clips_per_row" or (key in CLIP_KEYS and c1 == c0):
                    continue
                inputs[key] = value[c0:c1] if key in CLIP_KEYS else value[start:end]
            rows = slice(start, end)
            out.append((TrainBatch(
                input_ids=batch.input_ids[rows], attention_mask=batch.attention_mask[rows],
                loss_mask=batch.loss_mask[rows], old_logprobs=batch.old_logprobs[rows],
                advantages=batch.advantages[rows], model_inputs=inputs,
                ref_logprobs=None if batch.ref_logprobs is None else batch.ref_logprobs[rows]),
                True))

        count = torch.tensor([len(out)], device=self.device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        out += [(out[0][0], False)] * (int(count) - len(out))
        audio = torch.tensor([float("input_features" in mb.model_inputs) for mb, _ in out],
                             device=self.device)
        dist.all_reduce(audio)
        if not all(a in (0, self.world_size) for a in audio.tolist()):
            raise ValueError(
                "micro-batches must carry audio on all ranks or on none (ZeRO runs the audio tower "
                f"collectively); audio-carrying ranks per micro-batch: {audio.tolist()}")
        return out

    def _forward_logprobs(self, model, mb: TrainBatch) -> torch.Tensor:
        inputs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                  for k, v in mb.model_inputs.items()}
        ids = mb.input_ids.to(self.device)
        out = model(input_ids=ids, attention_mask=mb.attention_mask.to(self.device),
                    use_cache=False, **inputs)
        # Same distribution the engine sampled from: logits / T with input-only tokens masked.
        logits = out.logits / float(self.cfg.get("temperature", 1.0))
        suppress = self.cfg.get("suppress_token_ids") or []
        if suppress:
            logits = logits.index_fill(-1, torch.tensor(suppress, device=logits.device), float("-inf"))
        # Prompt positions may hold masked ids (audio placeholders): 0, never -inf, off the loss.
        return token_logprobs(logits, ids).masked_fill(mb.loss_mask.to(self.device) == 0, 0.0)

    def _forward_scores(self, model, mb: TrainBatch) -> torch.Tensor:
        """Reward model: one score per row, at the row's last loss-mask position (its end token)."""
        inputs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                  for k, v in mb.model_inputs.items()}
        values = model(input_ids=mb.input_ids.to(self.device),
                       attention_mask=mb.attention_mask.to(self.device), **inputs)
        return values.gather(1, end_positions(mb.loss_mask.to(self.device))[:, None]).squeeze(1)

    # ---- public API --------------------------------------------------------------------

    def train_step(self, batch: TrainBatch, num_tokens_global: float,
                   num_rows_global: int, objective: str = "policy") -> dict[str, float]:
        """`ppo_epochs` optimizer steps over this rank's shard; losses are normalised globally.

        objective "policy": the clipped policy loss; "sft": NLL of the masked tokens (one
        epoch; advantages and behaviour logprobs are ignored); "bt": Bradley-Terry loss of a
        reward model, rows alternating chosen/rejected (pairs never straddle a micro-batch:
        the `rm` stage uses an even micro_batch_size), each scored at its last loss-mask 1.

        DeepSpeed averages gradients over ranks, so each rank's loss (already divided by the
        global count) is multiplied by world_size: the applied gradient is then exactly the
        gradient of the global mean.
        """
        cfg = self.cfg

        def dev(t: torch.Tensor) -> torch.Tensor:
            return t.to(self.device, torch.float32)

        self.engine.train()
        micro = self._micro_batches(batch)
        totals: dict[str, float] = {}
        weight_sum = 0.0
        decoupled = objective == "policy" and cfg.get("off_policy_loss", "ppo") == "decoupled"
        if decoupled:  # proximal policy = these weights before this step's update
            with torch.no_grad():
                proximal = [self._forward_logprobs(self.engine, mb).cpu() for mb, _ in micro]
        for _ in range(cfg["ppo_epochs"] if objective == "policy" else 1):
            for i, (mb, real) in enumerate(micro):
                if objective == "bt":
                    scores = self._forward_scores(self.engine, mb)
                    loss, metrics = bradley_terry_loss(scores[0::2], scores[1::2], max(num_rows_global / 2, 1.0))
                    self.engine.backward(loss * (self.world_size if real else 0.0), scale_wrt_gas=False)
                    w = mb.num_rows / 2 if real else 0.0
                    weight_sum += w
                    for k, v in metrics.items():
                        totals[k] = totals.get(k, 0.0) + w * v
                    continue
                lp = self._forward_logprobs(self.engine, mb)
                if objective == "sft":
                    loss, metrics = sft_loss(lp, dev(mb.loss_mask), max(num_tokens_global, 1.0))
                    self.engine.backward(loss * (self.world_size if real else 0.0), scale_wrt_gas=False)
                    w = float(mb.loss_mask.sum()) if real else 0.0
                    weight_sum += w
                    totals["nll"] = totals.get("nll", 0.0) + w * metrics["nll"]
                    continue
                ref = mb.ref_logprobs
                if ref is None and self.ref is not None:
                    with torch.no_grad():
                        ref = self._forward_logprobs(self.ref, mb)
                loss, metrics = policy_loss(
                    lp, dev(proximal[i]) if decoupled else dev(mb.old_logprobs),
                    dev(mb.advantages), dev(mb.loss_mask),
                    cfg["clip_eps_low"], cfg["clip_eps_high"], cfg["loss_agg"], cfg["kl_coef"],
                    None if ref is None else dev(ref),
                    num_tokens_global=max(num_tokens_global, 1.0),
                    num_rows_global=max(num_rows_global, 1),
                    behaviour_logprobs=dev(mb.old_logprobs) if decoupled else None,
                    tis_cap=float(cfg.get("tis_cap", 2.0)))
                self.engine.backward(loss * (self.world_size if real else 0.0), scale_wrt_gas=False)
                w = float(mb.loss_mask.sum()) if real else 0.0
                weight_sum += w
                for k, v in metrics.items():
                    totals[k] = totals.get(k, 0.0) + w * v
            self.engine.step()
        result = {k: v / max(weight_sum, 1e-12) for k, v in totals.items()}
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = self._grad_norm if grad_norm is None else grad_norm
        result["grad_norm"] = float(grad_norm) if grad_norm is not None else math.nan
        result["lr"] = float(self.engine.get_lr()[0])
        return result

    @torch.no_grad()
    def _eval_rows(self, forward, batch: TrainBatch) -> torch.Tensor:
        """`forward` over every micro-batch, real rows' results concatenated (CPU)."""
        self.engine.eval()
        micro = self._micro_batches(batch)
        # Padding micro-batches run too: ZeRO-3 parameter gathers are collective.
        parts = [forward(self.engine, mb).cpu() for mb, _ in micro]
        return torch.cat([p for p, (_, real) in zip(parts, micro) if real])

    def logprobs(self, batch: TrainBatch) -> torch.Tensor:
        """Current-policy token logprobs [B, T] (CPU, float32); collective under ZeRO-3."""
        return self._eval_rows(self._forward_logprobs, batch)

    def scores(self, batch: TrainBatch) -> torch.Tensor:
        """Reward model: each row's score [B] (CPU, float32); collective under ZeRO-3."""
        return self._eval_rows(self._forward_scores, batch)

    def named_tensors(self) -> dict[str, torch.Tensor] | None:
        """Full CPU copies of the policy weights under HF names on rank 0 (None elsewhere).

        Parameters are gathered one at a time so ZeRO-3 never materialises the whole model.
        """
        import deepspeed

        out = {}
        for name, param in self.engine.module.named_parameters():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if self.rank == 0:
                    out[name] = param.detach().to("cpu", copy=True)
        return out if self.rank == 0 else None

    # ---- weight sync (driven by rlhf_cluster.weight_sync.WeightSync) ----------------------

    def sync_address(self) -> dict:
        return {**self.weight_sender.address(), "gpu": self.device.type == "cuda"}

    def sync_meta(self) -> list[tuple[str, tuple, str]]:
        return param_meta(self.engine.module.named_parameters())

    def sync_connect(self, spec: dict) -> None:
        self.weight_sender.connect(spec)

    def sync_send(self, version: int, snapshot: bool = False) -> dict | None:
        """Stream `version` from rank 0 straight to the rollout workers (every rank takes part:
        ZeRO-3 parameters are gathered one at a time). With `snapshot`, rank 0 also keeps a
        full copy and returns [object ref] of it for workers served through the object store."""
        import ray

        items = gathered_items(self.engine.module.named_parameters())
        if self.rank != 0:
            for _ in items:  # follow rank 0's gathers
                pass
            return None
        copies = {}
        if snapshot:
            items = ((name, copies.setdefault(name, t.to("cpu", copy=True))) for name, t in items)
        try:
            info = self.weight_sender.send(version, items) if self.weight_sender.layout else {"version": version}
        finally:
            for _ in items:  # the gathers of every rank must complete even if sending failed
                pass
        return {**info, "snapshot": [ray.put(copies)] if snapshot else None}

    def sync_snapshot(self) -> dict | None:
        """Rank 0: [object ref] of a full CPU copy of the weights (every rank joins the gathers),
        for a worker served through the object store (a late joiner, or object_store transport)."""
        import ray

        copies = {name: t.to("cpu", copy=True) for name, t in gathered_items(self.engine.module.named_parameters())}
        return {"snapshot": [ray.put(copies)]} if self.rank == 0 else None

    def sync_close(self) -> None:
        self.weight_sender.close()

    def save(self, out_dir: str) -> None:
        """Rank 0 writes a Hugging Face directory (safetensors + the source's tokenizer files)."""
        state = self.named_tensors()
        if self.rank != 0:
            return
        out = Path(out_dir)
        self.engine.module.save_pretrained(out, state_dict=state, safe_serialization=True)
        for src in Path(self.model_path).iterdir():
            if src.is_file() and not src.name.endswith(WEIGHT_SUFFIXES) and not (out / src.name).exists():
                shutil.copy2(src, out / src.name)

    def set_lr(self, lr: float) -> float:
        """Stages share one engine and optimizer state but not a learning rate (sft vs rl)."""
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        return float(self.engine.get_lr()[0])

    def ping(self) -> int:
        return self.rank

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
