"""`VLLMBackend`: the backend interface (`rain_llm.runtime.backend`) over vLLM servers.

Every request is a `POST /v1/completions` with `prompt` as token ids and `return_token_ids`, so no
text crosses the wire: the tokenizer here only renders prompts, as for the local engine.

How requests become HTTP requests:
  SampleRows  rows grouped by rule: a greedy row alone (temperature 0); sampled rows with the same
              rule as one request with `n` and a `seed` drawn from the answer's own uniforms (vLLM
              samples choice i with seed + i, so seeds are SEED_STRIDE apart). `logprobs` = the
              row's top_k: a row's log-probability under its own warped distribution (logits / T,
              top-k, renormalised, as `engine.hf.stream.sample`) is computed here from the raw top
              logprobs at each position. (The server's `processed_logprobs` mode is server-wide and
              leaves greedy rows unwarped.) Rollouts stop on `stop_token_ids`: every id whose text
              ends with a stop char (exact, unlike `stop` strings, which match inside tokens and are
              capped at 4); markers go in `stop`. The model's stop ids end every row, and a row's
              stop token is its last token.
  TopTokens   max_tokens 1, temperature 0, `logprobs` n: the n most likely (id, logprob) at the
              first position (a log-probability is a logit minus a per-context constant).
  Score       one request, prefix + each suffix as a list of prompts, `logprob_token_ids` = the
              options: softmax probabilities of the raw next-token distribution. Never
              `prompt_logprobs` (such a request skips the prefix cache).
  Prefill     nothing is sent: it completes at once. The server caches a prefix on first use,
              and requests that arrive together share its computation (measured: of four
              concurrent requests with one new 600-token prefix, three found 576 tokens cached),
              so a request of its own would only add a round trip.
Requests are sent at once by a pool of worker threads, so the server's continuous batching batches
across every answer in flight; `run(kind)` hands back what has completed, on the caller's thread.
An answer (request.owner) is pinned to one server on its first request, the one with the fewest
live answers, so that server's prefix cache serves the answer's whole tree. `retain`/`release` cost
nothing: the server's automatic prefix caching keeps what is used. `scope(reuse_cache=False)` gives
every request a `cache_salt` of its own, so nothing is shared between requests.

Receipts: `tokens` = usage.prompt_tokens - prompt_tokens_details.cached_tokens + completion_tokens
(the cached part is reported when the server runs with --enable-prompt-tokens-details, otherwise
the whole prompt counts; vLLM 0.32 reports it for a request's last prompt only, so a request of
several prompts, which share their prefix, counts that figure once per prompt); `seconds` = the
request's share of the wall time (each moment split evenly among the HTTP requests in flight
then); `forwards` stays empty (the server does not report them).

Errors (a server down or dying mid-answer, a wrong URL or model name, a prompt over the server's
max-model-len, any HTTP error, no answer within the timeout) become one `RainError` line naming the
server and what to do. The API key, if any, is read from the environment variable `key_env`
(default RAIN_ENGINE_KEY, not OPENAI_API_KEY, so that a key meant for OpenAI is never sent to a
self-hosted server by accident) and sent as `Authorization: Bearer`.

Server flags RAIN needs: prefix caching (vLLM's default), --max-logprobs at least the largest top_k
or candidate count RAIN asks for (20 covers the defaults and dynamic additions), --block-size 32
on CPU (only full blocks are cached; the CPU default of 128 caches little of short prompts),
--enable-prompt-tokens-details (cached tokens in the receipts), --generation-config vllm or
requests that set every sampling field (this client sends them all, so the model's
generation_config cannot change the distribution).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import math
import os
import queue
import socket
import statistics
import threading
import time
import uuid
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from rain_llm.errors import RainError
from rain_llm.runtime.accounting import Receipt
from rain_llm.runtime.backend import (
    Completion,
    ModelRequest,
    Prefill,
    Row,
    Sample,
    SampleRows,
    Score,
    TextStop,
    TopTokens,
)
from rain_llm.runtime.text import Codec

DEFAULT_KEY_ENV = "RAIN_ENGINE_KEY"
TIMEOUT_ENV = "RAIN_ENGINE_TIMEOUT"  # seconds a request may take (default READ_TIMEOUT)
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 300.0
SEED_STRIDE = 1 << 10  # requests' seeds this far apart: choice i of a request samples with seed + i
WORKERS = 64  # HTTP requests in flight at most (per backend and its scopes)
PINS = 4096  # answers remembered per backend: owners that never release (judges) age out
PLAIN = {"top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}
PROBE = "Hello, world! RAIN: 12 tokens?"  # text whose ids must match the server's tokenizer


# ---------------------------------------------------------------------------------------------- servers
class Server:
    """One vLLM server: its base URL (without /v1) and how many live answers are pinned to it."""

    def __init__(self, url: str):
        text = url.strip().rstrip("/")
        text = text[:-3] if text.endswith("/v1") else text
        try:
            parts = urlsplit(text if "://" in text else "http://" + text)
            port = parts.port
        except ValueError as err:
            raise RainError(f"invalid --engine-url {url!r} ({err}): give a server's base URL, e.g. "
                            "http://127.0.0.1:8000") from err
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RainError(f"invalid --engine-url {url!r}: give a server's base URL, e.g. http://127.0.0.1:8000")
        self.url = f"{parts.scheme}://{parts.netloc}{parts.path}"
        self.https = parts.scheme == "https"
        self.host, self.port = parts.hostname, port or (443 if self.https else 80)
        self.path = parts.path
        self.answers = 0
        self.gate = _Gate()

    def __repr__(self) -> str:
        return f"Server({self.url!r})"


class _Http:
    """JSON over keep-alive HTTP/1.1 connections, one per worker thread and server (stdlib only)."""

    def __init__(self, key_env: str, timeout: float):
        self.key_env = key_env
        self.key = os.environ.get(key_env) or None
        self.timeout = timeout
        self.local = threading.local()

    def call(self, server: Server, method: str, path: str, body: Any = None) -> Any:
        """The JSON reply; RainError (one line: which server, what to do) for anything else."""
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        where = f"the vLLM server at {server.url}"
        for attempt in (0, 1):
            conn = self._connection(server)
            try:
                if conn.sock is None:
                    conn.connect()
                    conn.sock.settimeout(self.timeout)
                conn.request(method, server.path + path, body=data, headers=headers)
                response = conn.getresponse()
                status, raw = response.status, response.read()
                break
            except ConnectionRefusedError as err:
                self._drop(server)
                if attempt:
                    raise RainError(f"{where} went away mid-answer (connection closed, then refused): it stopped "
                                    "or crashed; see its log, restart it and rerun (rain eval resumes where it "
                                    "stopped)") from err
                raise RainError(f"cannot reach {where}: connection refused (is it running, on this port? start "
                                "it, or fix --engine-url)") from err
            except TimeoutError as err:
                self._drop(server)
                raise RainError(f"{where} did not answer within {self.timeout:.0f} s: is it stuck or overloaded? "
                                f"see its log (${TIMEOUT_ENV} sets the limit)") from err
            except socket.gaierror as err:
                self._drop(server)
                raise RainError(f"cannot reach {where}: unknown host {server.host!r} (fix --engine-url)") from err
            except (ConnectionError, http.client.HTTPException) as err:  # a stale keep-alive, or the server died
                self._drop(server)
                if attempt:
                    raise RainError(f"{where} closed the connection mid-request twice ({type(err).__name__}): "
                                    "see its log") from err
            except OSError as err:
                self._drop(server)
                raise RainError(f"cannot reach {where}: {_line(str(err))} (fix --engine-url)") from err
        if status >= 400:
            raise RainError(_http_error(server, path, status, raw, self.key_env))
        try:
            return json.loads(raw)
        except ValueError as err:
            raise RainError(f"{server.url}{path} answered something that is not JSON: give the base URL of a "
                            "vLLM server, e.g. http://127.0.0.1:8000") from err

    def _connection(self, server: Server) -> http.client.HTTPConnection:
        conns = self.local.__dict__.setdefault("conns", {})
        conn = conns.get(server.url)
        if conn is None:
            kind = http.client.HTTPSConnection if server.https else http.client.HTTPConnection
            conn = conns[server.url] = kind(server.host, server.port, timeout=CONNECT_TIMEOUT)
        return conn

    def _drop(self, server: Server) -> None:
        conn = self.local.__dict__.get("conns", {}).pop(server.url, None)
        if conn is not None:
            conn.close()


def _line(text: str, limit: int = 400) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def _http_error(server: Server, path: str, status: int, raw: bytes, key_env: str) -> str:
    """One line for an HTTP error: vLLM's own message, and what to do about it."""
    try:
        payload = json.loads(raw)
    except ValueError:
        payload = None
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        message = _line(str(error.get("message", "")))
    elif isinstance(payload, dict) and "detail" in payload:
        message = _line(str(payload["detail"]))
    else:
        message = _line(raw.decode(errors="replace"), 200)
    where = f"the vLLM server at {server.url}"
    if status == 404 and not isinstance(error, dict):
        return (f"{server.url} has no {path} (HTTP 404: {message}): give the base URL of a vLLM server, "
                "e.g. http://127.0.0.1:8000")
    if status == 404 and "does not exist" in message:
        return f"{where} does not serve that model ({message}): fix the model name"
    if status in (401, 403):
        return f"{where} refused the request (HTTP {status}: {message}): set ${key_env} to the server's --api-key"
    if "maximum context length" in message:
        return f"prompt too long for {where}: {message} (start it with a larger --max-model-len)"
    if "logprobs" in message and "max allowed" in message:
        return f"{where}: {message} (start it with --max-logprobs 20 or more)"
    return f"{where} answered HTTP {status} to {path}: {message}"


