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
    adapter: str = "auto"  # auto | qwen2_audio | step_audio | causal_lm
    tiny_family: str = "qwen2_audio"  # built tiny model's shape: qwen2_audio | step_audio


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
    # `rlhf-cluster scale N` may not go above this while a job runs (None: no cap)
    max_workers: int | None = None


@dataclass
class PreferenceServiceConfig:
    """The trained Bradley-Terry reward model, served as the `reward-preference` actor."""
    enabled: bool = False
    path: str | None = None  # reward model dir; None: rm.output_dir (written by the rm stage)
    component: str = "preference"
    batch_size: int = 16  # episodes per forward pass
    num_cpus: float = 0.5
    num_gpus: float = 0.0  # fractional on GPU clusters, e.g. 0.25
    timeout_s: float | None = None  # router bound per call; None: reward.timeout_s
    retries: int | None = None  # None: reward.retries


@dataclass
class JudgeServiceConfig:
    """A generative rubric judge on an engine (HF here), the `reward-judge` actor."""
    enabled: bool = False
    model_path: str | None = None  # None: model.path
    engine: str = "hf"
    rubric: list[str] = field(default_factory=list)  # dataset-level items; task["rubric"] wins
    component: str = "rubric"
    max_new_tokens: int = 32
    batch_size: int = 8
    num_cpus: float = 0.5
    num_gpus: float = 0.0
    timeout_s: float | None = None  # router bound per call; None: reward.timeout_s
    retries: int | None = None  # None: reward.retries


@dataclass
class RemoteServiceConfig:
    """The user's own HTTP reward server (protocol: reward_services/http_server.py)."""
    enabled: bool = False
    url: str | None = None
    token_env: str = "RLHF_REWARD_TOKEN"  # the token is read from this variable, never from config
    timeout_s: float = 30.0
    component: str | None = None  # name for servers that answer plain numbers
    components: list[str] = field(default_factory=list)  # what it returns (for weight checks)
    num_cpus: float = 0.1
    retries: int | None = None  # None: reward.retries


@dataclass
class RewardServicesConfig:
    preference: PreferenceServiceConfig = field(default_factory=PreferenceServiceConfig)
    judge: JudgeServiceConfig = field(default_factory=JudgeServiceConfig)
    remote: RemoteServiceConfig = field(default_factory=RemoteServiceConfig)


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
    # multi-turn: episode value of a per-turn component = sum_t d^t v_t / sum_t d^t
    turn_discount: float = 1.0
    # component -> none | batch_zscore | running_zscore, applied before weighting (raw kept)
    normalize: dict[str, str] = field(default_factory=dict)
    services: RewardServicesConfig = field(default_factory=lambda: RewardServicesConfig())


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
class RMConfig:
    """The `rm` stage: a Bradley-Terry reward model on data.pairs_path, its own learner ranks."""
    init_path: str | None = None  # backbone to start from; None: model.path
    output_dir: str | None = None  # None: <run.output_dir>/reward_model
    steps: int = 80
    batch_size: int = 32  # pairs per step
    lr: float = 5.0e-4
    micro_batch_size: int = 32  # rows (chosen + rejected); even, so pairs stay together
    eval_fraction: float = 0.1  # prompts held out for pairwise accuracy
    eval_every: int = 20
    num_ranks: int = 2
    num_cpus_per_rank: float = 0.5
    num_gpus_per_rank: float = 0.0
    zero_stage: int = 2
    min_heldout_accuracy: float = 0.0  # fail the run below this (0: report only)


@dataclass
class CurationConfig:
    """Pass-rate filter (Step-Audio-R1 kept prompts solved 3-6 of 8 times)."""
    enabled: bool = False
    component: str = "correct"
    low: float = 0.375
    high: float = 0.75
    threshold: float = 0.5  # a sample passes when component >= threshold


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
    curation: CurationConfig = field(default_factory=CurationConfig)


@dataclass
class SyncConfig:
    # how weights reach the rollout workers (docs/weight_sync.md): auto = shm for workers on
    # learner rank 0's node (gloo backend), broadcast for the others; object_store = Ray fallback
    transport: str = "auto"  # auto | shm | broadcast | object_store
    backend: str = "auto"  # broadcast group: auto (nccl if the learner has GPUs else gloo) | gloo | nccl
    bucket_mb: float = 256.0  # bucket size: the learner packs/gathers at most this much ahead
    timeout_s: float = 120.0  # a dead or absent worker fails a sync after this long, never hangs


@dataclass
class RunConfig:
    output_dir: str = "runs/quickstart"
    seed: int = 0
    stages: list[str] = field(default_factory=lambda: ["rl"])
    log_every: int = 1
    save_rollouts: bool = True


