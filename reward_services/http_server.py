"""A small reference HTTP server that puts a user's reward function behind a bearer token.

Users who already have a reward model or judge running elsewhere point RemoteRewardService at
it; this is the minimal server speaking the same protocol, for wrapping a plain Python
`fn(response, task) -> {name: value}`. Protocol: POST JSON `{"items": [{"episode_id",
"response", "task"}, ...]}` with `Authorization: Bearer <token>`; answer
`{"scores": [{name: value} | {"__error__": message}, ...]}`, one entry per item.
"""

from __future__ import annotations

import hmac
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

MAX_BODY_BYTES = 16 * 1024 * 1024  # a batch of text responses is far smaller; refuse floods


def serve_reward_fn(fn: Callable[[str, dict], dict[str, float]], token: str, host: str = "127.0.0.1",
                    port: int = 0, max_body_bytes: int = MAX_BODY_BYTES) -> tuple[ThreadingHTTPServer, str]:
    """Start serving in a daemon thread; returns the server (call `.shutdown()`) and its URL.

    Binds to loopback by default: exposing it needs an explicit `host`, and then TLS in
    front of it (a reverse proxy), since the token travels in a header.
    """
    if not token:
        raise ValueError("serve_reward_fn needs a non-empty token")
    expected = f"Bearer {token}".encode()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            given = self.headers.get("Authorization", "").encode("utf-8", "replace")
            if not hmac.compare_digest(given, expected):  # constant time: no guessing byte by byte
                return self._reply(401, {"error": "missing or wrong bearer token"})
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                return self._reply(411, {"error": "Content-Length required"})
            if length < 0 or length > max_body_bytes:
                return self._reply(413, {"error": f"body over {max_body_bytes} bytes"})
            try:
                items = json.loads(self.rfile.read(length))["items"]
                if not isinstance(items, list):
                    raise TypeError("'items' is not a list")
            except (ValueError, KeyError, TypeError) as exc:
                return self._reply(400, {"error": f"expected JSON {{'items': [...]}}: {exc}"})
            self._reply(200, {"scores": [self._score(item) for item in items]})

        def _score(self, item) -> dict:
            """A failing item becomes an item error for the router to count, not a 500 for all."""
            try:
                return {str(k): float(v) for k, v in fn(item["response"], item.get("task") or {}).items()}
            except Exception as exc:
                episode = item.get("episode_id") if isinstance(item, dict) else None
                return {"__error__": f"reward fn failed on episode {episode!r}: {type(exc).__name__}: {exc}"}

        def _reply(self, status: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args) -> None:  # noqa: A002 - keep test and job logs quiet
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True  # a handler stuck in a slow fn must not block shutdown
    threading.Thread(target=server.serve_forever, name="reward-http", daemon=True).start()
    bound_host, bound_port = server.server_address[:2]
    return server, f"http://{bound_host}:{bound_port}/"