# ---------------------------------------------------------------------------------------------- plumbing
class _Workers:
    """Daemon threads that make the HTTP calls: as many as calls wait, up to `limit` (daemons: an
    exit after an error never waits for a server)."""

    def __init__(self, limit: int = WORKERS):
        self.tasks: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.limit, self.threads, self.idle, self.queued = limit, 0, 0, 0

    def submit(self, task: Callable[[], None]) -> None:
        with self.lock:
            self.queued += 1
            if self.queued > self.idle and self.threads < self.limit:
                self.threads += 1
                threading.Thread(target=self._loop, daemon=True, name=f"rain-vllm-{self.threads}").start()
        self.tasks.put(task)

    def _loop(self) -> None:
        while True:
            with self.lock:
                self.idle += 1
            task = self.tasks.get()
            with self.lock:
                self.idle -= 1
                self.queued -= 1
            task()


class _Clock:
    """Wall time shared out among the HTTP requests in flight (each receipt gets its share), and the
    most requests that were ever in flight at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running: Counter[Receipt] = Counter()
        self.last = time.perf_counter()
        self.peak = 0

    def _tick(self) -> None:
        now = time.perf_counter()
        total = sum(self.running.values())
        if total:
            share = (now - self.last) / total
            for receipt, count in self.running.items():
                receipt.seconds += share * count
        self.last = now

    def start(self, receipt: Receipt) -> None:
        with self.lock:
            self._tick()
            self.running[receipt] += 1
            self.peak = max(self.peak, sum(self.running.values()))

    def stop(self, receipt: Receipt) -> None:
        with self.lock:
            self._tick()
            self.running[receipt] -= 1
            if not self.running[receipt]:
                del self.running[receipt]


class _Gate:
    """vLLM 0.32's V1 sampler (the CPU one) gives a batch holding a `logprob_token_ids` request
    that request's logprobs for every request in it: the others' top-k logprobs come back as one
    `-9999.0` entry (vllm-project/vllm PR #51789, measured here). So per server, scoring requests
    ("ids") and requests for top-k logprobs ("top") are never in flight together; the two kinds
    take turns (a kind waits while the other runs, and lets a waiting other go first next)."""

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


def _gate_kind(body: dict[str, Any]) -> str | None:
    if body.get("logprob_token_ids"):
        return "ids"
    return "top" if body.get("logprobs") else None


class _Shared:
    """What a backend and its scopes share: servers, HTTP client, workers, pins, stop ids, counters."""

    def __init__(self, urls: Sequence[str], model: str, codec: Codec | None, key_env: str, timeout: float,
                 isolate_scoring: bool = True):
        if isinstance(urls, str):
            urls = [urls]
        if not urls:
            raise RainError("no vLLM server: give --engine-url URL (e.g. http://127.0.0.1:8000)")
        self.servers = [Server(url) for url in urls]
        self.model = model
        self.codec = codec
        self.isolate_scoring = isolate_scoring
        self.http = _Http(key_env, timeout)
        self.workers = _Workers()
        self.clock = _Clock()
        self.lock = threading.Lock()
        self.pins: OrderedDict[Hashable, Server] = OrderedDict()
        self.turn = 0
        self.ending: dict[str, frozenset[int]] = {}
        self.calls = 0
        self.routes: deque[tuple[Hashable, str]] = deque(maxlen=100_000)  # (owner, server URL) per request

    def server_for(self, owner: Hashable) -> Server:
        """The owner's server: pinned on its first request to the one with the fewest live answers."""
        with self.lock:
            server = self.pins.get(owner)
            if server is None:
                fewest = min(s.answers for s in self.servers)
                choice = [s for s in self.servers if s.answers == fewest]
                server = self.pins[owner] = choice[self.turn % len(choice)]
                self.turn += 1
                server.answers += 1
                while len(self.pins) > PINS:
                    _, old = self.pins.popitem(last=False)
                    old.answers -= 1
            self.pins.move_to_end(owner)
            return server

    def unpin(self, owner: Hashable) -> None:
        with self.lock:
            server = self.pins.pop(owner, None)
            if server is not None:
                server.answers -= 1

    def ending_with(self, chars: str) -> frozenset[int]:
        """Every vocabulary id whose decoded text ends with one of `chars` (once per char set)."""
        with self.lock:
            found = self.ending.get(chars)
        if found is None:
            assert self.codec is not None
            texts = (self.codec.decode([i]) for i in range(len(self.codec.tokenizer)))  # ~0.25 s for 49k ids
            found = frozenset(i for i, text in enumerate(texts) if text and text[-1] in chars)
            with self.lock:
                self.ending[chars] = found
        return found


@dataclass(eq=False)
class _Job:
    """One model request in flight: its HTTP requests' replies as they come, and how to read them."""

    request: ModelRequest
    receipt: Receipt
    server: Server
    read: Callable[[list[Any]], Any]
    replies: list[Any]
    left: int
    dropped: bool = False


# ---------------------------------------------------------------------------------------------- the backend
class VLLMBackend:
    """The backend interface over one or more vLLM servers serving the same model (module docstring).
    `codec` (the `Rain`'s: one lock per tokenizer) decodes the vocabulary once per stop-char set
    (rollout stop ids); its stop ids end every row. `isolate_scoring=False` lets scoring requests
    share batches with requests for top-k logprobs: only for servers whose sampler keeps them
    apart (`_Gate`)."""

    def __init__(self, urls: Sequence[str], model: str, codec: Codec, *, context_window: int,
                 key_env: str = DEFAULT_KEY_ENV, timeout: float = READ_TIMEOUT, isolate_scoring: bool = True):
        self._setup(_Shared(urls, model, codec, key_env, timeout, isolate_scoring), context_window, True)

    def _setup(self, shared: _Shared, context_window: int, reuse_cache: bool) -> None:
        self.shared = shared
        self.model = shared.model
        self.name = f"vllm:{shared.model}"
        self.context_window = context_window
        self.reuse_cache = reuse_cache
        self._cond = threading.Condition()
        self._jobs: dict[int, _Job] = {}  # id(request) -> its job, while in flight
        self._done: list[Completion] = []
        self._error: RainError | None = None
        self._rng = np.random.default_rng(0)  # seeds for rows that come without uniforms

    def scope(self, *, reuse_cache: bool | None = None) -> VLLMBackend:
        """The same servers, requests of its own (judges); reuse_cache=False: every request salted."""
        other = object.__new__(VLLMBackend)
        other._setup(self.shared, self.context_window, self.reuse_cache if reuse_cache is None else reuse_cache)
        return other

    @property
    def servers(self) -> list[str]:
        return [s.url for s in self.shared.servers]

    @property
    def peak_in_flight(self) -> int:
        """The most HTTP requests ever in flight at once (this backend and its scopes)."""
        return self.shared.clock.peak

    @property
    def http_requests(self) -> int:
        """HTTP requests sent so far (this backend and its scopes)."""
        return self.shared.calls

    def routes(self) -> list[tuple[Hashable, str]]:
        """(owner, server URL) of every request sent (the latest 100,000)."""
        with self.shared.lock:
            return list(self.shared.routes)

    # ------------------------------------------------------------------ the interface
    def submit(self, requests: Sequence[ModelRequest]) -> None:
        for request in requests:
            bodies, read = self._plan(request)
            receipt = Receipt(request.phase, self.name)
            if not bodies:
                with self._cond:
                    self._done.append(Completion(request, read([]), receipt))
                    self._cond.notify_all()
                continue
            job = _Job(request, receipt, self.shared.server_for(request.owner), read, [None] * len(bodies),
                       len(bodies))
            with self._cond:
                self._jobs[id(request)] = job
            for i, body in enumerate(bodies):
                body = {"model": self.model, "return_token_ids": True, "return_tokens_as_token_ids": True, **body}
                if not self.reuse_cache:
                    body["cache_salt"] = uuid.uuid4().hex
                self.shared.workers.submit(lambda job=job, i=i, body=body: self._send(job, i, body))

    def run(self, kind: str, *, whole: bool = False) -> list[Completion]:
        with self._cond:
            while True:
                self._raise_failure()
                if not whole or not any(job.request.kind == kind for job in self._jobs.values()):
                    break
                self._cond.wait(1.0)
            done = [c for c in self._done if c.request.kind == kind]
            self._done = [c for c in self._done if c.request.kind != kind]
        return done

    def busy(self) -> bool:
        with self._cond:
            return bool(self._jobs or self._done or self._error)

    def wait(self, timeout: float) -> None:
        with self._cond:
            if self._jobs and not self._done and self._error is None:
                self._cond.wait(timeout)

    def cancel(self, owner: Hashable) -> None:
        """Forget the owner's requests (replies still on their way are dropped)."""
        with self._cond:
            for key, job in list(self._jobs.items()):
                if job.request.owner == owner:
                    job.dropped = True
                    del self._jobs[key]
            self._done = [c for c in self._done if c.request.owner != owner]
        self.shared.unpin(owner)

    def retain(self, owner: Hashable, prefixes: Sequence[Sequence[int]], *, exact: bool = False,
               prune: bool = True) -> None:
        """Nothing to do: the server's prefix cache keeps what requests use (LRU)."""

    def release(self, owner: Hashable) -> None:
        """The answer is done: its server may take another."""
        self.shared.unpin(owner)

    def ping(self, repeats: int = 5) -> float:
        """Median seconds of a trivial request (one prompt token, max_tokens 1) to the first server:
        the HTTP and scheduling overhead every request pays."""
        ids = self.shared.codec.encode("Hello")[:1] or [0]
        body = {"model": self.model, "prompt": ids, "max_tokens": 1, "temperature": 0.0}
        times = []
        for _ in range(max(1, repeats)):
            start = time.perf_counter()
            self.shared.http.call(self.shared.servers[0], "POST", "/v1/completions", body)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    # ------------------------------------------------------------------ requests -> HTTP bodies
    def _plan(self, request: ModelRequest) -> tuple[list[dict[str, Any]], Callable[[list[Any]], Any]]:
        """The request's /v1/completions bodies, and how to read their replies back into its result."""
        if isinstance(request, Prefill):  # the server caches on first use (module docstring)
            return [], lambda replies: None
        if isinstance(request, SampleRows):
            return self._plan_rows(request)
        if isinstance(request, TopTokens):
            _check_context(request.context)
            n = request.n
            return ([{"prompt": list(request.context), "max_tokens": 1, "temperature": 0.0, "logprobs": n}],
                    lambda replies: _top_tokens(replies[0], n))
        if isinstance(request, Score):
            if not request.prefix or not all(request.suffixes):
                raise RainError("evaluation prompt and its suffixes must not be empty")
            prompts = [list(request.prefix) + list(s) for s in request.suffixes]
            options = [int(o) for o in request.option_ids]
            # `logprobs` must be set with logprob_token_ids but its value is ignored: 1 passes any --max-logprobs
            return ([{"prompt": prompts, "max_tokens": 1, "temperature": 0.0, "logprobs": 1,
                      "logprob_token_ids": sorted(set(options))}],
                    lambda replies: _option_probs(replies[0], options, len(prompts)))
        raise TypeError(f"{type(request).__name__} is not a request for a language model")

    def _plan_rows(self, request: SampleRows) -> tuple[list[dict[str, Any]], Callable[[list[Any]], Any]]:
        """A greedy row alone; sampled rows with the same rule as one request with `n` and a seed."""
        _check_context(request.context)
        groups: dict[Any, list[int]] = {}
        for r, row in enumerate(request.rows):
            key = ("greedy", r) if row.greedy else (row.max_tokens, row.temperature, row.top_k, row.stop)
            groups.setdefault(key, []).append(r)
        bodies, places = [], list(groups.values())
        for rows in places:
            row = request.rows[rows[0]]
            top_k = self._top_k(row)
            body = {"prompt": list(request.context), "n": len(rows), "max_tokens": row.max_tokens, **PLAIN,
                    "logprobs": top_k, "stop_token_ids": sorted(self._stops(row.stop))}
            if row.greedy:
                body["temperature"] = 0.0
            else:
                body |= {"temperature": row.temperature, "top_k": top_k, "seed": self._seed(request, rows)}
            if row.stop is not None and row.stop.markers:
                body["stop"] = list(row.stop.markers)
            bodies.append(body)

        def read(replies: list[Any]) -> list[Sample]:
            out: list[Sample] = [Sample([], 0.0)] * len(request.rows)
            for rows, reply in zip(places, replies):
                for r, choice in zip(rows, _choices(reply, len(rows))):
                    row = request.rows[r]
                    tokens = [int(t) for t in choice["token_ids"]]
                    out[r] = Sample(tokens, _row_logprob(choice, tokens, row.temperature, self._top_k(row)))
            return out

        return bodies, read

    def _top_k(self, row: Row) -> int:
        """The row's top-k (0: off); a row's log-probability needs the top-k raw logprobs, or the
        sampled token's alone at temperature 1 without top-k. A rollout's is never read."""
        top_k = row.top_k if 0 < row.top_k < len(self.shared.codec.tokenizer) else 0
        if top_k == 0 and row.temperature != 1.0 and row.stop is None:
            raise RainError(f"the vLLM backend cannot compute log-probabilities at temperature {row.temperature} "
                            "without top-k (the server returns only the top --max-logprobs tokens): set top_k "
                            "or use temperature 1")
        return top_k

    def _stops(self, stop: TextStop | None) -> frozenset[int]:
        ids = self.shared.codec.stop_ids
        return ids | self.shared.ending_with(stop.chars) if stop is not None and stop.chars else ids

    def _seed(self, request: SampleRows, rows: list[int]) -> int:
        """A seed from the rows' own uniforms (the answer's random stream: the same alone or in any
        batch), a multiple of SEED_STRIDE so that requests' seed ranges never overlap."""
        if len(rows) > SEED_STRIDE:
            raise RainError(f"{len(rows)} samples in one request: the vLLM backend takes at most {SEED_STRIDE}")
        if request.uniforms is not None:
            block = np.asarray(request.uniforms, dtype=np.float64).reshape(len(request.rows), -1)[rows]
            digest = hashlib.sha256(np.ascontiguousarray(block).tobytes()).digest()
            base = int.from_bytes(digest[:8], "little") % (1 << 52)
        else:
            base = int(self._rng.integers(1 << 52))
        return base * SEED_STRIDE

    # ------------------------------------------------------------------ HTTP, on the worker threads
    def _send(self, job: _Job, i: int, body: dict[str, Any]) -> None:
        if job.dropped:
            return
        shared = self.shared
        with shared.lock:
            shared.calls += 1
            shared.routes.append((job.request.owner, job.server.url))
        reply: Any = None
        error: RainError | None = None
        gate = _gate_kind(body) if shared.isolate_scoring else None
        job.server.gate.enter(gate)
        shared.clock.start(job.receipt)
        try:
            reply = shared.http.call(job.server, "POST", "/v1/completions", body)
        except RainError as err:
            error = err
        except Exception as err:  # a bug: still one line, never a hung answer
            error = RainError(f"vLLM backend failed talking to {job.server.url}: {type(err).__name__}: {err}")
        finally:
            shared.clock.stop(job.receipt)
            job.server.gate.leave(gate)
        with self._cond:
            if job.dropped:
                return
            result = None
            if error is None:
                try:
                    job.receipt.tokens += _processed(reply, body["prompt"])
                    job.replies[i] = reply
                    job.left -= 1
                    if job.left == 0:
                        result = job.read(job.replies)
                except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
                    error = RainError(f"the vLLM server at {job.server.url} sent a reply this client cannot read "
                                      f"({type(err).__name__}: {_line(str(err), 100)}): is it vLLM 0.32 or later?")
            if error is not None:
                self._error = self._error or error
            elif job.left == 0:
                del self._jobs[id(job.request)]
                self._done.append(Completion(job.request, result, job.receipt))
            self._cond.notify_all()

    def _raise_failure(self) -> None:
        """A request failed: forget everything in flight (the caller's answers end) and raise."""
        error = self._error
        if error is None:
            return
        for job in self._jobs.values():
            job.dropped = True
        self._jobs, self._done, self._error = {}, [], None
        raise error


# ---------------------------------------------------------------------------------------------- replies
def _check_context(context: Sequence[int]) -> None:
    if not context:
        raise RainError("empty context: nothing to condition on")


def _token_id(key: str) -> int:
    """The id in a `top_logprobs` key (requests ask for "token_id:<id>" keys)."""
    return int(key.rsplit(":", 1)[1])


def _choices(reply: Any, count: int) -> list[dict[str, Any]]:
    choices = sorted(reply["choices"], key=lambda c: c["index"])
    if len(choices) != count:
        raise ValueError(f"{len(choices)} choices, {count} asked for")
    return choices


def _processed(reply: Any, prompt: list[Any]) -> int:
    """Token positions the server ran for a reply: prompt tokens not served from its cache, plus
    the generated ones. The cached figure is the last prompt's: each of several prompts (sharing
    their prefix) is taken to have found as much."""
    usage = reply.get("usage") or {}
    prompts = len(prompt) if prompt and isinstance(prompt[0], list) else 1
    tokens = int(usage.get("prompt_tokens", 0))
    cached = min(tokens, prompts * int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0))
    return tokens - cached + int(usage.get("completion_tokens", 0))