@dataclass
class DialogueConfig:
    """Rollout environment (actors/environments) and multi-turn limits."""

    env: str = "single_turn"  # single_turn | scripted | simulated_user
    max_turns: int = 1  # assistant turns per dialogue
    max_total_tokens: int = 1024  # a turn whose context + max_new_tokens would exceed it ends the dialogue
    keep_reasoning: bool = False  # keep earlier turns' <think> blocks in later turns' context
    user_policy: str = "rule_based"  # simulated_user: who decides the next user turn
    synthesizer: str = "procedural"  # simulated_user: who voices it (offline, CPU)


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
    dialogue: DialogueConfig = field(default_factory=DialogueConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    rm: RMConfig = field(default_factory=RMConfig)


CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("float32", "bfloat16"),
    "model.adapter": ("auto", "qwen2_audio", "step_audio", "causal_lm"),
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
    "model.tiny_family": ("qwen2_audio", "step_audio"),
    "dialogue.env": ("single_turn", "scripted", "simulated_user"),
    "dialogue.user_policy": ("rule_based",),
    "dialogue.synthesizer": ("procedural",),
    "sync.transport": ("auto", "shm", "broadcast", "object_store"),
    "sync.backend": ("auto", "gloo", "nccl"),
    "rm.zero_stage": (0, 1, 2, 3),
    "reward.services.judge.engine": ("hf",),
}
STAGES = ("rm", "sft", "rl")  # run in this order (rm and sft are independent; rl needs both)
POSITIVE = ("rollout.num_workers", "rollout.prompts_per_step", "rollout.samples_per_prompt",
            "rollout.max_new_tokens", "learner.num_ranks", "learner.micro_batch_size",
            "learner.ppo_epochs", "rl.steps", "sft.steps", "sft.batch_size", "rl.max_buffered_batches", "learner.tis_cap", "reward.timeout_s", "data.synthetic_num_tasks",
            "dialogue.max_turns", "dialogue.max_total_tokens",
            "sync.bucket_mb", "sync.timeout_s",
            "rm.steps", "rm.batch_size", "rm.lr", "rm.eval_every", "rm.num_ranks", "rm.num_cpus_per_rank",
            "reward.services.judge.max_new_tokens")
NON_NEGATIVE = ("learner.lr", "sft.lr", "rl.max_staleness", "learner.kl_coef", "learner.clip_eps_low",
                "learner.clip_eps_high", "learner.grad_clip", "rollout.temperature",
                "reward.retries", "rollout.num_gpus_per_worker", "rollout.simulated_token_latency_s", "learner.num_gpus_per_rank",
                "rm.num_gpus_per_rank")


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
    from rlhf_cluster.weight_sync import ROLLOUT_CONCURRENCY

    if cfg.rl.max_buffered_batches >= ROLLOUT_CONCURRENCY:
        raise ConfigError(f"rl.max_buffered_batches={cfg.rl.max_buffered_batches} must be at most "
                          f"{ROLLOUT_CONCURRENCY - 1} (a rollout worker holds {ROLLOUT_CONCURRENCY} queued calls)")
    if cfg.rollout.max_workers is not None and cfg.rollout.max_workers < cfg.rollout.num_workers:
        raise ConfigError(f"rollout.max_workers={cfg.rollout.max_workers} must be >= rollout.num_workers="
                          f"{cfg.rollout.num_workers} (or null for no cap)")
    if cfg.rollout.samples_per_prompt < 2 and cfg.rl.algorithm == "grpo":
        raise ConfigError("rollout.samples_per_prompt must be >= 2 for grpo "
                          f"(group-normalised advantages), got {cfg.rollout.samples_per_prompt}")
    from reward_services.verifiers import VERIFIERS

    for name in cfg.reward.verifiers:
        if name not in VERIFIERS:
            raise ConfigError(f"reward.verifiers contains {name!r}; expected names from {sorted(VERIFIERS)}")
    validate_rewards(cfg)
    if "sft" in cfg.run.stages and not cfg.data.pairs_path:
        raise ConfigError("run.stages includes 'sft' but data.pairs_path is not set; expected a "
                          "Parquet of prompts with chosen replies (the built-in generator writes pairs.parquet)")
    if cfg.dialogue.env == "single_turn" and cfg.dialogue.max_turns != 1:
        raise ConfigError(f"dialogue.max_turns={cfg.dialogue.max_turns} with dialogue.env=single_turn; "
                          "expected 1 (use scripted or simulated_user for multi-turn dialogues)")
    if cfg.dialogue.max_turns > 1 and cfg.dialogue.max_total_tokens <= cfg.rollout.max_new_tokens:
        raise ConfigError(f"dialogue.max_total_tokens={cfg.dialogue.max_total_tokens} must exceed "
                          f"rollout.max_new_tokens={cfg.rollout.max_new_tokens}")
    missing = OmegaConf.missing_keys(cfg)
    if missing:
        raise ConfigError(f"required config keys are not set: {sorted(missing)}")


