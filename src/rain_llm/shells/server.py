"""`rain serve`: an OpenAI-compatible HTTP server that answers with RAIN, fit for a public port.

    rain serve --port 8000 --api-key-env RAIN_API_KEY     # the bundled model, paper-hh settings
    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=os.environ["RAIN_API_KEY"])
    client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Hi"}],
                                   max_tokens=32, extra_body={"rain": {"t_max": 10}})

FastAPI on uvicorn. A request is checked on the event loop (typed fields, the server's caps,
its size in bytes), its prompt rendered and tokenised in a thread pool, and only then handed to
the model worker: one thread that owns the model and runs a continuous batch (`ContinuousBatch`).
Between two rounds, waiting answers join (up to `max_batch` in flight), so every forward pass is
batched across the requests in flight and nobody waits for another's answer. Work is bounded:
caps per request, a bounded queue (429 with Retry-After beyond it), a deadline per request (then
the best committed answer, finish_reason "timeout"), body size and read timeouts. /health says
when the model is ready, /metrics speaks Prometheus, each request gets one access-log line.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import os
import queue
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import EventSourceResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.concurrency import run_in_threadpool
from uvicorn.protocols.http.h11_impl import H11Protocol

from rain_llm.config import RainConfig
from rain_llm.errors import RainError
from rain_llm.runtime.scheduler import Failure
from rain_llm.shells.protocol import ChatJob, Limits, RequestError, chat_response, chunk, parse_chat

__all__ = ["RainServer", "Limits", "check_port", "api_key_from"]


# ---------------------------------------------------------------------------------------------- the worker
@dataclass(eq=False)  # hashed by identity: a pending request is its own key in the batch
class Pending:
    """A request handed to the worker: its checked job, its prepared answer, and where its events go
    (("start",), ("delta", text), ("done", generation, finish reason), ("error", RequestError)):
    `emit` puts them, from any thread, on `events`, read by the request's handler."""

    job: ChatJob
    emit: Callable[[tuple], None]
    events: asyncio.Queue
    deadline: float
    answer: Any = None
    cancelled: bool = False
    sent: str = ""  # streamed text so far

    def send(self, text: str | None) -> None:
        """Stream what `text` adds to what was sent (nothing if it does not extend it)."""
        if self.job.stream and text is not None and text.startswith(self.sent) and len(text) > len(self.sent):
            self.emit(("delta", text[len(self.sent):]))
            self.sent = text


