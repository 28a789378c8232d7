"""Connect to Ray: an embedded local instance, or an existing cluster, with token auth on.

Ray 2.60 turns token authentication on for a new local instance and generates
`~/.ray/auth_token`. A client joining an existing cluster must present that token; we switch
`RAY_AUTH_MODE=token` on whenever a token is at hand (`RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH`
or the default file), so the project's own client never silently runs unauthenticated.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import ray

log = logging.getLogger(__name__)

DEFAULT_TOKEN_PATH = Path.home() / ".ray" / "auth_token"


def prepare_auth(token_path: str | None = None) -> str:
    """Set the auth environment for a joining client; returns the mode in effect."""
    if token_path:
        if not Path(token_path).is_file():
            raise FileNotFoundError(f"--auth-token-file {token_path}: no such file")
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(token_path)
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is None:
        has_token = ("RAY_AUTH_TOKEN" in os.environ or "RAY_AUTH_TOKEN_PATH" in os.environ
                     or DEFAULT_TOKEN_PATH.is_file())
        if has_token:
            os.environ["RAY_AUTH_MODE"] = mode = "token"
        else:
            log.warning("No Ray auth token found (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or %s); "
                        "joining a token-auth cluster will be refused", DEFAULT_TOKEN_PATH)
            mode = "unset"
    reload_auth_config()
    return mode


def reload_auth_config() -> None:
    """Ray caches the auth mode and token per process when it is imported; reload them from the
    environment as Ray's own token setup does, or a client that imported ray first joins
    without its token. Not while this process is connected: that would break its session."""
    if ray.is_initialized():
        return
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def connect(cluster_cfg: Any, address: str | None = None, token_path: str | None = None) -> dict:
    """Start or join Ray. Returns facts worth printing (address, dashboard URL)."""
    if ray.is_initialized():
        ctx = ray.get_runtime_context()
        return {"address": ctx.gcs_address, "dashboard": None, "embedded": False}
    address = address or cluster_cfg.address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
                        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}}
    if address:
        prepare_auth(token_path)
        info = ray.init(address=address, namespace=cluster_cfg.namespace, runtime_env=env,
                        log_to_driver=True)
        embedded = False
    else:
        info = ray.init(num_cpus=cluster_cfg.num_cpus, num_gpus=cluster_cfg.num_gpus,
                        include_dashboard=True, dashboard_host=cluster_cfg.dashboard_host,
                        namespace=cluster_cfg.namespace, runtime_env=env, log_to_driver=True)
        embedded = True
    url = getattr(info, "dashboard_url", None)
    return {"address": info.address_info.get("gcs_address") if hasattr(info, "address_info") else address,
            "dashboard": f"http://{url}" if url else None, "embedded": embedded}


def check_namespace_free() -> None:
    """Fail before any actor starts if the namespace already holds named actors. A job's actor
    names (`rollout-0`, `learner-0`, `rollout-scale`, ...) are unique only per namespace, so a
    second job there would otherwise die at its first named actor, maybe after a long rm stage."""
    namespace = ray.get_runtime_context().namespace
    taken = sorted(ray.util.list_named_actors())
    if taken:
        shown = ", ".join(taken[:6]) + (", ..." if len(taken) > 6 else "")
        raise RuntimeError(f"cluster.namespace={namespace!r} already has running named actors ({shown}): "
                           f"another job uses it. Give this job its own namespace, e.g. "
                           f"cluster.namespace={namespace}-2")


def stop_actors(handles: list, timeout_s: float = 30.0) -> None:
    """Ask each actor to shut down (its `shutdown` method: a rollout worker's vLLM engine killed
    outright leaves its shared-memory queues in the node's /dev/shm), then kill them all; a
    dead or stuck actor is just killed."""
    refs = [h.shutdown.remote() for h in handles]
    ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    kill_actors(handles)


def kill_actors(handles: list, timeout_s: float = 30.0) -> None:
    """Kill actors and wait until they are dead. `ray.kill` only starts the kill; until the
    actor is dead its name stays taken, so a run started right after (a test, a retried job)
    would fail to create its `rollout-0` or `learner-0`."""
    handles = list(handles)
    for handle in handles:
        ray.kill(handle, no_restart=True)
    deadline = time.monotonic() + timeout_s
    for handle in handles:
        while time.monotonic() < deadline:
            try:
                ray.get(handle.__ray_ready__.remote(), timeout=max(0.1, deadline - time.monotonic()))
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                break
            time.sleep(0.05)  # answered: the kill has not taken effect yet
