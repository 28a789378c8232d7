"""Start the reward services a config asks for, as named Ray actors with their own resources,
and the RewardRouter over them. Start-up waits for every actor (model loading must not count
against a scoring timeout) and a service that cannot start fails the run here, naming it."""

from __future__ import annotations

import os
from typing import Any

import ray

from reward_services.router import RewardRouter
from rlhf_cluster.cluster import kill_actors


def start_reward_services(cfg: Any, pad_token_id: int) -> tuple[dict[str, Any], RewardRouter]:
    from reward_services.judge import RubricJudgeService
    from reward_services.preference import PreferenceService
    from reward_services.remote import RemoteRewardService
    from reward_services.verifier_service import VerifierService
    from rlhf_cluster.rm_stage import rm_output_dir

    svc = cfg.reward.services
    handles: dict[str, Any] = {}
    timeouts: dict[str, float] = {}
    retries: dict[str, int] = {}

    def start(name: str, cls, section, *args, **kwargs) -> None:
        handles[name] = ray.remote(cls).options(
            name=f"reward-{name}", num_cpus=section.num_cpus,
            num_gpus=getattr(section, "num_gpus", 0.0)).remote(*args, **kwargs)
        if section.timeout_s is not None:
            timeouts[name] = section.timeout_s
        if section.retries is not None:
            retries[name] = section.retries

    if cfg.reward.verifiers:
        handles["verifier"] = ray.remote(VerifierService).options(
            name="reward-verifier", num_cpus=cfg.reward.num_cpus).remote(list(cfg.reward.verifiers))
    if svc.preference.enabled:
        start("preference", PreferenceService, svc.preference, str(svc.preference.path or rm_output_dir(cfg)),
              component=svc.preference.component, batch_size=svc.preference.batch_size,
              dtype=cfg.model.dtype, policy_path=cfg.model.path, pad_token_id=pad_token_id)
    if svc.judge.enabled:
        start("judge", RubricJudgeService, svc.judge, svc.judge.model_path or cfg.model.path,
              rubric=list(svc.judge.rubric), component=svc.judge.component,
              max_new_tokens=svc.judge.max_new_tokens, batch_size=svc.judge.batch_size,
              engine=svc.judge.engine, dtype=cfg.model.dtype, seed=cfg.run.seed)
    if svc.remote.enabled:
        # The token travels as an actor argument (never in config or the runtime_env shown on
        # the dashboard); unset here, the actor reads the variable on its own node.
        start("remote", RemoteRewardService, svc.remote, svc.remote.url,
              token=os.environ.get(svc.remote.token_env), token_env=svc.remote.token_env,
              timeout_s=svc.remote.timeout_s, component=svc.remote.component)
    for name, handle in handles.items():
        try:
            ray.get(handle.__ray_ready__.remote())
        except ray.exceptions.RayActorError as exc:
            kill_actors(handles.values())
            raise RuntimeError(f"reward service {name!r} (actor reward-{name}) failed to start: {exc}") from None
    weights = {name: w for name, w in cfg.reward.weights.items() if w != 0}  # 0: switched off
    router = RewardRouter(handles, weights, timeout_s=cfg.reward.timeout_s,
                          retries=cfg.reward.retries, on_failure=cfg.reward.on_failure,
                          turn_discount=cfg.reward.turn_discount, normalize=dict(cfg.reward.normalize),
                          service_timeouts=timeouts, service_retries=retries)
    return handles, router