def _row_logprob(choice: dict[str, Any], tokens: list[int], temperature: float, top_k: int) -> float:
    """Log-probability of a row's tokens under its own sampling distribution: raw logprobs / T,
    renormalised over the top k (the raw top-k logprobs of each position come with the reply);
    without top-k, at T = 1, the raw logprobs themselves (NaN at other T: only rollouts get there,
    and their log-probability is never read)."""
    logprobs = choice["logprobs"]
    if top_k == 0:
        return float(sum(logprobs["token_logprobs"])) if temperature == 1.0 else math.nan
    total = 0.0
    for token, top in zip(tokens, logprobs["top_logprobs"]):
        raw = {_token_id(k): float(v) for k, v in top.items()}
        scaled = np.sort(np.fromiter(raw.values(), dtype=np.float64))[::-1][:top_k] / temperature
        peak = float(scaled[0])
        total += raw[token] / temperature - (peak + math.log(float(np.exp(scaled - peak).sum())))
    return float(total)


def _top_tokens(reply: Any, n: int) -> list[tuple[int, float]]:
    """The n most likely (id, logprob) at the first position, most likely first, ties lower id first."""
    (choice,) = _choices(reply, 1)
    top = choice["logprobs"]["top_logprobs"][0]
    return sorted(((_token_id(k), float(v)) for k, v in top.items()), key=lambda p: (-p[1], p[0]))[:n]


