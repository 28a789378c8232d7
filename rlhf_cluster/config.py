"""The run configuration: a structured OmegaConf schema, YAML files, dotted CLI overrides.

`load_config(path, overrides)` merges YAML and overrides onto the schema and validates it
before anything starts: an unknown key, a wrong type or an out-of-range value raises
`ConfigError` naming the key, the value and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    pass


@dataclass
class ClusterConfig:
    address: str | None = None  # None: embedded local Ray; "auto" or "host:port": join
    num_cpus: int | None = None  # embedded instance only
    num_gpus: int = 0  # embedded instance only; logical GPUs make placement testable on CPU
    dashboard_host: str = "127.0.0.1"
    namespace: str = "rlhf-cluster"


@dataclass
class ModelConfig:
    path: str = MISSING  # local Hugging Face directory
    build_tiny_if_missing: bool = False  # quickstart/tests: build the offline tiny model there
    dtype: str = "float32"  # float32 | bfloat16
    adapter: str = "auto"  # auto | qwen2_audio | causal_lm


@dataclass
class DataConfig:
    train_path: str = MISSING  # Parquet (or JSONL) of tasks
    pairs_path: str | None = None  # chosen/rejected pairs (rm stage)
    eval_path: str | None = None
    synthetic: bool = False  # generate the built-in spoken task at these paths if missing
    synthetic_num_tasks: int = 256
    synthetic_seed: int = 0
    on_bad_row: str = "fail"  # fail | skip
    system_prompt: str = "you are a caring voice assistant ."


@dataclass
class RolloutConfig:
    engine: str = "hf"  # hf | vllm
    num_workers: int = 1
    num_cpus_per_worker: float = 1.0
    num_gpus_per_worker: float = 0.0
    prompts_per_step: int = 8
    samples_per_prompt: int = 4
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    # Benchmarks only: sleep this long per generated token after each batch, a stand-in for
    # GPU decoding that leaves the CPU idle (so overlap is measurable on a 2-core box).
    simulated_token_latency_s: float = 0.0
    # vLLM only
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.5


@dataclass
class RewardConfig:
    # verifiers the verifier service runs; every one is recorded, weighted or not
    verifiers: list[str] = field(
        default_factory=lambda: ["correct", "reasoning_present", "format"])
    # name -> weight; names are reward components produced by the services
    weights: dict[str, float] = field(
        default_factory=lambda: {"correct": 0.8, "reasoning_present": 0.2})
    timeout_s: float = 60.0
    retries: int = 1
    on_failure: str = "drop"  # drop | fail
    num_cpus: float = 0.25


@dataclass
class LearnerConfig:
    num_ranks: int = 2
    num_cpus_per_rank: float = 1.0
    num_gpus_per_rank: float = 0.0
    backend: str = "auto"  # auto (nccl if GPUs else gloo) | gloo | nccl
    zero_stage: int = 2
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    micro_batch_size: int = 16
    ppo_epochs: int = 1
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    kl_coef: float = 0.0  # k3 KL to a frozen reference; 0 disables the reference model
    loss_agg: str = "token_mean"  # token_mean | seq_mean
    # ppo: ratio against the engine's behaviour logprobs; decoupled: ratio against proximal
    # logprobs recomputed before the update, times min(proximal/behaviour, tis_cap)
    off_policy_loss: str = "ppo"
    tis_cap: float = 2.0
    advantage_std_norm: bool = True


@dataclass
class SFTConfig:
    steps: int = 20
    batch_size: int = 32  # target replies per step (chosen replies of data.pairs_path)
    lr: float = 2.0e-3  # the rl stage uses learner.lr


@dataclass
class RLConfig:
    algorithm: str = "grpo"
    steps: int = 60
    # sync: generate, then train (on-policy). one_step_off: generation of step t+1 overlaps
    # training of step t. async: rollout workers generate continuously into a bounded buffer.
    mode: str = "sync"
    max_staleness: int = 1  # async: episodes older than learner version - K are dropped...
    on_stale: str = "drop"  # ...or kept ("keep") and trained with the off-policy loss
    max_buffered_batches: int = 2  # async: rollout batches waiting to be trained, at most


@dataclass
class RunConfig:
    output_dir: str = "runs/quickstart"
    seed: int = 0
    stages: list[str] = field(default_factory=lambda: ["rl"])
    log_every: int = 1
    save_rollouts: bool = True


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rl: RLConfig = field(default_factory=RLConfig)


CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("float32", "bfloat16"),
    "model.adapter": ("auto", "qwen2_audio", "causal_lm"),
    "data.on_bad_row": ("fail", "skip"),
    "rollout.engine": ("hf", "vllm"),
    "reward.on_failure": ("drop", "fail"),
    "learner.backend": ("auto", "gloo", "nccl"),
    "learner.zero_stage": (0, 1, 2, 3),
    "learner.loss_agg": ("token_mean", "seq_mean"),
    "rl.algorithm": ("grpo",),
    "rl.mode": ("sync", "one_step_off", "async"),
    "rl.on_stale": ("drop", "keep"),
    "learner.off_policy_loss": ("ppo", "decoupled"),
}
STAGES = ("sft", "rl")
POSITIVE = ("rollout.num_workers", "rollout.prompts_per_step", "rollout.samples_per_prompt",
            "rollout.max_new_tokens", "learner.num_ranks", "learner.micro_batch_size",
            "learner.ppo_epochs", "rl.steps", "sft.steps", "sft.batch_size", "rl.max_buffered_batches", "learner.tis_cap", "reward.timeout_s", "data.synthetic_num_tasks")
NON_NEGATIVE = ("learner.lr", "sft.lr", "rl.max_staleness", "learner.kl_coef", "learner.clip_eps_low",
                "learner.clip_eps_high", "learner.grad_clip", "rollout.temperature",
                "reward.retries", "rollout.num_gpus_per_worker", "rollout.simulated_token_latency_s", "learner.num_gpus_per_rank")


def _get(cfg: Any, dotted: str) -> Any:
    return OmegaConf.select(cfg, dotted)


def validate(cfg: Any) -> None:
    for key, allowed in CHOICES.items():
        if _get(cfg, key) not in allowed:
            raise ConfigError(f"{key}={_get(cfg, key)!r} is not allowed; expected one of {list(allowed)}")
    for key in POSITIVE:
        if not _get(cfg, key) > 0:
            raise ConfigError(f"{key}={_get(cfg, key)!r} must be > 0")
    for key in NON_NEGATIVE:
        if _get(cfg, key) < 0:
            raise ConfigError(f"{key}={_get(cfg, key)!r} must be >= 0")
    for stage in cfg.run.stages:
        if stage not in STAGES:
            raise ConfigError(f"run.stages contains {stage!r}; expected stages from {list(STAGES)}")
    if not 0 < cfg.rollout.gpu_memory_utilization <= 1:
        raise ConfigError(f"rollout.gpu_memory_utilization={cfg.rollout.gpu_memory_utilization!r} must be "
                          "in (0, 1] (the fraction of accelerator memory, or host RAM on CPU, vLLM reserves)")
    if cfg.rollout.tensor_parallel_size < 1:
        raise ConfigError(f"rollout.tensor_parallel_size={cfg.rollout.tensor_parallel_size!r} must be >= 1")
    if (cfg.rollout.engine == "vllm" and cfg.rollout.num_gpus_per_worker > 0
            and cfg.rollout.num_gpus_per_worker < cfg.rollout.tensor_parallel_size):
        raise ConfigError(f"rollout.tensor_parallel_size={cfg.rollout.tensor_parallel_size} needs "
                          f"rollout.num_gpus_per_worker >= {cfg.rollout.tensor_parallel_size}, got "
                          f"{cfg.rollout.num_gpus_per_worker}")
    if not 0 < cfg.rollout.top_p <= 1:
        raise ConfigError(f"rollout.top_p={cfg.rollout.top_p!r} must be in (0, 1]")
    if cfg.rollout.samples_per_prompt < 2 and cfg.rl.algorithm == "grpo":
        raise ConfigError("rollout.samples_per_prompt must be >= 2 for grpo "
                          f"(group-normalised advantages), got {cfg.rollout.samples_per_prompt}")
    from reward_services.verifiers import VERIFIERS

    for name in cfg.reward.verifiers:
        if name not in VERIFIERS:
            raise ConfigError(f"reward.verifiers contains {name!r}; expected names from {sorted(VERIFIERS)}")
    for name, weight in cfg.reward.weights.items():
        if not isinstance(weight, (int, float)):
            raise ConfigError(f"reward.weights.{name}={weight!r} must be a number")
        if name not in cfg.reward.verifiers:
            raise ConfigError(f"reward.weights.{name}: no reward service produces {name!r}; "
                              f"components available: {list(cfg.reward.verifiers)}")
    if "sft" in cfg.run.stages and not cfg.data.pairs_path:
        raise ConfigError("run.stages includes 'sft' but data.pairs_path is not set; expected a "
                          "Parquet of prompts with chosen replies (the built-in generator writes pairs.parquet)")
    missing = OmegaConf.missing_keys(cfg)
    if missing:
        raise ConfigError(f"required config keys are not set: {sorted(missing)}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    """Schema <- YAML file <- `key=value` overrides, then `validate`."""
    schema = OmegaConf.structured(Config)
    where = "config"
    try:
        layers = [schema]
        if path is not None:
            where = str(path)
            if not Path(path).is_file():
                raise ConfigError(f"config file {path} does not exist")
            layers.append(OmegaConf.load(path))
        if overrides:
            where = f"command-line overrides {overrides}"
            for item in overrides:
                if "=" not in item:
                    raise ConfigError(f"override {item!r} must look like key=value (e.g. rl.steps=50)")
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        cfg = OmegaConf.merge(*layers)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        reason = str(exc).splitlines()[0]
        raise ConfigError(f"{where}: {key}: {reason}") from None
    validate(cfg)
    return cfg


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
