"""A reward service that forwards a batch to the user's own HTTP reward server.

Same `score(items)` contract as VerifierService, so the RewardRouter runs it as a Ray actor
(`ray.remote(RemoteRewardService)`). Failures split by whether a retry can help: timeouts,
refused connections, 429 and 5xx raise (the router retries, then drops or fails); a refused
token, another 4xx or an answer of the wrong shape becomes an `__error__` on every item (the
router counts and drops them) - never a silent zero. See http_server.py for the protocol.
"""

from __future__ import annotations

import json
import math
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

ERROR_KEY = "__error__"  # as in reward_services.router (not imported: keeps the actor free of ray imports)
_DROP = object()  # marks a task value json_safe leaves out


def json_safe(value: Any) -> Any:
    """Task values that JSON can carry (str keys, lists, str, finite numbers, bool, None);
    anything else (tensors, audio arrays, objects) is dropped, not stringified."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else _DROP
    if isinstance(value, (list, tuple)):
        return [v for v in map(json_safe, value) if v is not _DROP]
    if isinstance(value, dict):
        return {k: v for k, v in ((k, json_safe(v)) for k, v in value.items())
                if isinstance(k, str) and v is not _DROP}
    return _DROP


class RemoteRewardService:
    def __init__(self, url: str, token: str | None = None, token_env: str = "RLHF_REWARD_TOKEN",
                 timeout_s: float = 30.0, component: str | None = None):
        """The token comes from `token` or, on the actor's node, the `token_env` variable
        (pass it with the job's runtime_env so it never sits in a config file)."""
        if urllib.parse.urlsplit(url).scheme not in ("http", "https") or not urllib.parse.urlsplit(url).netloc:
            raise ValueError(f"reward server url must be http(s)://host[:port]/path, got {url!r}")
        token = token or os.environ.get(token_env)
        if not token:
            raise ValueError(f"no token for reward server {url}: pass token= or set ${token_env}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.url, self.timeout_s, self.component = url, timeout_s, component
        self._token = token

    def __repr__(self) -> str:  # never show the token; safe before __init__ finished (Ray calls it
        # when reporting a constructor error)
        return f"RemoteRewardService(url={getattr(self, 'url', None)!r}, component={getattr(self, 'component', None)!r})"

    def score(self, items: list[dict]) -> list[dict[str, float]]:
        if not items:
            return []
        payload = {"items": [{"episode_id": str(item["episode_id"]), "response": str(item["response"]),
                              "task": json_safe(item.get("task") or {})} for item in items]}
        request = urllib.request.Request(
            self.url, data=json.dumps(payload).encode(), method="POST",
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self._token}"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                body = response.read()
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                return self._all(f"remote reward server refused the token (HTTP {exc.code}) at {self.url}", items)
            if exc.code == 429 or exc.code >= 500:
                raise RuntimeError(f"remote reward server {self.url} answered HTTP {exc.code}") from None
            return self._all(f"remote reward server rejected the request (HTTP {exc.code}) at {self.url}", items)
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise RuntimeError(f"remote reward server {self.url} unreachable or timed out after "
                               f"{self.timeout_s}s: {type(reason).__name__}: {reason}") from None
        return self._parse(body, items)

    def _parse(self, body: bytes, items: list[dict]) -> list[dict[str, float]]:
        expected = f'expected JSON {{"scores": [...]}} with {len(items)} entries'
        try:
            scores = json.loads(body)["scores"]
        except (ValueError, KeyError, TypeError):
            return self._all(f"remote reward server {self.url} sent malformed output; {expected}", items)
        if not isinstance(scores, list) or len(scores) != len(items):
            got = f"{len(scores)} entries" if isinstance(scores, list) else type(scores).__name__
            return self._all(f"remote reward server {self.url} sent {got}; {expected}", items)
        return [self._row(entry, item) for entry, item in zip(scores, items)]

    def _row(self, entry: Any, item: dict) -> dict[str, float]:
        where = f"remote reward server {self.url}, episode {item['episode_id']!r}"
        if isinstance(entry, dict) and ERROR_KEY in entry:
            return {ERROR_KEY: f"{where}: {entry[ERROR_KEY]}"}
        if _is_number(entry):
            if self.component is None:
                return {ERROR_KEY: f"{where}: got a plain number; expected {{name: value}} or set component"}
            entry = {self.component: entry}
        if not isinstance(entry, dict) or not entry or not all(_is_number(v) for v in entry.values()):
            return {ERROR_KEY: f"{where}: expected a non-empty {{name: finite number}}, got {entry!r:.200}"}
        return {str(k): float(v) for k, v in entry.items()}

    @staticmethod
    def _all(message: str, items: list[dict]) -> list[dict[str, float]]:
        return [{ERROR_KEY: message} for _ in items]


def _is_number(value: Any) -> bool:
    """Finite int/float; booleans are not scores, and NaN would poison the advantage."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
