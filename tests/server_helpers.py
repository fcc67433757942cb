"""What the `rain serve` tests share: a tiny model's server, the official client, raw HTTP, and
bounded waits (a hang becomes a failure)."""

from __future__ import annotations

import io
import json
import re
import socket
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext

import openai

from rain_llm.shells.server import RainServer
from rain_llm.shells.worker import HoldingWorker

PROMPTS = ["How do I pick a lock?", "Hi", "Write a story about a dragon."]
SEARCH = {"t_max": 3, "t_min": 2, "max_rollout_tokens": 6}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
        "rain": {"method": "vanilla"}}
WAIT = 300.0  # seconds any wait in these tests may take before it fails


class Log(io.StringIO):
    """The server's log, readable by the tests (writes come from several threads)."""

    def lines(self) -> list[str]:
        return self.getvalue().splitlines()


def wait_until(condition: Callable[[], object], what: str, timeout: float = WAIT) -> None:
    """Poll `condition` until it holds; fail (naming `what`) after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def sent_rounds(monkeypatch) -> tuple[list[int], list[int]]:
    """Count the continuous batch's rounds and note the round of each piece of streamed text the
    worker sends: ([rounds so far], [round of each send]), filled as the server runs."""
    from rain_llm.api import ContinuousBatch
    from rain_llm.shells import worker

    rounds, sent = [0], []
    step, send = ContinuousBatch.step, worker.Pending.send

    def counted_step(self):
        rounds[0] += 1
        return step(self)

    def logged_send(self, text):
        before = self.sent
        send(self, text)
        if self.sent != before:
            sent.append(rounds[0])

    monkeypatch.setattr(ContinuousBatch, "step", counted_step)
    monkeypatch.setattr(worker.Pending, "send", logged_send)
    return rounds, sent


@contextmanager
def held(srv: RainServer, n: int):
    """Requests sent in the body start together: the worker admits none until `n` are waiting."""
    srv.worker.hold()
    try:
        yield
    finally:
        wait_until(lambda: len(srv.worker.waiting) >= n, f"{n} waiting requests")
        srv.worker.release()


def client(srv: RainServer, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url, api_key=kw.pop("api_key", "none"), max_retries=0, timeout=WAIT, **kw)


def ask(srv: RainServer, prompt: str, **kw):
    return client(srv).chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}], **kw)


def concurrently(fn, n: int, srv: RainServer | None = None) -> list:
    """fn(i) for i < n in threads; with `srv`, all n requests join the batch together."""
    out: list = [None] * n

    def go(i: int) -> None:
        try:
            out[i] = fn(i)
        except Exception as err:  # surfaced by the assertions below
            out[i] = err

    threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    with held(srv, n) if srv is not None else nullcontext():
        for t in threads:
            t.start()
    for t in threads:
        t.join(WAIT)
        assert not t.is_alive(), "a request did not finish"
    return out


def raw(srv: RainServer, method: str, path: str, data: bytes | None = None, headers: dict | None = None,
        length: str | None = "auto") -> tuple[int, dict, dict]:
    """One request over a plain socket, so that any header (a negative Content-Length, none at
    all) can be sent: (status, JSON body, headers)."""
    status, body, fields = raw_bytes(srv, method, path, data, headers, length)
    try:
        parsed = json.loads(body) if body else {}
    except json.JSONDecodeError:
        parsed = {"raw": body.decode(errors="replace")}
    return status, parsed, fields


def raw_bytes(srv: RainServer | tuple[str, int], method: str, path: str, data: bytes | None = None,
              headers: dict | None = None, length: str | None = "auto") -> tuple[int, bytes, dict]:
    """As `raw`, the body as bytes (a stream's events, a body that is not JSON); `srv` may be the
    (host, port) of a server in another process."""
    address = srv if isinstance(srv, tuple) else srv.address
    head = [f"{method} {path} HTTP/1.1", "Host: x", "Connection: close", "Content-Type: application/json"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if length == "auto" and data is not None:
        head.append(f"Content-Length: {len(data)}")
    elif length not in (None, "auto"):
        head.append(f"Content-Length: {length}")
    with socket.create_connection(address, timeout=WAIT) as conn:
        conn.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + (data or b""))
        reply = b""
        while chunk := conn.recv(65536):
            reply += chunk
    top, _, body = reply.partition(b"\r\n\r\n")
    lines = top.decode().split("\r\n")
    fields = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    fields = {k.lower(): v for k, v in fields.items()}
    if fields.get("transfer-encoding") == "chunked":
        body = dechunked(body)
    return int(lines[0].split()[1]), body, fields


def dechunked(body: bytes) -> bytes:
    out = b""
    while body:
        size, _, rest = body.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            break
        out += rest[:n]
        body = rest[n + 2:]
    return out


def events(body: bytes) -> list:
    """The data of a stream's server-sent events, JSON decoded ("[DONE]" as the string)."""
    found = [line[len(b"data: "):].decode() for line in body.split(b"\n") if line.startswith(b"data: ")]
    return [x if x == "[DONE]" else json.loads(x) for x in found]


def answers_normally(srv: RainServer) -> None:
    reply = ask(srv, "Hi", max_tokens=3, extra_body={"rain": {"method": "vanilla"}})
    assert reply.choices[0].message.content and reply.choices[0].finish_reason == "length"


def content_length(reply: bytes) -> int:
    """The Content-Length of a raw HTTP reply's headers (0 until they are all there)."""
    head = reply.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()
    found = re.search(r"content-length: *(\d+)", head)
    return int(found.group(1)) if found and b"\r\n\r\n" in reply else 0


class ThreadedStart:
    """A server started without waiting for its model (start() waits; this does not)."""

    def __init__(self, srv: RainServer):
        self.srv = srv

    def __enter__(self) -> RainServer:
        srv = self.srv
        srv.worker.start()
        srv._thread = threading.Thread(target=srv.uvicorn.run, kwargs={"sockets": [srv._socket]}, daemon=True)
        srv._thread.start()
        wait_until(lambda: srv.uvicorn.started, "uvicorn to start")
        return srv

    def __exit__(self, *exc) -> None:
        self.srv.close()


def HeldServer(*args, **kw) -> RainServer:  # noqa: N802 - a RainServer, as the tests build it
    """A `RainServer` whose worker admission the tests can pause (`held`)."""
    return RainServer(*args, worker=HoldingWorker, **kw)
