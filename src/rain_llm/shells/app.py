"""The HTTP side of `rain serve`: the FastAPI app and its routes, the access middleware (ids, API
key, access log, metrics by route) and uvicorn's HTTP/1.1 protocol with a deadline for headers."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import traceback
import uuid
from collections.abc import Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from rain_llm.shells.protocol import RequestError

if TYPE_CHECKING:
    from rain_llm.shells.server import RainServer


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


class HeaderTimeoutH11(H11Protocol):
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
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
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


def error_response(err: RequestError) -> JSONResponse:
    """The OpenAI error shape: {"error": {"message", "type", "param", "code"}}."""
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def loggable(text: str) -> str:
    """`text` for a quoted field of a log line: printable ASCII as it is; quotes, backslashes,
    control characters (a newline could forge a line) and anything else escaped as in JSON."""
    return json.dumps(text, ensure_ascii=True)[1:-1]


class Access:
    """Every request (pure ASGI, so client disconnects still reach the handlers): an id in
    X-Request-Id (an answer's is its completion id), the API key on /v1 routes, one access-log line
    when the response is complete (streams included; the request line as sent, escaped), metrics
    by route and status."""

    def __init__(self, app: Any, server: RainServer):
        self.app, self.server = app, server

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        server, start = self.server, time.monotonic()
        state = scope.setdefault("state", {})
        state["id"] = f"req-{uuid.uuid4().hex[:16]}"
        path = scope["path"]
        status = {"code": 500, "started": False}

        async def send_with_id(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status.update(code=message["status"], started=True)
                rid = state.get("job_id", state["id"]).encode()
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid)]}
            await send(message)

        try:
            if path.startswith("/v1") and server.api_key is not None and not _authorized(scope, server.api_key):
                await error_response(RequestError(401, "missing or wrong API key: send it as 'Authorization: "
                                                  "Bearer KEY'", "authentication_error"))(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        except asyncio.CancelledError:  # uvicorn gave up on the handler (a client that does not read)
            if not server.shutting_down:
                raise
            if not status["started"]:
                await error_response(RequestError(503, "the server is shutting down", "server_error"))(
                    scope, receive, send_with_id)
        except Exception as err:  # a bug: one line for the client, the traceback in the log
            traceback.print_exc(file=server.log)
            if not status["started"]:
                await error_response(RequestError(500, f"internal error: {type(err).__name__}: {err}",
                                                  "server_error"))(scope, receive, send_with_id)
        finally:
            server.metrics.requests.labels(path if path in ROUTES else "other", str(status["code"])).inc()
            client = scope.get("client")
            where = f"{client[0]}:{client[1]}" if client else "-"
            target = scope.get("raw_path") or path.encode()
            if scope.get("query_string"):
                target += b"?" + scope["query_string"]
            line = f"{scope['method']} {target.decode('latin-1')}"
            server.say(f"rain: {state.get('job_id', state['id'])} {where} \"{loggable(line)}\" {status['code']} "
                       f"{time.monotonic() - start:.3f}s")


ROUTES = {"/v1/chat/completions": "POST", "/v1/completions": "POST", "/v1/models": "GET", "/health": "GET",
          "/metrics": "GET"}


def build_app(server: RainServer) -> Any:
    app = FastAPI(title="rain serve", docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)

    @app.get("/health")
    async def health() -> Response:
        if server.failed:
            return JSONResponse({"status": "failed", "error": server.failed}, status_code=503)
        if not server.ready.is_set() or server.rain is None:
            return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "5"})
        if server.shutting_down:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        if (problem := await server.engine_problem()) is not None:
            return JSONResponse({"status": "engine unavailable", "error": problem}, status_code=503)
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
        return await server.respond(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await server.respond(request, "completion")

    @app.exception_handler(HTTPException)
    async def not_here(request: Request, exc: HTTPException) -> Response:
        """The router's 404 and 405, in the OpenAI error shape with one line naming the request."""
        method, path = loggable(request.method), loggable(request.scope["path"])
        if exc.status_code == 405 and path in ROUTES:
            return error_response(RequestError(405, f"method {method} not allowed on {path} (use "
                                               f"{ROUTES[path]})", headers={"Allow": ROUTES[path]}))
        if exc.status_code == 404:
            endpoints = ", ".join(f"{m} {p}" for p, m in ROUTES.items())
            return error_response(RequestError(404, f"no such endpoint: {method} {path} (this server has "
                                               f"{endpoints})", "not_found_error"))
        return error_response(RequestError(exc.status_code, str(exc.detail), headers=dict(exc.headers or {})))

    return Access(app, server)


def _authorized(scope: dict, key: str) -> bool:
    given = next((v for k, v in scope.get("headers", []) if k == b"authorization"), b"")
    return hmac.compare_digest(given, f"Bearer {key}".encode())