class Metrics:
    """Prometheus metrics of one server (its own registry)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("rain_http_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=r)
        self.latency = Histogram("rain_request_seconds", "Time to answer a chat request (until its last byte)",
                                 buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1200), registry=r)
        self.queued = Gauge("rain_queue_length", "Requests waiting for a place in the batch", registry=r)
        self.in_flight = Gauge("rain_answers_in_flight", "Answers in the running batch", registry=r)
        self.answers = Counter("rain_answers", "Answers finished, by method and how they ended",
                               ["method", "finish"], registry=r)
        self.answer_tokens = Counter("rain_answer_tokens", "Tokens of finished answers", registry=r)
        self.processed_tokens = Counter("rain_processed_tokens", "Token positions the models ran for answers",
                                        registry=r)
        self.forward_passes = Counter("rain_forward_passes", "Forward passes answers took part in", registry=r)
        self.rejected = Counter("rain_rejected", "Requests refused before running, by reason", ["reason"], registry=r)


class Worker(threading.Thread):
    """Owns the model: runs a continuous batch that waiting answers join between rounds. When
    idle, the first request waits `batch_window` for others to start with it. `hold()` keeps
    waiting requests out of the batch until `release()` (admission paused: a drain, a test)."""

    def __init__(self, server: RainServer):
        super().__init__(name="rain-worker", daemon=True)
        self.server = server
        self.waiting: queue.Queue[Pending] = queue.Queue()
        self.in_flight: set[Pending] = set()
        self.stopping = threading.Event()
        self.wake = threading.Event()
        self.admitting = threading.Event()
        self.admitting.set()

    def hold(self) -> None:
        self.admitting.clear()

    def release(self) -> None:
        self.admitting.set()
        self.wake.set()

    def submit(self, pending: Pending) -> None:
        self.waiting.put(pending)
        self.server.metrics.queued.set(self.waiting.qsize())
        self.wake.set()

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()

    def run(self) -> None:
        server = self.server
        try:
            if server.rain is None:
                server.rain = server.loader()
            server.ready.set()
        except Exception as err:  # the model could not load: say why on /health and in the log
            server.failed = f"{type(err).__name__}: {err}" if not isinstance(err, RainError) else str(err)
            print(f"rain: error: {server.failed}", file=server.log, flush=True)
            server.ready.set()
            return
        batch = server.rain.continuous_batch()
        while not (self.stopping.is_set() and not batch):
            if self.admitting.is_set():
                if not batch and not self.waiting.empty() and server.batch_window:
                    time.sleep(server.batch_window)  # idle: let others start with the first request
                self._join(batch)
            if not batch:
                self.wake.wait(0.5)
                self.wake.clear()
                continue
            try:
                finished = batch.step()
            except Exception as err:  # a bug: its requests get one line, the server log the traceback
                traceback.print_exc(file=server.log)
                for pending in self.in_flight:
                    pending.emit(("error", RequestError(500, f"internal error: {type(err).__name__}: {err}",
                                                        "server_error")))
                self.in_flight.clear()
                batch = server.rain.continuous_batch()
                continue
            for pending, generation in finished.items():
                self._finish(pending, generation, None)
            now = time.monotonic()
            for pending in list(self.in_flight):
                if pending.cancelled:  # its client went away: stop computing
                    batch.cancel(pending)
                    self.in_flight.discard(pending)
                    print(f"rain: {pending.job.id} cancelled: the client went away", file=server.log, flush=True)
                elif now >= pending.deadline:  # the deadline: the best committed answer, as it stands
                    self._finish(pending, batch.stop(pending), "timeout")
                elif pending.job.stream:
                    pending.send(batch.partial_text(pending))
            server.metrics.in_flight.set(len(self.in_flight))
        for pending in self._drain():
            pending.emit(("error", RequestError(503, "the server is shutting down", "server_error")))

    def _join(self, batch: Any) -> None:
        """Waiting answers join, up to max_batch in flight; each is checked alone, so a bad one
        fails by itself."""
        server = self.server
        room = server.max_batch - len(self.in_flight)
        while room > 0:
            try:
                pending = self.waiting.get_nowait()
            except queue.Empty:
                break
            if pending.cancelled:
                continue
            try:
                batch.add_answer(pending.answer)
            except RainError as err:
                pending.emit(("error", RequestError(400, str(err))))
                continue
            except Exception as err:  # a bug: this request fails, the server goes on
                traceback.print_exc(file=server.log)
                pending.emit(("error", RequestError(500, f"internal error: {type(err).__name__}: {err}",
                                                    "server_error")))
                continue
            self.in_flight.add(pending)
            pending.emit(("start",))
            room -= 1
        server.metrics.queued.set(self.waiting.qsize())
        server.metrics.in_flight.set(len(self.in_flight))

    def _finish(self, pending: Pending, generation: Any, reason: str | None) -> None:
        self.in_flight.discard(pending)
        if generation is None:
            return
        if isinstance(generation, Failure):  # this answer failed alone: its client gets why
            print(f"rain: {pending.job.id} failed: {generation.message}", file=self.server.log, flush=True)
            kind = "invalid_request_error" if generation.status < 500 else "server_error"
            pending.emit(("error", RequestError(generation.status, generation.message, kind)))
            return
        server = self.server
        finish = reason or _finish_reason(generation, pending.job, server.rain.codec.stop_ids)
        compute = generation.stats.compute.total()
        server.metrics.answers.labels(generation.method, finish).inc()
        server.metrics.answer_tokens.inc(len(generation.token_ids))
        server.metrics.processed_tokens.inc(compute.tokens)
        server.metrics.forward_passes.inc(compute.forward_passes)
        print(f"rain: {pending.job.id} answered ({generation.method}, {len(generation.token_ids)} tokens, "
              f"{generation.stats.seconds:.2f} s, alongside up to {generation.stats.batch - 1} others"
              f"{', stopped at its deadline' if reason == 'timeout' else ''})", file=server.log, flush=True)
        pending.send(generation.text)
        pending.emit(("done", generation, finish))

    def _drain(self) -> list[Pending]:
        out = []
        while True:
            try:
                out.append(self.waiting.get_nowait())
            except queue.Empty:
                return out


def _finish_reason(generation: Any, job: ChatJob, stop_ids: frozenset[int]) -> str:
    from rain_llm.shells.protocol import finish_reason

    return finish_reason(generation.token_ids, stop_ids, job.cfg.max_new_tokens)


# ---------------------------------------------------------------------------------------------- HTTP
class _HeaderTimeoutH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, with a deadline for a request's headers: a client that opens
    a connection and sends no complete request head in time is disconnected (uvicorn alone
    waits for ever)."""

    header_timeout = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _disarm(self) -> None:
        if getattr(self, "_header_timer", None) is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()

    def handle_events(self) -> None:
        before = self.cycle
        super().handle_events()
        if self.cycle is not before:  # a request head arrived
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def _error(err: RequestError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


class Access:
    """Every request (pure ASGI, so client disconnects still reach the handlers): an id in
    X-Request-Id (a chat request's is its completion id), the API key on /v1 routes, one
    access-log line when the response is complete (streams included), metrics by route and status."""

    ROUTES = ("/v1/chat/completions", "/v1/models", "/health", "/metrics")

    def __init__(self, app: Any, server: RainServer):
        self.app, self.server = app, server

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        server, start = self.server, time.monotonic()
        state = scope.setdefault("state", {})
        state["id"] = f"req-{uuid.uuid4().hex[:16]}"
        path = scope["path"].rstrip("/") or "/"
        status = {"code": 500, "started": False}

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                status.update(code=message["status"], started=True)
                rid = state.get("job_id", state["id"]).encode()
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid)]}
            await send(message)

        try:
            if path.startswith("/v1") and server.api_key is not None and not _authorized(scope, server.api_key):
                await _error(RequestError(401, "missing or wrong API key: send it as 'Authorization: Bearer KEY'",
                                          "authentication_error"))(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        except Exception as err:  # a bug: one line for the client, the traceback in the log
            traceback.print_exc(file=server.log)
            if not status["started"]:
                await _error(RequestError(500, f"internal error: {type(err).__name__}: {err}",
                                          "server_error"))(scope, receive, send_with_id)
        finally:
            route = path if path in self.ROUTES else "other"
            server.metrics.requests.labels(route, str(status["code"])).inc()
            client = scope.get("client")
            where = f"{client[0]}:{client[1]}" if client else "-"
            print(f"rain: {state.get('job_id', state['id'])} {where} \"{scope['method']} {scope['path']}\" "
                  f"{status['code']} {time.monotonic() - start:.3f}s", file=server.log, flush=True)


def build_app(server: RainServer) -> Any:
    app = FastAPI(title="rain serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/health")
    async def health() -> Response:
        if server.failed:
            return JSONResponse({"status": "failed", "error": server.failed}, status_code=503)
        if not server.ready.is_set() or server.rain is None:
            return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "5"})
        if server.shutting_down:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok", "model": server.model_name})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> Response:
        return JSONResponse({"object": "list", "data": [{"id": server.model_name, "object": "model", "created": 0,
                                                         "owned_by": "rain-llm"}]})

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        try:
            pending = await server.accept(request)
        except RequestError as err:
            server.metrics.rejected.labels(_reason(err)).inc()
            return _error(err)
        request.state.job_id = pending.job.id
        events = pending.events
        if pending.job.stream:
            first = await events.get()
            if first[0] == "error":  # refused before it started: a plain error reply
                return _error(first[1])
            return EventSourceResponse(server.stream(pending, first), headers={"Cache-Control": "no-cache"})
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), 0.25)
                except TimeoutError:
                    if await request.is_disconnected():
                        pending.cancelled = True
                        return Response(status_code=499)
                    continue
                if event[0] == "error":
                    return _error(event[1])
                if event[0] == "done":
                    body = chat_response(pending.job, event[1], server.model_name, server.rain.codec.stop_ids)
                    body["choices"][0]["finish_reason"] = event[2]
                    server.metrics.latency.observe(time.monotonic() - pending.job.arrived)
                    return JSONResponse(body)
        except asyncio.CancelledError:  # the server is shutting down, or the client left
            pending.cancelled = True
            raise

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
    async def elsewhere(request: Request, path: str) -> Response:
        known = {"/v1/chat/completions": "POST", "/v1/models": "GET", "/health": "GET", "/metrics": "GET"}
        route = "/" + path.rstrip("/")
        if route in known:
            return _error(RequestError(405, f"method {request.method} not allowed on {route} (use {known[route]})",
                                       headers={"Allow": known[route]}))
        return _error(RequestError(404, f"no such endpoint: {request.method} {route} (this server has "
                                   "/v1/chat/completions, /v1/models, /health, /metrics)", "not_found_error"))

    return Access(app, server)


