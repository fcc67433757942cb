"""The vLLM client's HTTP behaviour against a scripted local HTTP server: retries with backoff on
429/503 and connection errors, a deadline per call, errors mapped by status and structured body.
(The real vLLM server is in test_vllm.py; these are the cases a healthy server never shows.)"""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from rain_llm.engine.vllm.client import Client
from rain_llm.errors import EngineError, EngineRefused, EngineTimeout, EngineUnavailable


class Scripted(http.server.BaseHTTPRequestHandler):
    """Answers POSTs from a script: a list of (status, body, headers, delay) used in order."""

    script: list[tuple[int, dict, dict, float]] = []
    seen: list[str] = []

    def do_POST(self):  # noqa: N802
        length = int(self.headers.get("Content-Length", 0))
        self.rfile.read(length)
        Scripted.seen.append(self.path)
        status, body, headers, delay = Scripted.script.pop(0) if Scripted.script else (200, {"ok": True}, {}, 0.0)
        time.sleep(delay)
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@contextmanager
def scripted(*steps: tuple[int, dict, dict, float]) -> Iterator[str]:
    Scripted.script, Scripted.seen = list(steps), []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def error(message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": "BadRequestError", "param": param, "code": 400}}


def test_overloaded_and_restarting_servers_are_retried_then_answer():
    with scripted((503, error("restarting"), {}, 0.0), (429, error("busy"), {"Retry-After": "0"}, 0.0),
                  (200, {"answer": 1}, {}, 0.0)) as url:
        client = Client(timeout=30)
        assert client.post(client.server(url), "/completions", {}) == {"answer": 1}
        assert Scripted.seen == ["/v1/completions"] * 3


def test_errors_are_mapped_by_status_and_the_refused_parameter():
    cases = [
        ((400, error("Requested sample logprobs of 25, which is greater than max allowed: 20", "logprobs")),
         EngineRefused, "--max-logprobs"),
        ((400, error("This model's maximum context length is 2048 tokens.", "input_tokens")),
         EngineRefused, "--max-model-len"),
        ((401, {"error": {"message": "Unauthorized"}}), EngineUnavailable, "$RAIN_ENGINE_KEY"),
        ((404, {"detail": "Not Found"}), EngineUnavailable, "base URL"),
        ((500, error("boom")), EngineError, "HTTP 500"),
        ((503, error("still restarting")), EngineUnavailable, "3 retries"),
    ]
    for (status, body), kind, words in cases:
        with scripted(*[(status, body, {"Retry-After": "0"}, 0.0)] * 4) as url:
            client = Client(timeout=30)
            with pytest.raises(kind) as err:
                client.post(client.server(url), "/completions", {})
            assert words in str(err.value) and url in str(err.value) and "\n" not in str(err.value), str(err.value)
            assert err.value.status == kind.status


def test_a_call_has_one_deadline_retries_included():
    with scripted((200, {"late": True}, {}, 3.0)) as url:
        client = Client(timeout=0.5)
        with pytest.raises(EngineTimeout) as err:
            client.post(client.server(url), "/completions", {})
    assert "0 s" in str(err.value) or "did not answer" in str(err.value)
    assert err.value.status == 504


def test_nothing_listening_is_unavailable_after_retries():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = Client(timeout=30, retries=1)
    with pytest.raises(EngineUnavailable) as err:
        client.post(client.server(f"http://127.0.0.1:{port}"), "/completions", {})
    assert f"127.0.0.1:{port}" in str(err.value) and "--engine-url" in str(err.value)
    assert err.value.status == 503
