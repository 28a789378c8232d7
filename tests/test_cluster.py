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
