"""`rain serve`: an OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions) that
answers with RAIN, fit for a public port and for the evaluation clients researchers use.

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
import dataclasses
import json
import math
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import uvicorn
from fastapi import Request
from fastapi.responses import EventSourceResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from rain_llm.config import RainConfig
from rain_llm.errors import RainError
from rain_llm.shells.app import HeaderTimeoutH11, Metrics, build_app, error_response
from rain_llm.shells.protocol import Limits, RequestError, chunk, parse_chat, parse_completion, response_body
from rain_llm.shells.worker import Pending, Worker

if TYPE_CHECKING:
    from rain_llm.api import Rain

__all__ = ["RainServer", "Limits", "check_port", "api_key_from"]


SHUTDOWN_MARGIN = 10.0  # seconds uvicorn waits past --grace: the 503s of answers given up go out first
ENGINE_CHECK = 2.0  # seconds /health trusts what it last found about the engine
PARSERS = {"chat": parse_chat, "completion": parse_completion}


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, telling the RAIN server when shutdown starts (SIGTERM, Ctrl-C, `close`):
    answers get the grace period from then and a clean 503 after it, before uvicorn would cancel
    their handlers."""

    def __init__(self, config: uvicorn.Config, on_shutdown: Callable[[], None]):
        super().__init__(config)
        self.on_shutdown = on_shutdown

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.on_shutdown()
        await super().shutdown(sockets)


