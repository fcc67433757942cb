"""`rain serve`: an OpenAI-compatible HTTP server that answers with RAIN.

    rain serve --port 8000                       # the bundled model, paper-hh settings
    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Hi"}],
                                   max_tokens=32, extra_body={"rain": {"t_max": 10}})

Continuous batching: one worker thread owns the model and runs a `ContinuousBatch`. Between two
rounds of the running searches, queued requests join (up to `max_batch` answers in flight), so each
round's forward passes (expansions, evaluations, embeddings) are batched across every live request,
and a request never waits for another to finish. When idle, the first request waits up to
`batch_window` seconds for others to start with it. Each answer draws from its own random stream,
so it is the same whether it was batched or not, and equals `Rain.generate`'s.

Standard library only (http.server): the handler threads parse and check, the worker computes.
"""

from __future__ import annotations

import json
import queue
import select
import socket
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from rain_llm.config import FIELD_NAMES, RainConfig
from rain_llm.errors import RainError
from rain_llm.runtime.prompts import Prompt, as_messages
from rain_llm.values.templates import BUILTIN_TEMPLATES

MAX_BODY_BYTES = 4 << 20
# Settings that name files or models on the server's disk, or change how it computes: fixed by
# whoever starts the server, not by a request.
SERVER_ONLY_KEYS = frozenset({"value", "fewshot", "prompt_format", "eval_format", "reuse_cache"})
# OpenAI parameters RAIN has no meaning for; refused (400) rather than silently ignored.
UNSUPPORTED = {"tools": None, "tool_choice": None, "functions": None, "function_call": None, "logit_bias": None,
               "logprobs": False, "top_logprobs": None, "stop": None, "presence_penalty": 0, "frequency_penalty": 0,
               "response_format": None}


