"""`VLLMBackend`: the backend interface (`rain_llm.runtime.backend`) over vLLM servers.

It executes what the scheduler starts by sending it at once (`wire.py` says how a request becomes
bodies of one prompt and one choice; `client.py` sends them, a pool of threads keeping them in
flight together so the server's continuous batching batches across every answer), and hands back
each request whose replies are all in: its result, or the `EngineError` that fails its answer alone.
An answer (request.owner) is pinned to one server on its first request, the one with the fewest live
answers, so that server's prefix cache serves the answer's whole tree. `retain`/`release` cost
nothing else: the server's automatic prefix caching keeps what is used. `scope(reuse_cache=False)`
gives every request a `cache_salt` of its own, so nothing is shared between requests.

Receipts: `tokens` = what the server computed for the request (each body's prompt tokens not found
cached, plus generated ones, from its usage); `seconds` = its share of the wall time (each moment
split evenly among the HTTP requests in flight then); `forwards` stay empty (the server does not
report them).
"""

from __future__ import annotations

import statistics
import threading
import time
import uuid
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from rain_llm.config import RainConfig, token_set_length
from rain_llm.engine.vllm.client import Client, Server
from rain_llm.engine.vllm.wire import Wire, processed
from rain_llm.errors import EngineError, RainError
from rain_llm.runtime.accounting import Receipt
from rain_llm.runtime.backend import Batch, Completion, ModelRequest, SampleRows

WORKERS = 64  # HTTP requests in flight at most (per backend and its scopes)
PINS = 4096  # answers remembered per backend: owners that never release (judges) age out


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


class _Shared:
    """What a backend and its scopes share: servers, client, threads, pins, counters."""

    def __init__(self, servers: list[Server], client: Client, isolate_scoring: bool):
        self.servers = servers
        self.client = client
        self.isolate_scoring = isolate_scoring
        self.pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="rain-vllm")
        self.clock = _Clock()
        self.lock = threading.Lock()
        self.pins: OrderedDict[Hashable, Server] = OrderedDict()
        self.turn = 0
        self.calls = 0
        self.bytes = 0
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


@dataclass(eq=False)
class _Job:
    """One model request in flight: its bodies' replies as they come, and how to read them."""

    request: ModelRequest
    server: Server
    read: Callable[[list[Any]], Any]
    replies: list[Any]
    left: int
    dropped: bool = False


