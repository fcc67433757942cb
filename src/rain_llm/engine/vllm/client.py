"""HTTP to vLLM servers, through the official `openai` client (its connection pool, typed errors).

Every call has a deadline (`timeout`: the whole call, retries and backoff included); connection
errors, 429, 502 and 503 are retried with exponential backoff (a server's `Retry-After` honoured);
everything else fails at once. Errors become the `EngineError` they are, by HTTP status and the
structured body vLLM sends (`{"error": {"message", "type", "param", "code"}}`), never by matching
its English: 400 refused (with the server flag that would allow it, from `param`), 401/403 the key,
404 not a vLLM server or not its model, 408/504 and our deadline a timeout, 429/5xx unavailable.
"""

from __future__ import annotations

import os
import random
import threading
import time
from typing import Any, cast
from urllib.parse import urlsplit

import openai

from rain_llm.errors import EngineError, EngineRefused, EngineTimeout, EngineUnavailable, RainError

DEFAULT_KEY_ENV = "RAIN_ENGINE_KEY"
TIMEOUT_ENV = "RAIN_ENGINE_TIMEOUT"  # seconds a call may take, retries included (default TIMEOUT)
TIMEOUT = 300.0
RETRIES = 3  # after the first try: connection errors, 429, 502, 503
RETRY_STATUS = (429, 502, 503)
BACKOFF = 0.25  # seconds before the first retry; doubled each time, at most BACKOFF_CAP
BACKOFF_CAP = 4.0
# What a server needs to be started with to accept a request it refused, by the refused parameter.
FLAG_FOR = {"logprobs": "--max-logprobs", "input_tokens": "--max-model-len", "max_tokens": "--max-model-len",
            "prompt": "--max-model-len"}


class NotFound(EngineUnavailable):
    """The server has no such path or model (HTTP 404)."""


class Server:
    """One vLLM server: its base URL (without /v1), its client, how many live answers it holds."""

    def __init__(self, url: str, key: str | None):
        text = url.strip().rstrip("/")
        text = text[:-3] if text.endswith("/v1") else text
        try:
            parts = urlsplit(text if "://" in text else "http://" + text)
            parts.port  # noqa: B018 - raises for a port that is not a number
        except ValueError as err:
            raise RainError(f"invalid --engine-url {url!r} ({err}): give a server's base URL, e.g. "
                            "http://127.0.0.1:8000") from err
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RainError(f"invalid --engine-url {url!r}: give a server's base URL, e.g. http://127.0.0.1:8000")
        self.url = f"{parts.scheme}://{parts.netloc}{parts.path}"
        self.host = parts.hostname
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=key or "none", max_retries=0, timeout=TIMEOUT)
        self.headers: dict[str, Any] = {} if key else {"Authorization": openai.Omit()}  # no key: no header at all
        self.answers = 0  # live answers pinned here
        self.gate = Gate()

    def __repr__(self) -> str:
        return f"Server({self.url!r})"