class RequestError(Exception):
    """A request the server refuses: HTTP status and a one-line message."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


@dataclass(eq=False)  # hashed by identity: a job is its own key in the batch
class Job:
    """One chat request waiting for its answer. A streamed one also gets events from the worker:
    ("start", None) once it joined the batch, ("delta", text) as its search commits text,
    then ("end", None); or ("error", None) (see `error`)."""

    prompt: Prompt
    cfg: RainConfig
    stream: bool = False
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))
    done: threading.Event = field(default_factory=threading.Event)
    events: queue.Queue = field(default_factory=queue.Queue)
    sent: str = ""  # streamed so far
    result: Any = None
    error: RequestError | None = None
    cancelled: bool = False  # set by the handler when its client went away

    def fail(self, error: RequestError) -> None:
        self.error = error
        self.events.put(("error", None))
        self.done.set()

    def send(self, text: str | None) -> None:
        """Stream what `text` adds to what was sent (nothing if it does not extend it)."""
        if self.stream and text is not None and text.startswith(self.sent) and len(text) > len(self.sent):
            self.events.put(("delta", text[len(self.sent):]))
            self.sent = text


def parse_chat_request(body: Any, base: RainConfig, model_name: str) -> tuple[Prompt, RainConfig, bool]:
    """A chat completions request -> (prompt, settings, stream). Raises RequestError naming the problem."""
    if not isinstance(body, dict):
        raise RequestError(400, "malformed request: the body must be a JSON object")
    model = body.get("model")
    if model is None:
        raise RequestError(400, "missing 'model'", param="model")
    if model != model_name:
        raise RequestError(404, f"model {model!r} not found: this server serves {model_name!r}", "not_found_error",
                           "model")
    prompt = _conversation(body.get("messages"))
    for key, default in UNSUPPORTED.items():
        if body.get(key, default) not in (default, None):
            raise RequestError(400, f"'{key}' is not supported by RAIN", param=key)
    if body.get("n", 1) != 1:
        raise RequestError(400, "'n' must be 1: one answer per request", param="n")
    if body.get("top_p", 1) not in (1, 1.0, None):
        raise RequestError(400, "'top_p' is not supported: RAIN samples candidates by top-k (rain.top_k)",
                           param="top_p")
    changes: dict[str, Any] = {}
    rain = body.get("rain", {})
    if not isinstance(rain, dict):
        raise RequestError(400, "'rain' must be an object of RAIN settings", param="rain")
    for key, value in rain.items():
        if key not in FIELD_NAMES:
            raise RequestError(400, f"unknown RAIN setting {key!r}", param="rain")
        if key in SERVER_ONLY_KEYS:
            flag = "--" + key.replace("_", "-")
            raise RequestError(400, f"RAIN setting {key!r} is fixed by the server (rain serve {flag})", param="rain")
        if key == "template" and value not in BUILTIN_TEMPLATES:
            raise RequestError(400, f"template {value!r}: a request may name a built-in template only "
                               f"({', '.join(BUILTIN_TEMPLATES)})", param="rain")
        changes[key] = value
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is not None:
        changes["max_new_tokens"] = limit
    for key in ("seed", "temperature"):
        if body.get(key) is not None:
            changes[key] = body[key]
    if changes.get("temperature") == 0 and changes.get("method", base.method) == "rain":
        raise RequestError(400, "temperature=0: RAIN samples candidate token sets, give a positive temperature "
                           "(or rain.method = vanilla for greedy decoding)", param="temperature")
    try:
        cfg = base.replace(**changes)
    except RainError as err:
        raise RequestError(400, str(err)) from None
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, "'stream' must be true or false", param="stream")
    return prompt, cfg, stream


def _conversation(messages: Any) -> str | list[dict[str, str]]:
    """The request's messages as RAIN's prompt: the text of a lone user message, else the
    conversation (system messages first, the last message the user's)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list", param="messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestError(400, f"message {i} must be an object with 'role' and 'content'", param="messages")
        content = message.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise RequestError(400, f"message {i}: content parts must be text", param="messages")
            content = "".join(p["text"] for p in content)
        out.append({"role": message.get("role"), "content": content})
    try:
        as_messages(out)
    except RainError as err:
        raise RequestError(400, str(err), param="messages") from None
    return out[0]["content"] if len(out) == 1 else out


class BatchingWorker(threading.Thread):
    """Owns the model: runs a continuous batch that queued requests join between rounds."""

    def __init__(self, rain: Any, max_batch: int, batch_window: float, log: Any = sys.stderr):
        super().__init__(name="rain-worker", daemon=True)
        self.rain, self.max_batch, self.batch_window, self.log = rain, max_batch, batch_window, log
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.stopping = False
        self.in_flight: set[Job] = set()

    def submit(self, prompt: Prompt, cfg: RainConfig, stream: bool = False) -> Job:
        job = Job(prompt, cfg, stream)
        self.jobs.put(job)
        return job

    def stop(self) -> None:
        self.jobs.put(None)

    def run(self) -> None:
        batch = self.rain.continuous_batch()
        while not (self.stopping and not batch):
            if batch:  # busy: whoever is queued joins now, up to max_batch answers in flight
                self._join(batch, self._take(self.max_batch - len(batch), wait=False))
            else:  # idle: wait for a request, then briefly for others to start with it
                self._join(batch, self._take(self.max_batch, wait=True))
            if not batch:
                continue
            try:
                finished = batch.step()
            except Exception as err:  # a bug: the clients get one line, the server log the traceback
                traceback.print_exc(file=self.log)
                for job in self.in_flight:
                    job.fail(RequestError(500, f"internal error: {type(err).__name__}: {err}", "server_error"))
                self.in_flight.clear()
                batch = self.rain.continuous_batch()
                continue
            for job, out in finished.items():
                self.in_flight.discard(job)
                job.result = out
                print(f"rain: answered a request ({out.method}, {len(out.token_ids)} tokens, "
                      f"{out.stats.seconds:.2f} s, alongside up to {out.stats.batch - 1} others)",
                      file=self.log, flush=True)
                job.send(out.text)
                job.events.put(("end", None))
                job.done.set()
            for job in self.in_flight:  # streamed answers: what their searches committed this round
                if job.stream:  # (a round is one token: render the text only where it is sent)
                    job.send(batch.partial_text(job))
            for job in [j for j in self.in_flight if j.cancelled]:  # their clients left: stop computing
                batch.cancel(job)
                self.in_flight.discard(job)
                job.done.set()
                print("rain: a client went away; its answer was cancelled", file=self.log, flush=True)

    def _take(self, most: int, wait: bool) -> list[Job]:
        taken: list[Job] = []
        deadline = None
        while len(taken) < most and not self.stopping:
            try:
                if wait and deadline is None:
                    job = self.jobs.get()
                    deadline = time.monotonic() + self.batch_window
                elif wait:
                    job = self.jobs.get(timeout=max(0.0, deadline - time.monotonic()))
                else:
                    job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self.stopping = True
            else:
                taken.append(job)
        return taken

    def _join(self, batch: Any, jobs: list[Job]) -> None:
        if len(jobs) > 1:  # together: their prompts are encoded in one forward
            try:
                batch.add_many([(job, job.prompt, job.cfg) for job in jobs])
                self.in_flight.update(jobs)
                for job in jobs:
                    job.events.put(("start", None))
                return
            except Exception:  # checked before any work: find the bad ones by adding one at a time
                pass
        for job in jobs:
            try:
                batch.add(job, job.prompt, job.cfg)
                self.in_flight.add(job)
                job.events.put(("start", None))
            except RainError as err:  # checked before any work: this request alone fails
                job.fail(RequestError(400, str(err)))
            except Exception as err:  # a bug: this request fails, the server goes on
                traceback.print_exc(file=self.log)
                job.fail(RequestError(500, f"internal error: {type(err).__name__}: {err}", "server_error"))


def chat_response(job: Job, model_name: str, stop_ids: frozenset[int]) -> dict[str, Any]:
    """An OpenAI chat.completion object for a finished job; RAIN's figures under the extra key 'rain'."""
    out = job.result
    prompt_tokens = out.stats.prompt_tokens
    return {
        "id": job.id,
        "object": "chat.completion",
        "created": job.created,
        "model": model_name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                     "finish_reason": finish_reason(out.token_ids, stop_ids, job.cfg.max_new_tokens),
                     "logprobs": None}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(out.token_ids),
                  "total_tokens": prompt_tokens + len(out.token_ids)},
        "rain": {"method": out.method, "stats": out.stats.to_dict()},
    }