def _authorized(scope: dict, key: str) -> bool:
    given = next((v for k, v in scope.get("headers", []) if k == b"authorization"), b"")
    return hmac.compare_digest(given, f"Bearer {key}".encode())


def _reason(err: RequestError) -> str:
    return {401: "auth", 413: "too_large", 429: "queue_full", 408: "slow_client"}.get(err.status, "invalid")


class RainServer:
    """The HTTP server and its model worker. `start()` serves in background threads (tests,
    benchmarks); `serve_forever()` in this one, until SIGINT/SIGTERM (graceful: no new requests,
    in-flight ones get `grace` seconds to finish); `close()` stops both. Give `rain` (loaded), or
    `loader` to load it in the worker while /health says "loading"."""

    def __init__(self, rain: Any, config: RainConfig, *, host: str = "127.0.0.1", port: int = 8000,
                 model_name: str | None = None, max_batch: int = 16, batch_window: float = 0.05,
                 limits: Limits | None = None, api_key: str | None = None, grace: float = 30.0,
                 loader: Callable[[], Any] | None = None, log: Any = sys.stderr):
        if max_batch < 1:
            raise RainError(f"invalid max_batch {max_batch}: must be at least 1")
        if batch_window < 0 or not math.isfinite(batch_window):
            raise RainError(f"invalid batch_window {batch_window}: must be a non-negative number")
        if rain is None and loader is None:
            raise RainError("RainServer needs a loaded Rain or a loader")
        self.rain, self.loader = rain, loader
        self.limits = (limits or Limits()).check()
        budgets = {name: cap for name, cap in (("max_search_seconds", self.limits.max_search_seconds),
                                               ("max_search_tokens", self.limits.max_search_tokens))
                   if cap and not getattr(config, name)}
        self.config = config.replace(**budgets) if budgets else config.validate()  # the caps are the defaults
        self.model_name = model_name or (rain.name if rain is not None else "default")
        self.max_batch, self.batch_window = max_batch, batch_window
        self.api_key = api_key or None
        self.log = log
        self.metrics = Metrics()
        self.ready = threading.Event()
        self.failed: str | None = None
        self.shutting_down = False
        self.preparing = 0  # requests past their checks, being tokenised (they count against --max-queue)
        self.worker = Worker(self)
        protocol = type("RainH11", (_HeaderTimeoutH11,), {"header_timeout": self.limits.header_timeout})
        self.uvicorn = uvicorn.Server(uvicorn.Config(
            build_app(self), host=host, port=port, http=protocol, log_level="warning", access_log=False,
            backlog=2048, timeout_keep_alive=5, timeout_graceful_shutdown=grace, lifespan="off"))
        self.host = host
        self._socket = _bind(host, port)
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def address(self) -> tuple[str, int]:
        host, port = self._socket.getsockname()[:2]
        return host, port

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}/v1"

    def start(self) -> RainServer:
        self.worker.start()
        self._thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [self._socket]},
                                        name="rain-http", daemon=True)
        self._thread.start()
        while not self.uvicorn.started and self._thread.is_alive():
            time.sleep(0.01)
        self.ready.wait()
        return self

    def serve_forever(self, on_listening: Callable[[], None] | None = None,
                      on_ready: Callable[[], None] | None = None) -> None:
        """Serve in this thread until SIGINT or SIGTERM: stop accepting, let in-flight requests
        finish within the grace period, then stop the worker."""
        self.worker.start()
        if on_listening or on_ready:
            threading.Thread(target=self._announce, args=(on_listening, on_ready), daemon=True).start()
        if threading.current_thread() is threading.main_thread():
            # uvicorn shuts down gracefully on SIGTERM, then raises it again: end normally then
            signal.signal(signal.SIGTERM, lambda *_: None)
        try:
            self.uvicorn.run(sockets=[self._socket])
        finally:
            self.shutting_down = True
            self.worker.stop()
            self.worker.join(timeout=5)

    def _announce(self, on_listening: Callable[[], None] | None, on_ready: Callable[[], None] | None) -> None:
        while not self.uvicorn.started:
            time.sleep(0.01)
        if on_listening:
            on_listening()
        self.ready.wait()
        if on_ready and not self.failed:
            on_ready()

    def close(self) -> None:
        self.shutting_down = True
        self.uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.worker.stop()
        self.worker.join(timeout=30)
        self._socket.close()

    def __enter__(self) -> RainServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ requests
    async def accept(self, request: Request) -> Pending:
        """Check a chat request and hand it to the worker: body (size, read time, JSON), fields and
        caps, room in the queue, then the prompt rendered and tokenised off the event loop."""
        if self.failed or not self.ready.is_set() or self.rain is None:
            raise RequestError(503, "the model is still loading" if not self.failed else f"no model: {self.failed}",
                               "server_error", headers={"Retry-After": "5"})
        if self.shutting_down:
            raise RequestError(503, "the server is shutting down", "server_error")
        body = await self._body(request)
        job = parse_chat(body, self.config, self.model_name, self.limits)
        waiting = self.worker.waiting.qsize() + self.preparing  # those still being tokenised hold a place too
        if waiting >= self.limits.max_queue:
            raise RequestError(429, f"the server is busy: {waiting} requests are waiting (rain serve --max-queue "
                               f"{self.limits.max_queue}); retry later", "rate_limit_error",
                               headers={"Retry-After": str(self._retry_after())})
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(event: tuple) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        pending = Pending(job, emit, events, job.arrived + self.limits.request_timeout)
        self.preparing += 1  # on the event loop: no lock needed
        try:  # rendered and tokenised here, not on the model's thread; the batch knows it by its request
            pending.answer = await run_in_threadpool(self.rain.answer, pending, job.prompt, job.cfg)
            self.worker.submit(pending)
        except RainError as err:
            raise RequestError(400, str(err)) from None
        finally:
            self.preparing -= 1
        return pending

    async def _body(self, request: Request) -> Any:
        length = request.headers.get("content-length")
        chunked = "chunked" in request.headers.get("transfer-encoding", "").lower()
        if length is None and not chunked:
            raise RequestError(411, "a request body needs a Content-Length header")
        if length is not None and (not length.isdigit() or int(length) > self.limits.max_body_bytes):
            if not length.isdigit():
                raise RequestError(400, f"malformed request: bad Content-Length {length!r}")
            raise RequestError(413, f"request body of {length} bytes exceeds this server's limit of "
                               f"{self.limits.max_body_bytes} (rain serve --max-body-bytes)")

        async def read() -> bytes:
            data = bytearray()
            async for part in request.stream():
                data += part
                if len(data) > self.limits.max_body_bytes:
                    raise RequestError(413, f"request body exceeds this server's limit of "
                                       f"{self.limits.max_body_bytes} bytes (rain serve --max-body-bytes)")
            return bytes(data)

        try:
            raw = await asyncio.wait_for(read(), self.limits.body_timeout)
        except TimeoutError:
            raise RequestError(408, f"the request body did not arrive within {self.limits.body_timeout:g} s") from None
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RequestError(400, f"malformed request: the body is not valid JSON ({err})") from None
        except RecursionError:
            raise RequestError(400, "malformed request: the JSON body is nested too deeply") from None

    def _retry_after(self) -> int:
        """Seconds a refused client might wait: the mean answer time so far, at least 1."""
        count, total = 0.0, 0.0
        for metric in self.metrics.latency.collect():
            for sample in metric.samples:
                if sample.name.endswith("_count"):
                    count = sample.value
                elif sample.name.endswith("_sum"):
                    total = sample.value
        return max(1, math.ceil(total / count)) if count else 5

    async def stream(self, pending: Pending, first: tuple) -> AsyncIterator[bytes]:
        """Server-sent events: the role, then text as the search commits it, then the finish reason
        with usage and RAIN's stats (or an error event), then [DONE]. A client that leaves has its
        search cancelled at the next round."""
        job, events = pending.job, pending.events

        def sse(payload: Any) -> bytes:
            return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()

        try:
            yield sse(chunk(job, self.model_name, {"role": "assistant"}))
            event = first
            while True:
                if event[0] == "delta":
                    yield sse(chunk(job, self.model_name, {"content": event[1]}))
                elif event[0] == "done":
                    whole = chat_response(job, event[1], self.model_name, self.rain.codec.stop_ids)
                    yield sse(chunk(job, self.model_name, {}, event[2], usage=whole["usage"], rain=whole["rain"]))
                    self.metrics.latency.observe(time.monotonic() - job.arrived)
                    break
                elif event[0] == "error":
                    yield sse(event[1].body())
                    break
                event = await events.get()
            yield sse("[DONE]")
        finally:
            if event[0] not in ("done", "error"):  # the client left (or the server stops): stop computing
                pending.cancelled = True


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound now (a busy port is reported before a large model loads)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as err:
        raise RainError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as err:
        sock.close()
        raise RainError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    sock.setblocking(False)
    return sock


def check_port(host: str, port: int) -> None:
    """Raise RainError if (host, port) cannot be listened on."""
    _bind(host, port).close()


def api_key_from(env: str | None) -> str | None:
    """The API key from the environment variable `env` (None: no key asked for)."""
    if env is None:
        return None
    key = os.environ.get(env, "")
    if not key:
        raise RainError(f"--api-key-env {env}: the environment variable {env} is not set or empty")
    return key

