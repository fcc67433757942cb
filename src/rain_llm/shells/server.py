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

Here: the server's lifecycle and a request's way in and out; `app.py`: the HTTP routes and
middleware; `worker.py`: the model worker; `protocol.py`: request checks and response shapes.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import uvicorn
from fastapi import Request
from starlette.concurrency import run_in_threadpool

from rain_llm.config import RainConfig
from rain_llm.errors import RainError
from rain_llm.shells.app import Metrics, _HeaderTimeoutH11, build_app
from rain_llm.shells.protocol import Limits, RequestError, chat_response, chunk, parse_chat
from rain_llm.shells.worker import Pending, Worker

__all__ = ["RainServer", "Limits", "check_port", "api_key_from"]


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