def finish_reason(token_ids: list[int], stop_ids: frozenset[int], max_new_tokens: int) -> str:
    if token_ids and token_ids[-1] in stop_ids:
        return "stop"
    return "length" if len(token_ids) >= max_new_tokens else "stop"  # else: a transcript's turn ended


def chunk(job: Job, model_name: str, delta: dict[str, str], finish: str | None = None,
          **extra: Any) -> dict[str, Any]:
    """One chat.completion.chunk event of a streamed answer."""
    return {"id": job.id, "object": "chat.completion.chunk", "created": job.created, "model": model_name,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}


def check_port(host: str, port: int) -> None:
    """Raise RainError if (host, port) cannot be listened on."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as err:
        raise RainError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as err:
            raise RainError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None


class RainServer:
    """The HTTP server and its worker. `start()` serves in a background thread; `serve_forever()`
    in this one; `close()` stops both."""

    def __init__(self, rain: Any, config: RainConfig, *, host: str = "127.0.0.1", port: int = 8000,
                 model_name: str | None = None, max_batch: int = 16, batch_window: float = 0.05,
                 log: Any = sys.stderr):
        if max_batch < 1:
            raise RainError(f"invalid max_batch {max_batch}: must be at least 1")
        if batch_window < 0:
            raise RainError(f"invalid batch_window {batch_window}: must not be negative")
        self.rain, self.config = rain, config.validate()
        self.model_name = model_name or rain.name
        self.worker = BatchingWorker(rain, max_batch, batch_window, log)
        self.log = log
        try:
            self.httpd = ThreadingHTTPServer((host, port), _handler(self))
        except OSError as err:
            raise RainError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> RainServer:
        self.worker.start()
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="rain-http", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.worker.start()
        try:
            self.httpd.serve_forever()
        finally:
            self.close()

    def close(self) -> None:
        self.httpd.shutdown() if self._thread is not None else None
        self.httpd.server_close()
        self.worker.stop()

    def __enter__(self) -> RainServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def submit_chat(self, body: Any) -> Job:
        """Check a chat request and queue it; its answer arrives on the job."""
        prompt, cfg, stream = parse_chat_request(body, self.config, self.model_name)
        return self.worker.submit(prompt, cfg, stream)


def _handler(server: RainServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt: str, *args: Any) -> None:  # one line per request, on the server's log
            print(f"rain: {self.address_string()} {fmt % args}", file=server.log, flush=True)

        def do_GET(self) -> None:
            path = self.path.split("?")[0].rstrip("/")
            if path == "/v1/models":
                self._json(200, {"object": "list", "data": [{"id": server.model_name, "object": "model",
                                                             "created": 0, "owned_by": "rain-llm"}]})
            elif path in ("/health", "/v1/health"):
                self._json(200, {"status": "ok"})
            else:
                self._error(RequestError(404, f"no such endpoint: GET {path}", "not_found_error"))

        def do_POST(self) -> None:
            path = self.path.split("?")[0].rstrip("/")
            try:
                if path != "/v1/chat/completions":
                    raise RequestError(404, f"no such endpoint: POST {path} (this server has /v1/chat/completions)",
                                       "not_found_error")
                job = server.submit_chat(self._body())
                if job.stream:
                    if job.events.get()[0] == "error":  # refused before it started: a plain error reply
                        raise job.error  # type: ignore[misc]
                else:
                    while not job.done.wait(0.25):
                        if self._client_gone():
                            job.cancelled = True
                            return
                    if job.error is not None:
                        raise job.error
            except RequestError as err:
                self._error(err)
                return
            if job.stream:
                self._stream(job)
            else:
                self._json(200, chat_response(job, server.model_name, server.rain.codec.stop_ids))

        def _body(self) -> Any:
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                raise RequestError(400, "malformed request: bad Content-Length") from None
            if length > MAX_BODY_BYTES:
                raise RequestError(413, f"request body of {length} bytes exceeds {MAX_BODY_BYTES}")
            raw = self.rfile.read(length) if length else b""
            try:
                return json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise RequestError(400, f"malformed request: the body is not valid JSON ({err})") from None

        def _json(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, err: RequestError) -> None:
            self._json(err.status, {"error": {"message": err.message, "type": err.kind, "param": err.param,
                                              "code": None}})

        def _stream(self, job: Job) -> None:
            """Server-sent events: the role, then text as the search commits it, then the finish
            reason with usage and RAIN's stats (or an error event), then [DONE]."""
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True

            def event(payload: dict[str, Any]) -> None:
                self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())
                self.wfile.flush()

            try:
                self._events(job, event)
            except (BrokenPipeError, ConnectionResetError):  # the client left: stop computing its answer
                job.cancelled = True

        def _client_gone(self) -> bool:
            """True if the client closed its connection (readable, but nothing to read)."""
            try:
                readable, _, _ = select.select([self.connection], [], [], 0)
                return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
            except OSError:
                return True

        def _events(self, job: Job, event: Any) -> None:
            event(chunk(job, server.model_name, {"role": "assistant"}))
            while True:
                try:
                    kind, text = job.events.get(timeout=0.25)
                except queue.Empty:
                    if self._client_gone():
                        job.cancelled = True
                        return
                    continue
                if kind == "delta":
                    event(chunk(job, server.model_name, {"content": text}))
                elif kind == "end":
                    whole = chat_response(job, server.model_name, server.rain.codec.stop_ids)
                    event(chunk(job, server.model_name, {}, whole["choices"][0]["finish_reason"],
                                usage=whole["usage"], rain=whole["rain"]))
                    break
                else:
                    err = job.error
                    event({"error": {"message": err.message if err else "internal error", "type": "server_error",
                                     "param": None, "code": None}})
                    break
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()

    return Handler
