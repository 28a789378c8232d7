"""RemoteRewardService against a real HTTP server on loopback, alone and behind a real RewardRouter."""

import json
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import ray

from reward_services.http_server import serve_reward_fn
from reward_services.remote import RemoteRewardService, json_safe
from reward_services.router import RewardRouter, RewardServiceError

TOKEN = "s3cret-token"


def judge_fn(response, task):
    """Hand-checkable scores: length of the reply, and whether it names the task's answer."""
    if task.get("boom"):
        raise ValueError("bad row")
    return {"length": float(len(response)), "mentions": float(task["answer"] in response)}


@pytest.fixture(scope="module")
def server():
    srv, url = serve_reward_fn(judge_fn, TOKEN)
    yield url
    srv.shutdown()
    srv.server_close()


def items(*responses, task=None):
    return [{"episode_id": f"e{i}", "response": r, "task": task or {"answer": "3"}} for i, r in enumerate(responses)]


def actor(*args, **kwargs):
    handle = ray.remote(RemoteRewardService).options(num_cpus=0).remote(*args, **kwargs)
    ray.get(handle.__ray_ready__.remote())
    return handle


def test_correct_token_returns_fn_scores(server):
    service = RemoteRewardService(server, token=TOKEN)
    task = {"answer": "3", "audio": object(), "choices": ("1", "3"), "bad": float("nan")}  # not JSON: dropped
    assert service.score(items("it is 3", "four", task=task)) == [
        {"length": 7.0, "mentions": 1.0}, {"length": 4.0, "mentions": 0.0}]
    assert service.score([]) == []


def test_token_from_environment_and_none_is_a_startup_error(server, monkeypatch):
    monkeypatch.setenv("MY_REWARD_TOKEN", TOKEN)
    assert RemoteRewardService(server, token_env="MY_REWARD_TOKEN").score(items("3")) == [
        {"length": 1.0, "mentions": 1.0}]
    monkeypatch.delenv("RLHF_REWARD_TOKEN", raising=False)
    with pytest.raises(ValueError, match="RLHF_REWARD_TOKEN"):
        RemoteRewardService(server)
    with pytest.raises(ValueError, match="http"):
        RemoteRewardService("file:///etc/passwd", token=TOKEN)
    assert TOKEN not in repr(RemoteRewardService(server, token=TOKEN))


@pytest.mark.parametrize("token", ["wrong", TOKEN + "x", TOKEN[:-1]])
def test_wrong_token_is_an_error_on_every_item(server, token):
    rows = RemoteRewardService(server, token=token).score(items("3", "4"))
    assert len(rows) == 2
    for row in rows:
        assert list(row) == ["__error__"]
        assert "refused the token (HTTP 401)" in row["__error__"] and server in row["__error__"]
        assert token not in row["__error__"]


def test_server_refuses_missing_token_and_oversized_body(server):
    request = urllib.request.Request(server, data=b'{"items": []}', method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=5)
    assert err.value.code == 401
    big = urllib.request.Request(server, data=b" " * 10, method="POST",
                                 headers={"Authorization": f"Bearer {TOKEN}", "Content-Length": str(17 * 2**20)})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(big, timeout=5)
    assert err.value.code == 413


def test_fn_error_stays_on_its_item(server):
    rows = RemoteRewardService(server, token=TOKEN).score(items("3") + items("3", task={"boom": True}))
    assert rows[0] == {"length": 1.0, "mentions": 1.0}
    assert "bad row" in rows[1]["__error__"] and "'e0'" in rows[1]["__error__"]