def _option_probs(reply: Any, options: list[int], rows: int) -> np.ndarray:
    """(suffixes, options) probabilities from each prompt's first-position logprobs of the options."""
    out = np.zeros((rows, len(options)), dtype=np.float64)
    for i, choice in enumerate(_choices(reply, rows)):
        top = {_token_id(k): float(v) for k, v in choice["logprobs"]["top_logprobs"][0].items()}
        out[i] = [math.exp(top[o]) for o in options]
    return out


# ---------------------------------------------------------------------------------------------- connect
def _served(http: _Http, server: Server, name: str | None) -> dict[str, Any]:
    """The /v1/models entry of the model the server serves (`name`, or its first)."""
    reply = http.call(server, "GET", "/v1/models")
    entries = reply.get("data") if isinstance(reply, dict) else None
    if not entries:
        raise RainError(f"{server.url}/v1/models lists no model: is it a vLLM server?")
    ids = [str(e.get("id")) for e in entries]
    entry = entries[0] if name is None else next((e for e in entries if e.get("id") == name), None)
    if entry is None:
        raise RainError(f"the vLLM server at {server.url} serves {', '.join(map(repr, ids))}, not {name!r}: "
                        f"fix the name, or start it with --served-model-name {name}")
    if not isinstance(entry.get("max_model_len"), int):
        raise RainError(f"{server.url}/v1/models gives no max_model_len: is it a vLLM server?")
    return entry