class RainServer:
    """The HTTP server and its model worker. `start()` serves in background threads (tests,
    benchmarks); `serve_forever()` in this one, until SIGINT/SIGTERM (graceful: no new requests,
    answers in flight get `grace` seconds to finish, then 503); `close()` stops both. Give `rain`
    (loaded), or `loader` to load it in the worker while /health says "loading". `answer_log`: a
    file that gets one JSON line per answer (id, method, finish reason, prompt, text). `worker`: the
    model worker's class (a subclass may pause admission)."""

    def __init__(self, rain: Rain | None, config: RainConfig, *, host: str = "127.0.0.1", port: int = 8000,
                 model_name: str | None = None, max_batch: int = 16, batch_window: float = 0.05,
                 limits: Limits | None = None, api_key: str | None = None, grace: float = 30.0,
                 loader: Callable[[], Rain] | None = None, log: IO[str] | None = None,
                 answer_log: str | Path | None = None, worker: type[Worker] = Worker):
        if max_batch < 1:
            raise RainError(f"invalid max_batch {max_batch}: must be at least 1")
        if batch_window < 0 or not math.isfinite(batch_window):
            raise RainError(f"invalid batch_window {batch_window}: must be a non-negative number")
        if grace < 0 or not math.isfinite(grace):
            raise RainError(f"invalid grace {grace}: must be a non-negative number")
        if rain is None and loader is None:
            raise RainError("RainServer needs a loaded Rain or a loader")
        self.rain, self.loader = rain, loader
        self.limits = (limits or Limits()).check()
        budgets = {name: cap for name, cap in (("max_search_seconds", self.limits.max_search_seconds),
                                               ("max_search_tokens", self.limits.max_search_tokens))
                   if cap and not getattr(config, name)}
        self.config = config.replace(**budgets) if budgets else config.validate()  # the caps are the defaults
        self.model_name = model_name or (rain.name if rain is not None else "default")
        self.max_batch, self.batch_window, self.grace = max_batch, batch_window, grace
        self.api_key = api_key or None
        self.log = log if log is not None else sys.stderr  # at call time: stderr may have been replaced
        self._log_lock = threading.Lock()
        self.answer_log_path = Path(answer_log) if answer_log is not None else None
        try:
            self.answer_log = self.answer_log_path.open("a", encoding="utf-8") if self.answer_log_path else None
        except OSError as err:
            raise RainError(f"cannot write the answer log {answer_log}: {err.strerror or err}") from None
        self.metrics = Metrics()
        self.ready = threading.Event()
        self.failed: str | None = None
        self.shutting_down = False
        self.preparing = 0  # requests past their checks, being tokenised (they count against --max-queue)
        self._engine_checked: tuple[float, str | None] = (-ENGINE_CHECK, None)  # (when, what /health found)
        self.worker = worker(self)
        protocol = type("RainH11", (HeaderTimeoutH11,), {"header_timeout": self.limits.header_timeout})
        self.uvicorn = _Uvicorn(uvicorn.Config(
            build_app(self), host=host, port=port, http=protocol, log_level="warning", access_log=False,
            backlog=2048, timeout_keep_alive=5, timeout_graceful_shutdown=math.ceil(grace + SHUTDOWN_MARGIN),
            lifespan="off"), self._begin_shutdown)
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
        """Serve in this thread until SIGINT or SIGTERM: stop accepting, let answers in flight
        finish within the grace period (then 503), then stop the worker."""
        self.worker.start()
        if on_listening or on_ready:
            threading.Thread(target=self._announce, args=(on_listening, on_ready), daemon=True).start()
        if threading.current_thread() is threading.main_thread():
            # uvicorn shuts down gracefully on SIGTERM, then raises it again: end normally then
            signal.signal(signal.SIGTERM, lambda *_: None)
        try:
            self.uvicorn.run(sockets=[self._socket])
        finally:
            self._stop_worker(5)

    def _announce(self, on_listening: Callable[[], None] | None, on_ready: Callable[[], None] | None) -> None:
        while not self.uvicorn.started:
            time.sleep(0.01)
        if on_listening:
            on_listening()
        self.ready.wait()
        if on_ready and not self.failed:
            on_ready()

    def _begin_shutdown(self) -> None:
        """No new requests from now; answers here get the grace period (the worker gives them up then)."""
        self.shutting_down = True
        self.worker.give_up_at(time.monotonic() + self.grace)

    def close(self) -> None:
        """Shut down as on SIGTERM (answers get the grace period), and wait for it."""
        self.uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=self.grace + SHUTDOWN_MARGIN + 30)
        self._stop_worker(30)
        self._socket.close()

    def _stop_worker(self, timeout: float) -> None:
        self.shutting_down = True
        self.worker.stop()
        if self.worker.is_alive():
            self.worker.join(timeout=timeout)
        if self.answer_log is not None:
            self.answer_log.close()

    def __enter__(self) -> RainServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ logs
    def adopt_engine_limits(self) -> None:
        """Caps no higher than the engine serves: on vLLM, candidates (and dynamic additions) up to
        the server's --max-logprobs (a request above it would be refused by the engine anyway)."""
        from rain_llm.engine.vllm import VLLMBackend

        backend = self.rain.backend if self.rain is not None else None
        if isinstance(backend, VLLMBackend) and backend.max_logprobs < self.limits.max_candidates:
            self.limits = dataclasses.replace(self.limits, max_candidates=backend.max_logprobs)
            self.say(f"rain: --limit-candidates lowered to {backend.max_logprobs}, the vLLM server's --max-logprobs")

    async def engine_problem(self) -> str | None:
        """None while the engine answers; else why not (asked at most every ENGINE_CHECK seconds)."""
        now = time.monotonic()
        if self.rain is None or now - self._engine_checked[0] < ENGINE_CHECK:
            return self._engine_checked[1]
        problem = await run_in_threadpool(self.rain.backend.health)
        self._engine_checked = (now, problem)
        return problem

    def say(self, line: str) -> None:
        """One line in the server log (from any thread)."""
        with self._log_lock:
            print(line, file=self.log, flush=True)

    def record(self, answer: dict[str, Any]) -> None:
        """One answer in the answer log, if there is one (a JSON line, ASCII)."""
        if self.answer_log is not None:
            with self._log_lock:
                if not self.answer_log.closed:
                    self.answer_log.write(json.dumps(answer, ensure_ascii=True) + "\n")
                    self.answer_log.flush()

    # ------------------------------------------------------------------ requests
    async def respond(self, request: Request, kind: str) -> Response:
        """Answer one request to /v1/chat/completions ("chat") or /v1/completions ("completion"):
        a JSON response, or a stream of server-sent events once the answer has joined the batch. A
        client that leaves while its request waits or runs has it dropped at once (499)."""
        try:
            pending = await self.accept(request, kind)
        except RequestError as err:
            self.metrics.rejected.labels(_reason(err)).inc()
            return error_response(err)
        request.state.job_id = pending.job.id
        left = asyncio.ensure_future(_client_left(request))
        try:
            while True:
                event = await _next_event(pending.events, left)
                if event is None:  # the client went away: out of the line, or cancelled at the next round
                    if self.worker.withdraw(pending):
                        self.say(f"rain: {pending.job.id} dropped: the client went away while it waited")
                    else:
                        pending.cancelled = True
                    return Response(status_code=499)
                if event[0] == "error":
                    return error_response(event[1])
                if pending.job.stream:  # it started: the stream watches for a client leaving itself
                    left.cancel()
                    return EventSourceResponse(self.stream(pending, event), headers={"Cache-Control": "no-cache"})
                if event[0] == "done":
                    _, generation, finish, text = event
                    self.metrics.latency.observe(time.monotonic() - pending.job.arrived)
                    return JSONResponse(response_body(pending.job, generation, text, finish, self.model_name))
        except asyncio.CancelledError:  # the server is shutting down, or the client left
            pending.cancelled = True
            self.worker.withdraw(pending)
            raise
        finally:
            left.cancel()

    async def accept(self, request: Request, kind: str = "chat") -> Pending:
        """Check a request and hand it to the worker: body (size, read time, JSON), fields and caps,
        room in the queue, then the prompt rendered and tokenised off the event loop."""
        if self.failed or not self.ready.is_set() or self.rain is None:
            raise RequestError(503, "the model is still loading" if not self.failed else f"no model: {self.failed}",
                               "server_error", headers={"Retry-After": "5"})
        if self.shutting_down:
            raise RequestError(503, "the server is shutting down", "server_error")
        body = await self._body(request)
        job = PARSERS[kind](body, self.config, self.model_name, self.limits)
        self._admit()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(event: tuple) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                pass

        pending = Pending(job, emit, events, job.arrived + self.limits.request_timeout)
        self.preparing += 1  # on the event loop: no lock needed
        try:  # rendered and tokenised here, not on the model's thread; the batch knows it by its request
            pending.answer = await run_in_threadpool(self.rain.answer, pending, job.prompt, job.cfg)
            self.worker.submit(pending)
        except RainError as err:
            raise RequestError(400, str(err), param=job.prompt_param) from None
        finally:
            self.preparing -= 1
        return pending

    def _admit(self) -> None:
        """429 unless there is room: the batch's free places plus --max-queue waiting beyond them
        (requests still being tokenised hold a place too)."""
        waiting = len(self.worker.waiting) + self.preparing
        free = max(0, self.max_batch - len(self.worker.in_flight))
        if waiting >= free + self.limits.max_queue:
            raise RequestError(429, f"the server is busy: {waiting} requests are waiting for {free} free places in "
                               f"the batch (rain serve --max-batch {self.max_batch}, --max-queue "
                               f"{self.limits.max_queue}); retry later", "rate_limit_error",
                               headers={"Retry-After": str(self.worker.recent.retry_after())})

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
        except RecursionError:
            raise RequestError(400, "malformed request: the JSON body is nested too deeply") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RequestError(400, f"malformed request: the body is not valid JSON ({err})") from None
        except ValueError:  # an integer literal longer than Python converts (4300 digits)
            raise RequestError(400, f"malformed request: a number in the body has more than "
                               f"{sys.get_int_max_str_digits()} digits") from None

    async def stream(self, pending: Pending, first: tuple) -> AsyncIterator[bytes]:
        """Server-sent events: (chat: the role, then) text as the answer commits it, then the finish
        reason with usage and RAIN's stats (or an error event), then [DONE]. A client that leaves
        has its answer cancelled at the next round."""
        job, events = pending.job, pending.events

        def sse(payload: Any) -> bytes:
            return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()

        event = first
        try:
            if job.kind == "chat":
                yield sse(chunk(job, self.model_name, role=True))
            while True:
                if event[0] == "delta":
                    yield sse(chunk(job, self.model_name, event[1]))
                elif event[0] == "done":
                    _, generation, finish, text = event
                    whole = response_body(job, generation, text, finish, self.model_name)
                    yield sse(chunk(job, self.model_name, None, finish, usage=whole["usage"], rain=whole["rain"]))
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


async def _client_left(request: Request) -> None:
    """Returns when the client disconnects (its body is read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _next_event(events: asyncio.Queue, left: asyncio.Future) -> tuple | None:
    """The request's next event from the worker, or None if its client left first."""
    get = asyncio.ensure_future(events.get())
    await asyncio.wait({get, left}, return_when=asyncio.FIRST_COMPLETED)
    if get.done():
        return get.result()
    get.cancel()
    return None


def _reason(err: RequestError) -> str:
    return {401: "auth", 413: "too_large", 429: "queue_full", 408: "slow_client"}.get(err.status, "invalid")


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
