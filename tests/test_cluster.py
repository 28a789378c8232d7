"""Joining a cluster keeps Ray token auth on whenever a token is at hand."""

import pytest

from rlhf_cluster import cluster


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(cluster, "DEFAULT_TOKEN_PATH", tmp_path / "no-such-token")
    yield monkeypatch
    monkeypatch.undo()  # this process's own Ray session: its auth env, then Ray's cached copy
    cluster.reload_auth_config()


def test_token_file_switches_token_mode_on(clean_env, tmp_path):
    token = tmp_path / "auth_token"
    token.write_text("secret")
    assert cluster.prepare_auth(str(token)) == "token"
    import os

    assert os.environ["RAY_AUTH_MODE"] == "token" and os.environ["RAY_AUTH_TOKEN_PATH"] == str(token)


def test_token_in_env_or_default_file(clean_env, tmp_path):
    clean_env.setenv("RAY_AUTH_TOKEN", "secret")
    assert cluster.prepare_auth() == "token"
    clean_env.delenv("RAY_AUTH_TOKEN")
    clean_env.delenv("RAY_AUTH_MODE")
    default = tmp_path / "default_token"
    default.write_text("secret")
    clean_env.setattr(cluster, "DEFAULT_TOKEN_PATH", default)
    assert cluster.prepare_auth() == "token"


def test_explicit_mode_is_respected_and_missing_file_is_an_error(clean_env, tmp_path):
    clean_env.setenv("RAY_AUTH_MODE", "token")
    assert cluster.prepare_auth() == "token"
    with pytest.raises(FileNotFoundError, match="no-file"):
        cluster.prepare_auth(str(tmp_path / "no-file"))


def test_no_token_warns_and_leaves_mode_unset(clean_env, caplog):
    assert cluster.prepare_auth() == "unset"
    assert "No Ray auth token" in caplog.text


def test_stop_actors_shuts_down_then_kills_even_a_stuck_one(ray_session, tmp_path):
    import time
    from pathlib import Path

    import ray

    class Stoppable:  # defined here: Ray workers cannot import the test module
        def __init__(self, marker: str, stuck: bool):
            self.marker, self.stuck = marker, stuck

        def shutdown(self) -> None:
            if self.stuck:
                time.sleep(60)
            Path(self.marker).write_text("shut down")

    clean, stuck = (ray.remote(Stoppable).options(num_cpus=0).remote(str(tmp_path / name), name == "stuck")
                    for name in ("clean", "stuck"))
    ray.get([clean.__ray_ready__.remote(), stuck.__ray_ready__.remote()])
    started = time.monotonic()
    cluster.stop_actors([clean, stuck], timeout_s=2)
    assert time.monotonic() - started < 30  # the stuck one did not hold it up past the timeout
    assert (tmp_path / "clean").read_text() == "shut down" and not (tmp_path / "stuck").exists()
    for handle in (clean, stuck):
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(handle.__ray_ready__.remote(), timeout=10)