class VLLMBackend:
    """The backend interface over vLLM servers serving one model (module docstring).
    `max_logprobs`: the servers' --max-logprobs (what `refusal` checks settings against);
    `isolate_scoring`: keep scoring and top-k requests apart (`client.Gate`); `salt`: a cache salt
    for every request (a cache of its own, e.g. to measure from a cold cache)."""

    batches_in_flight = True  # the server batches whatever is in flight: requests go out at once

    def __init__(self, servers: list[Server], client: Client, wire: Wire, *, context_window: int,
                 max_logprobs: int, isolate_scoring: bool = True, salt: str | None = None):
        if not servers:
            raise RainError("no vLLM server: give --engine-url URL (e.g. http://127.0.0.1:8000)")
        self._setup(_Shared(servers, client, isolate_scoring), wire, context_window, max_logprobs, True, salt)

    def _setup(self, shared: _Shared, wire: Wire, context_window: int, max_logprobs: int, reuse_cache: bool,
               salt: str | None) -> None:
        self.shared = shared
        self.wire = wire
        self.name = f"vllm:{wire.model}"
        self.context_window = context_window
        self.max_logprobs = max_logprobs
        self.reuse_cache = reuse_cache
        self.salt = salt
        self._cond = threading.Condition()
        self._jobs: dict[int, _Job] = {}  # request id -> its job, while in flight
        self._done: list[Completion] = []

    def scope(self, *, reuse_cache: bool | None = None) -> VLLMBackend:
        """The same servers, requests of its own (judges); reuse_cache=False: every request salted."""
        other = object.__new__(VLLMBackend)
        other._setup(self.shared, self.wire, self.context_window, self.max_logprobs,
                     self.reuse_cache if reuse_cache is None else reuse_cache, self.salt)
        return other

    # ------------------------------------------------------------------ what it reports
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

    @property
    def http_bytes(self) -> int:
        """Bytes of request bodies sent so far (this backend and its scopes)."""
        return self.shared.bytes

    def routes(self) -> list[tuple[Hashable, str]]:
        """(owner, server URL) of every request sent (the latest 100,000)."""
        with self.shared.lock:
            return list(self.shared.routes)

    def in_flight(self) -> int:
        """Requests sent and not yet handed back (zero once every answer has ended)."""
        with self._cond:
            return len(self._jobs) + len(self._done)

    def refusal(self, cfg: RainConfig) -> str | None:
        """Why these servers would refuse an answer with these settings (one line naming the setting
        and the server flag that would allow it), or None."""
        if cfg.method == "vanilla":  # greedy decoding asks for no log-probabilities
            return None
        needed: list[tuple[str, int]] = []
        if any(token_set_length(cfg, depth) > 1 for depth in range(len(cfg.token_set_lengths) + 1)):
            needed.append(("top_k", cfg.top_k if 0 < cfg.top_k < self.wire.vocab else 0))
        if any(token_set_length(cfg, depth) == 1 for depth in range(len(cfg.token_set_lengths) + 1)):
            needed += [("num_candidates", cfg.num_candidates), ("dynamic_max_children", cfg.dynamic_max_children)]
        for setting, value in needed:
            if value > self.max_logprobs:
                return (f"{setting}={value} needs {value} log-probabilities per token, but the vLLM server allows "
                        f"{self.max_logprobs}: lower {setting}, or start the server with --max-logprobs {value}")
        if cfg.method == "rain" and any(token_set_length(cfg, d) > 1 for d in range(len(cfg.token_set_lengths) + 1)):
            if not 0 < cfg.top_k < self.wire.vocab and cfg.temperature != 1.0:
                return (f"temperature={cfg.temperature} without top_k: the vLLM backend computes a sampled token "
                        "set's probability from the top log-probabilities, so set top_k (or temperature 1)")
        return None

    def health(self) -> str | None:
        """None when every server answers its /health; else which one does not, in one line."""
        for server in self.shared.servers:
            try:
                self.shared.client.get(server, "//health", text=True)
            except EngineError as err:
                return str(err)
        return None

    def ping(self, repeats: int = 5) -> float:
        """Median seconds of a trivial request (one prompt token, max_tokens 1) to the first server:
        the HTTP and scheduling overhead every request pays."""
        ids = self.wire.codec.encode("Hello")[:1] or [0]
        body = {"model": self.wire.model, "prompt": ids, "max_tokens": 1, "temperature": 0.0}
        times = []
        for _ in range(max(1, repeats)):
            start = time.perf_counter()
            self.shared.client.post(self.shared.servers[0], "/completions", body)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    # ------------------------------------------------------------------ the interface
    def execute(self, batch: Batch) -> list[Completion]:
        """Send what starts; hand back every request that has come back, waiting up to
        `batch.wait` seconds for one when none has."""
        for request in batch.start:
            self._start(request)
        with self._cond:
            if batch.wait > 0 and self._jobs and not self._done:
                self._cond.wait(batch.wait)
            done, self._done = self._done, []
        return done

    def cancel(self, requests: Sequence[ModelRequest]) -> None:
        """Forget these requests (replies still on their way are dropped)."""
        ids = {r.id for r in requests}
        with self._cond:
            for request_id in ids:
                job = self._jobs.pop(request_id, None)
                if job is not None:
                    job.dropped = True
            self._done = [c for c in self._done if c.request.id not in ids]

    def decoded(self, request: SampleRows) -> list[int] | None:
        """Replies come whole: nothing is known before a request ends."""
        return None

    def retain(self, owner: Hashable, prefixes: Sequence[Sequence[int]], *, exact: bool = False,
               prune: bool = True) -> None:
        """Nothing to do: the server's prefix cache keeps what requests use (LRU)."""

    def release(self, owner: Hashable) -> None:
        """The answer is done: its server may take another."""
        self.shared.unpin(owner)

    # ------------------------------------------------------------------ sending
    def _start(self, request: ModelRequest) -> None:
        request.receipt.model = self.name
        try:
            plan = self.wire.plan(request, self.salt if self.reuse_cache else uuid.uuid4().hex)
        except EngineError as err:  # a request this client cannot express: it fails alone
            with self._cond:
                self._done.append(Completion(request, error=err))
            return
        if not plan.bodies:
            with self._cond:
                self._done.append(Completion(request, plan.read([])))
            return
        job = _Job(request, self.shared.server_for(request.owner), plan.read, [None] * len(plan.bodies),
                   len(plan.bodies))
        with self._cond:
            self._jobs[request.id] = job
        for i, body in enumerate(plan.bodies):
            self.shared.pool.submit(self._send, job, i, body)

    def _send(self, job: _Job, i: int, body: dict[str, Any]) -> None:
        """One body, on a pool thread: sent through the scoring gate, its reply read into the job."""
        if job.dropped:
            return
        shared = self.shared
        with shared.lock:
            shared.calls += 1
            shared.bytes += len(str(body))
            shared.routes.append((job.request.owner, job.server.url))
        gate = ("ids" if body.get("logprob_token_ids") else "top" if body.get("logprobs") else None) \
            if shared.isolate_scoring else None
        reply: Any = None
        error: EngineError | None = None
        job.server.gate.enter(gate)
        shared.clock.start(job.request.receipt)
        try:
            reply = shared.client.post(job.server, "/completions", body)
        except EngineError as err:
            error = err
        except Exception as err:  # noqa: BLE001 - a bug: still one line, never a hung answer
            error = EngineError(f"vLLM backend failed talking to {job.server.url}: {type(err).__name__}: {err}")
        finally:
            shared.clock.stop(job.request.receipt)
            job.server.gate.leave(gate)
        with self._cond:
            if job.dropped:
                return
            result = None
            if error is None:
                try:
                    job.request.receipt.tokens += processed(reply)
                    job.replies[i] = reply
                    job.left -= 1
                    if job.left == 0:
                        result = job.read(job.replies)
                except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
                    error = EngineError(f"the vLLM server at {job.server.url} sent a reply this client cannot read "
                                        f"({type(err).__name__}: {err}): is it vLLM 0.32 or later?")
            if error is not None:  # this request fails, and only its answer with it
                job.dropped = True
                self._jobs.pop(job.request.id, None)
                self._done.append(Completion(job.request, error=error))
            elif job.left == 0:
                del self._jobs[job.request.id]
                self._done.append(Completion(job.request, result))
            self._cond.notify_all()