class Client:
    """Calls to servers with a deadline, retries and errors mapped (module docstring)."""

    def __init__(self, key_env: str = DEFAULT_KEY_ENV, timeout: float | None = None, retries: int = RETRIES):
        self.key_env = key_env
        self.key = os.environ.get(key_env) or None
        self.timeout = timeout if timeout is not None else timeout_from_env()
        self.retries = retries

    def server(self, url: str) -> Server:
        return Server(url, self.key)

    def post(self, server: Server, path: str, body: dict[str, Any]) -> Any:
        """The JSON reply to POST `path` (under /v1 unless it starts with `//`: the server's root)."""
        return self._call(server, "post", path, body)

    def get(self, server: Server, path: str, *, text: bool = False) -> Any:
        return self._call(server, "get", path, None, text=text)

    def _call(self, server: Server, method: str, path: str, body: dict[str, Any] | None, *,
              text: bool = False) -> Any:
        where = f"the vLLM server at {server.url}"
        url = server.url + path[1:] if path.startswith("//") else path
        deadline = time.monotonic() + self.timeout
        for attempt in range(self.retries + 1):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            options: dict[str, Any] = {"timeout": left, "max_retries": 0, "headers": server.headers}
            try:
                if method == "post":
                    return server.client.post(url, cast_to=object, body=body, options=cast(Any, options))
                return server.client.get(url, cast_to=cast(Any, str if text else object), options=cast(Any, options))
            except openai.APITimeoutError:
                break
            except openai.APIConnectionError as err:
                if attempt == self.retries:
                    raise EngineUnavailable(f"cannot reach {where} ({_cause(err)}): is it running, on this port? "
                                            "start it, or fix --engine-url") from err
                _sleep(attempt, None, deadline)
            except openai.APIStatusError as err:
                if err.status_code in RETRY_STATUS and attempt < self.retries:
                    _sleep(attempt, err.response.headers.get("retry-after"), deadline)
                    continue
                raise self._status_error(server, path, err) from err
        raise EngineTimeout(f"{where} did not answer within {self.timeout:.0f} s: is it stuck or overloaded? "
                            f"see its log (${TIMEOUT_ENV} sets the limit)")

    def _status_error(self, server: Server, path: str, err: openai.APIStatusError) -> EngineError:
        """An HTTP error as the engine error it is: by status, and by the refused parameter."""
        status, where = err.status_code, f"the vLLM server at {server.url}"
        path = path[1:] if path.startswith("//") else "/v1" + path
        body = err.body if isinstance(err.body, dict) else {}
        message = _line(str(body.get("message") or body.get("detail") or err.message))
        if status == 400 or status == 422:
            flag = FLAG_FOR.get(err.param or "")
            hint = f" (start it with a larger {flag})" if flag else ""
            return EngineRefused(f"{where} refused the request ({message}){hint}")
        if status in (401, 403):
            return EngineUnavailable(f"{where} refused the request (HTTP {status}: {message}): set ${self.key_env} "
                                     "to the server's --api-key")
        if status == 404:
            return NotFound(f"{where} has no {path} or not that model (HTTP 404: {message}): give the base "
                                     "URL of a vLLM server and its --served-model-name")
        if status in (408, 504):
            return EngineTimeout(f"{where} timed out (HTTP {status}: {message})")
        if status in RETRY_STATUS:
            return EngineUnavailable(f"{where} is overloaded or restarting (HTTP {status} after {self.retries} "
                                     f"retries: {message})")
        return EngineError(f"{where} failed (HTTP {status}: {message}): see its log")


def timeout_from_env() -> float:
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    try:
        value = float(text) if text else TIMEOUT
    except ValueError as err:
        raise RainError(f"invalid ${TIMEOUT_ENV}={text!r}: seconds") from err
    if not value > 0:
        raise RainError(f"invalid ${TIMEOUT_ENV}={text!r}: seconds, more than 0")
    return value


def _sleep(attempt: int, retry_after: str | None, deadline: float) -> None:
    """Exponential backoff with jitter (or the server's Retry-After), never past the deadline."""
    try:
        delay = float(retry_after) if retry_after else BACKOFF * 2 ** attempt * (0.5 + random.random())
    except ValueError:
        delay = BACKOFF * 2 ** attempt
    time.sleep(max(0.0, min(delay, BACKOFF_CAP, deadline - time.monotonic())))


def _cause(err: openai.APIConnectionError) -> str:
    cause = err.__cause__ or err.__context__
    return _line(f"{type(cause).__name__}: {cause}" if cause else err.message, 160)


def _line(text: str, limit: int = 400) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


class Gate:
    """vLLM's V1 sampler gives a batch holding a `logprob_token_ids` request that request's logprobs
    for every request in it: the others' top-k logprobs come back as one `-9999.0` entry
    (vllm-project/vllm PR #51789, open; measured on 0.32). So per server, scoring requests ("ids")
    and requests for top-k logprobs ("top") are never in flight together; the two kinds take turns
    (a kind waits while the other runs, and lets a waiting other go first next)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.active = {"ids": 0, "top": 0}
        self.waiting = {"ids": 0, "top": 0}
        self.turn: str | None = None

    def enter(self, kind: str | None) -> None:
        if kind is None:
            return
        other = "top" if kind == "ids" else "ids"
        with self.cond:
            self.waiting[kind] += 1
            while self.active[other] or (self.waiting[other] and self.turn == other):
                self.cond.wait()
            self.waiting[kind] -= 1
            self.active[kind] += 1

    def leave(self, kind: str | None) -> None:
        if kind is None:
            return
        with self.cond:
            self.active[kind] -= 1
            if not self.active[kind]:
                self.turn = "top" if kind == "ids" else "ids"
            self.cond.notify_all()