def reward_components(cfg: Any) -> dict[str, str]:
    """Component name -> the service that produces it, for every service the config runs."""
    services = cfg.reward.services
    out = {name: "verifier" for name in cfg.reward.verifiers}
    if services.preference.enabled:
        out[services.preference.component] = "preference"
    if services.judge.enabled:
        out[services.judge.component] = "judge"
        for i in range(len(services.judge.rubric)):
            out[f"{services.judge.component}.{i}"] = "judge"
    if services.remote.enabled:
        for name in list(services.remote.components) + ([services.remote.component] if services.remote.component else []):
            out[name] = "remote"
    return out


def validate_rewards(cfg: Any) -> None:
    """Services, weights, normalisation, curation and the rm stage agree with each other."""
    r, services = cfg.reward, cfg.reward.services
    if not 0 < r.turn_discount <= 1:
        raise ConfigError(f"reward.turn_discount={r.turn_discount!r} must be in (0, 1]")
    if services.preference.enabled and not services.preference.path and "rm" not in cfg.run.stages:
        raise ConfigError("reward.services.preference.enabled needs a reward model: set "
                          "reward.services.preference.path or add 'rm' to run.stages")
    if services.remote.enabled:
        if not services.remote.url:
            raise ConfigError("reward.services.remote.enabled needs reward.services.remote.url "
                              "(http(s)://host:port/path)")
        if not services.remote.components and not services.remote.component:
            raise ConfigError("reward.services.remote: list the components the server returns in "
                              "reward.services.remote.components (or set .component)")
        if not services.remote.timeout_s > 0:
            raise ConfigError(f"reward.services.remote.timeout_s={services.remote.timeout_s!r} must be > 0")
    for key in ("preference", "judge"):
        if getattr(services, key).batch_size < 1:
            raise ConfigError(f"reward.services.{key}.batch_size must be >= 1")
    for key in ("preference", "judge", "remote"):
        section = getattr(services, key)
        if section.timeout_s is not None and not section.timeout_s > 0:
            raise ConfigError(f"reward.services.{key}.timeout_s={section.timeout_s!r} must be > 0")
        if section.retries is not None and section.retries < 0:
            raise ConfigError(f"reward.services.{key}.retries={section.retries!r} must be >= 0")
        for res in ("num_cpus", "num_gpus"):
            if getattr(getattr(services, key), res, 0) < 0:
                raise ConfigError(f"reward.services.{key}.{res} must be >= 0")
    components = reward_components(cfg)
    if not components:
        raise ConfigError("no reward service produces anything: set reward.verifiers or enable a "
                          "service under reward.services")
    for name, weight in r.weights.items():
        if not isinstance(weight, (int, float)):
            raise ConfigError(f"reward.weights.{name}={weight!r} must be a number")
        if name not in components and weight != 0:  # weight 0 switches a component off
            raise ConfigError(f"reward.weights.{name}: no reward service produces {name!r}; "
                              f"components available: {sorted(components)}")
    from reward_services.router import NORMALIZE  # the router owns the choices

    for name, how in r.normalize.items():
        if how not in NORMALIZE:
            raise ConfigError(f"reward.normalize.{name}={how!r}; expected one of {list(NORMALIZE)}")
        if name not in components and how != "none":
            raise ConfigError(f"reward.normalize.{name}: no reward service produces {name!r}; "
                              f"components available: {sorted(components)}")
    cur = cfg.rl.curation
    if cur.enabled:
        if not 0 <= cur.low <= cur.high <= 1:
            raise ConfigError(f"rl.curation: need 0 <= low <= high <= 1, got low={cur.low}, high={cur.high}")
        if cur.component not in components:
            raise ConfigError(f"rl.curation.component={cur.component!r}: no reward service produces it; "
                              f"components available: {sorted(components)}")
    stages = list(cfg.run.stages)
    if stages != sorted(stages, key=STAGES.index):
        raise ConfigError(f"run.stages={stages}: stages run in the order {list(STAGES)}")
    if "rm" in stages:
        rm = cfg.rm
        if not cfg.data.pairs_path:
            raise ConfigError("run.stages includes 'rm' but data.pairs_path is not set; expected a "
                              "Parquet of prompts with chosen/rejected replies")
        if rm.micro_batch_size < 2 or rm.micro_batch_size % 2:
            raise ConfigError(f"rm.micro_batch_size={rm.micro_batch_size} must be even and >= 2 "
                              "(a chosen/rejected pair never straddles micro-batches)")
        if not 0 < rm.eval_fraction < 1:
            raise ConfigError(f"rm.eval_fraction={rm.eval_fraction!r} must be in (0, 1)")
        if not 0 <= rm.min_heldout_accuracy <= 1:
            raise ConfigError(f"rm.min_heldout_accuracy={rm.min_heldout_accuracy!r} must be in [0, 1]")


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