def _model_stop_ids(tokenizer: Any, folder: str) -> list[int]:
    """End-of-turn ids: the tokenizer's EOS and the folder's generation_config.json eos_token_id."""
    ids = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
    config = Path(folder) / "generation_config.json"
    if config.is_file():
        try:
            eos = json.loads(config.read_text()).get("eos_token_id")
        except ValueError as err:
            raise RainError(f"{config} is not valid JSON: {err}") from err
        ids.update([eos] if isinstance(eos, int) else eos or [])
    return sorted(int(i) for i in ids)


def connect(urls: str | Sequence[str], tokenizer: str | None = None, *, key_env: str = DEFAULT_KEY_ENV,
            name: str | None = None, timeout: float | None = None) -> Any:
    """A `Rain` whose model runs on the vLLM servers at `urls` (all serving the same model). The
    tokenizer comes from `tokenizer` (a folder, .gguf, short name or hub id, as --model), else from
    the folder the server loaded when that is a local folder; the context window from the servers'
    max_model_len. The server's tokenizer is checked against it on a probe text."""
    from transformers import AutoTokenizer

    from rain_llm.api import Rain
    from rain_llm.engine.hf.models import resolve

    if timeout is None:
        text = os.environ.get(TIMEOUT_ENV, "").strip()
        try:
            timeout = float(text) if text else READ_TIMEOUT
        except ValueError as err:
            raise RainError(f"invalid ${TIMEOUT_ENV}={text!r}: seconds") from err
    probe = _Shared(urls, name or "", None, key_env, timeout)
    entries = [_served(probe.http, server, name) for server in probe.servers]
    model, root = str(entries[0]["id"]), str(entries[0].get("root") or "")
    other = [f"{s.url} serves {e['id']!r}" for s, e in zip(probe.servers, entries) if e["id"] != model]
    if other:
        raise RainError(f"the servers serve different models ({probe.servers[0].url} serves {model!r}, "
                        f"{'; '.join(other)}): give servers of one model")
    if tokenizer is not None:
        folder = resolve(tokenizer)[0]
    elif root and Path(root).is_dir():
        folder = root
    else:
        raise RainError(f"the vLLM server at {probe.servers[0].url} loaded {root or model!r}, not a folder here: "
                        "give --model FOLDER for the tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise RainError(f"cannot load a tokenizer from {folder}: {_line(str(err), 200)}") from err
    _check_tokenizer(probe, model, tok, folder, root)
    stop = _model_stop_ids(tok, folder) if Path(folder).is_dir() else \
        ([int(tok.eos_token_id)] if tok.eos_token_id is not None else [])
    codec = Codec(tok, stop)
    backend = VLLMBackend(urls, model, codec, context_window=min(int(e["max_model_len"]) for e in entries),
                          key_env=key_env, timeout=timeout)
    rain = Rain(None, tok, backend=backend, stop=stop, name=model)
    rain.codec = codec  # one codec, so one lock, for the tokenizer: the backend decodes with it too
    return rain


def _check_tokenizer(shared: _Shared, model: str, tokenizer: Any, folder: str, root: str) -> None:
    """The server must tokenize a probe text as the local tokenizer does (ids cross the wire)."""
    server = shared.servers[0]
    try:
        reply = shared.http.call(server, "POST", "/tokenize", {"model": model, "prompt": PROBE,
                                                               "add_special_tokens": False})
    except RainError as err:
        if "HTTP 404" in str(err) and "has no" in str(err):
            return  # a server without /tokenize: nothing to compare
        raise
    ours = list(tokenizer(PROBE, add_special_tokens=False)["input_ids"])
    if list(reply.get("tokens", [])) != ours:
        raise RainError(f"the tokenizer from {folder} does not match the model the vLLM server at {server.url} "
                        f"runs ({root or model}): give --model with that model's folder")