def canned_server(body: bytes, status: int = 200, delay_s: float = 0.0):
    """A server answering every POST with `body`: for malformed and plain-number replies."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            time.sleep(delay_s)
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}/"


@pytest.mark.parametrize("body, expected", [
    (b"not json", "malformed output"),
    (b'{"result": []}', "malformed output"),
    (b'{"scores": [{"judge": 1.0}]}', "sent 1 entries; expected"),
    (b'{"scores": {"judge": 1.0}}', "sent dict; expected"),
])
def test_malformed_replies_are_item_errors(body, expected):
    srv, url = canned_server(body)
    try:
        rows = RemoteRewardService(url, token=TOKEN).score(items("a", "b"))
    finally:
        srv.shutdown()
    assert len(rows) == 2 and all(expected in row["__error__"] and "2 entries" in row["__error__"] for row in rows)


def test_plain_number_scores_need_a_component():
    srv, url = canned_server(json.dumps({"scores": [0.5, 2, True, "x", float("nan"), {"j": 1}]}).encode())
    try:
        rows = RemoteRewardService(url, token=TOKEN, component="judge").score(items(*"abcdef"))
        bare = RemoteRewardService(url, token=TOKEN).score(items(*"abcdef"))
    finally:
        srv.shutdown()
    assert rows[:2] == [{"judge": 0.5}, {"judge": 2.0}]
    assert all("__error__" in row for row in rows[2:5])  # a bool, a string and NaN are not scores
    assert rows[5] == {"j": 1.0}
    assert "set component" in bare[0]["__error__"] and bare[5] == {"j": 1.0}


def test_server_errors_and_unreachable_servers_raise():
    srv, url = canned_server(b"oops", status=503)
    try:
        with pytest.raises(RuntimeError, match="HTTP 503"):
            RemoteRewardService(url, token=TOKEN).score(items("a"))
    finally:
        srv.shutdown()
        srv.server_close()
    with pytest.raises(RuntimeError, match="unreachable"):
        RemoteRewardService(url, token=TOKEN, timeout_s=2).score(items("a"))


def test_slow_server_raises_after_timeout():
    srv, url = canned_server(b'{"scores": [1.0]}', delay_s=3.0)
    try:
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="timed out"):
            RemoteRewardService(url, token=TOKEN, timeout_s=0.3, component="j").score(items("a"))
        assert time.monotonic() - start < 2.0
    finally:
        srv.shutdown()


def test_json_safe_keeps_only_json_values():
    assert json_safe({"a": [1, 2.5, float("inf"), None, object(), ("x", True)], 3: "k", "d": {"s": {1}}}) == {
        "a": [1, 2.5, None, ["x", True]], "d": {}}


class TestThroughRouter:
    @pytest.fixture(autouse=True)
    def _ray(self, ray_session):
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        yield

    def test_scores_flow_through_router(self, server):
        router = RewardRouter({"remote": actor(server, token=TOKEN)}, {"mentions": 1.0, "length": 0.1},
                              timeout_s=30, retries=0, on_failure="fail")
        scored = router.score(items("it is 3", "four"))
        assert [s.reward for s in scored] == pytest.approx([1.7, 0.4])
        assert router.counters == {"timeouts": 0, "errors": 0, "dropped": 0}

    def test_refused_token_is_dropped_and_counted_or_fails(self, server):
        handle = actor(server, token="wrong")
        router = RewardRouter({"remote": handle}, {"mentions": 1.0}, timeout_s=30, retries=0, on_failure="drop")
        scored = router.score(items("3", "4", "5"))
        assert [s.reward for s in scored] == [None] * 3
        assert all("HTTP 401" in s.error for s in scored)
        assert router.counters == {"timeouts": 0, "errors": 3, "dropped": 3}
        strict = RewardRouter({"remote": handle}, {"mentions": 1.0}, timeout_s=30, retries=0, on_failure="fail")
        with pytest.raises(RewardServiceError, match="HTTP 401"):
            strict.score(items("3"))

    def test_slow_server_is_retried_then_dropped_promptly(self):
        srv, url = canned_server(b'{"scores": [1.0]}', delay_s=5.0)
        try:
            router = RewardRouter({"remote": actor(url, token=TOKEN, timeout_s=0.5, component="judge")},
                                  {"judge": 1.0}, timeout_s=10, retries=1, on_failure="drop")
            start = time.monotonic()
            (scored,) = router.score(items("a"))
            assert time.monotonic() - start < 0.5 * 2 + 3.0
            assert scored.reward is None and "timed out" in scored.error
            assert router.counters == {"timeouts": 0, "errors": 2, "dropped": 1}
            # and when the router's own bound is the tighter one, it times out the call itself
            router = RewardRouter({"remote": actor(url, token=TOKEN, timeout_s=30, component="judge")},
                                  {"judge": 1.0}, timeout_s=0.5, retries=0, on_failure="fail")
            with pytest.raises(RewardServiceError, match="timed out"):
                router.score(items("a"))
        finally:
            srv.shutdown()
