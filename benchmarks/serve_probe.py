"""The issue-19 probe of `rain serve`: the requests evaluation clients send, hostile input, a burst
over capacity, clients that leave, and SIGTERM past the grace period, against `rain serve` as a
process on the default model. Prints a Markdown table (request -> status, what came back) and
writes it as JSON. Figures only: nothing here asserts; the exit status is 1 if a case got a status
other than the one it should.

    python benchmarks/serve_probe.py --out results/serve_probe_cpu.json
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

SERVE = ["--port", "0", "--preset", "fast", "--max-new-tokens", "64", "--max-batch", "4", "--max-queue", "8",
         "--grace", "2"]
CHAT = {"model": "default", "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 16}
LONG = {"model": "default", "messages": [{"role": "user", "content": "Tell a long story about a dragon."}],
        "max_tokens": 64, "rain": {"t_max": 50, "t_min": 50, "value_threshold": 2.0}}


def request(address: tuple[str, int], method: str, path: str, body: bytes | None = None,
            timeout: float = 600) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request over a plain socket (any path or body can be sent): status, headers, body."""
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"
    if body is not None:
        head += f"Content-Length: {len(body)}\r\n"
    with socket.create_connection(address, timeout=timeout) as conn:
        conn.sendall(head.encode() + b"\r\n" + (body or b""))
        reply = b""
        while part := conn.recv(65536):
            reply += part
    top, _, data = reply.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:] if ": " in line)}
    if headers.get("transfer-encoding") == "chunked":
        out = b""
        while data:
            size, _, rest = data.partition(b"\r\n")
            if int(size, 16) == 0:
                break
            out, data = out + rest[:int(size, 16)], rest[int(size, 16) + 2:]
        data = out
    return int(lines[0].split()[1]), headers, data


def said(data: bytes) -> str:
    """A reply in a few words: the error message, or the answer's finish reason and length."""
    try:
        body = json.loads(data)
    except ValueError:
        events = [line[6:] for line in data.decode(errors="replace").split("\n") if line.startswith("data: ")]
        return f"{len(events)} events, last two: {' / '.join(e[:90] for e in events[-2:])}"
    if "error" in body:
        return f"{body['error']['message'][:150]} (param {body['error']['param']!r})"
    choice = body["choices"][0]
    text = choice.get("message", {}).get("content", choice.get("text"))
    return (f"{body['object']}, finish_reason {choice['finish_reason']!r}, {body['usage']['completion_tokens']} "
            f"tokens, method {body['rain']['method']}: {text!r}")


class Server:
    """`rain serve` in its own process, its log in a file."""

    def __init__(self, folder: Path):
        self.log = folder / "serve.log"
        with self.log.open("w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "rain_llm.shells.cli", "serve", *SERVE], stderr=out)
        deadline = time.monotonic() + 600
        while "serving 'default' at" not in self.log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"rain serve did not start: {self.log.read_text()}")
            time.sleep(0.1)
        url = self.log.read_text().split("serving 'default' at ")[1].split()[0]
        host, port = url.removeprefix("http://").removesuffix("/v1").rsplit(":", 1)
        self.address = (host, int(port))

    def metric(self, name: str) -> float:
        text = urllib.request.urlopen(f"http://{self.address[0]}:{self.address[1]}/metrics", timeout=60).read()
        found = re.search(rf"^{re.escape(name)} (\S+)$", text.decode(), re.M)
        return float(found.group(1)) if found else 0.0

    def wait(self, condition: Any, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise SystemExit("timed out")
            time.sleep(0.05)


def probe(server: Server) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    at = server.address

    def case(name: str, expected: int, method: str, path: str, body: Any = None, raw: bytes | None = None) -> None:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        status, headers, reply = request(at, method, path, data)
        rows.append({"request": name, "expected": expected, "status": status, "reply": said(reply) if reply else "",
                     "content_type": headers.get("content-type", "")})

    case("lm-eval local-chat-completions (stop [\"\\n\", \"Question:\"], temperature 0, seed 1234), vanilla", 200,
         "POST", "/v1/chat/completions", {**CHAT, "stop": ["\n", "Question:"], "temperature": 0, "seed": 1234,
                                          "rain": {"method": "vanilla"}})
    case("the same, RAIN", 200, "POST", "/v1/chat/completions",
         {**CHAT, "stop": ["\n", "Question:"], "temperature": 0, "seed": 1234})
    case("Inspect openai-api (max_tokens 16, seed 3, temperature 0.0)", 200, "POST", "/v1/chat/completions",
         {**CHAT, "seed": 3, "temperature": 0.0})
    case("RAIN, stop [\" is\"]: cut there, the search stopped", 200, "POST", "/v1/chat/completions",
         {**CHAT, "stop": [" is"]})
    case("n 1, top_p 1, logprobs false, max_completion_tokens 16", 200, "POST", "/v1/chat/completions",
         {**{k: v for k, v in CHAT.items() if k != "max_tokens"}, "n": 1, "top_p": 1, "logprobs": False,
          "max_completion_tokens": 16, "rain": {"method": "vanilla"}})
    case("/v1/completions, plain prompt (lm-eval local-completions)", 200, "POST", "/v1/completions",
         {"model": "default", "prompt": "What is the capital of France?", "max_tokens": 16, "temperature": 0,
          "stop": ["\n"], "seed": 1234, "rain": {"method": "vanilla"}})
    case("/v1/completions, prompt as token ids", 400, "POST", "/v1/completions",
         {"model": "default", "prompt": [1, 2, 3], "max_tokens": 4})
    case("/v1/completions, logprobs 1 + echo (lm-eval loglikelihood)", 400, "POST", "/v1/completions",
         {"model": "default", "prompt": "Hi", "max_tokens": 1, "logprobs": 1, "echo": True})
    for name, extra in [("n 2", {"n": 2}), ("top_p 0.5", {"top_p": 0.5}), ("logprobs true", {"logprobs": True}),
                        ("tools", {"tools": [{"type": "function", "function": {"name": "f"}}]}),
                        ("max_tokens 1000000", {"max_tokens": 10 ** 6}),
                        ("rain.c_puct \"2\"", {"rain": {"c_puct": "2"}}), ("rain.t_max 2.5", {"rain": {"t_max": 2.5}}),
                        ("rain.t_max 0", {"rain": {"t_max": 0}}), ("stop [\"\"]", {"stop": [""]})]:
        case(name, 400, "POST", "/v1/chat/completions", {**CHAT, **extra})
    case("a 5,000-digit integer literal", 400, "POST", "/v1/chat/completions",
         raw=json.dumps({**CHAT, "max_tokens": 7}).replace("7", "9" * 5000).encode())
    case("a lone surrogate as a key of rain", 400, "POST", "/v1/chat/completions",
         raw=json.dumps(CHAT).removesuffix("}").encode() + b', "rain": {"\\ud800": 1}}')
    case("GET /x%0Arain:%20chatcmpl-FAKE%20answered (log forging)", 404, "GET",
         "/x%0Arain:%20chatcmpl-FAKE%20answered")
    case("PUT /v1/chat/completions", 405, "PUT", "/v1/chat/completions", {})
    case("POST /v1/embeddings", 404, "POST", "/v1/embeddings", {})
    forged = [line for line in server.log.read_text().splitlines() if "FAKE" in line]
    rows.append({"request": "the access log for the forging request", "expected": 1, "status": len(forged),
                 "reply": f"{len(forged)} line: {forged[0] if forged else ''}"})
    rows.append(burst(server))
    rows.append(vanilla_stream(server))
    return rows


def burst(server: Server, n: int = 40) -> dict[str, Any]:
    """n long RAIN requests at once (half of them streams) against --max-batch 4 and --max-queue 8: how
    many are admitted, how many get 429 (and their Retry-After); then the admitted ones' clients leave."""
    conns, statuses, retry = [], [], []
    for i in range(n):
        conn = socket.create_connection(server.address, timeout=600)
        body = json.dumps({**LONG, "stream": i % 2 == 1}).encode()
        conn.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        conns.append(conn)
    admitted = []
    server.wait(lambda: server.metric("rain_queue_length") + server.metric("rain_answers_in_flight")
                + server.metric('rain_rejected_total{reason="queue_full"}') >= n)
    for conn in conns:
        conn.settimeout(0.5)
        try:
            head = conn.recv(65536).decode("latin-1")
        except TimeoutError:  # waiting, or a plain answer being computed
            admitted.append(conn)
            continue
        status = int(head.split()[1])
        statuses.append(status)
        if status == 200:  # a stream that started
            admitted.append(conn)
            continue
        found = re.search(r"retry-after: (\d+)", head, re.I)
        retry += [int(found.group(1))] if found else []
        conn.close()
    queued, running = server.metric("rain_queue_length"), server.metric("rain_answers_in_flight")

    def gone() -> int:
        log = server.log.read_text()
        return log.count("cancelled: the client went away") + log.count("dropped: the client went away")

    before = gone()
    for conn in admitted:
        conn.close()
    server.wait(lambda: server.metric("rain_queue_length") + server.metric("rain_answers_in_flight") == 0)
    left = gone() - before
    return {"request": f"a burst of {n} long RAIN requests (half streams), --max-batch 4 --max-queue 8; then the "
                       "admitted clients leave", "expected": 429, "status": sorted(set(statuses)),
            "reply": f"{len(admitted)} admitted ({int(running)} in flight, {int(queued)} waiting), "
                     f"{statuses.count(429)} x 429 with Retry-After {sorted(set(retry))} s; the {len(admitted)} "
                     f"that left: {left} dropped or cancelled, queue and batch empty after"}


def vanilla_stream(server: Server) -> dict[str, Any]:
    """Time to the first content of a vanilla stream, against the time to its end."""
    body = json.dumps({**LONG, "stream": True, "rain": {"method": "vanilla"}}).encode()
    start = time.perf_counter()
    first, pieces = None, 0
    with socket.create_connection(server.address, timeout=600) as conn:
        conn.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: "
                     f"application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        while part := conn.recv(65536):
            found = part.count(b'"content":')
            if found and first is None:
                first = time.perf_counter() - start
            pieces += found
    total = time.perf_counter() - start
    return {"request": "vanilla, stream: true, a 64-token story", "expected": 200, "status": 200,
            "reply": f"{pieces} content chunks; first content after {first:.2f} s of {total:.2f} s"}


def shutdown(server: Server) -> list[dict[str, Any]]:
    """SIGTERM with two long RAIN answers in flight (one a stream) and --grace 2."""
    out: dict[str, tuple] = {}

    def send(name: str, stream: bool) -> None:
        out[name] = request(server.address, "POST", "/v1/chat/completions", json.dumps({**LONG, "stream": stream})
                            .encode())

    threads = [threading.Thread(target=send, args=(name, name == "stream")) for name in ("plain", "stream")]
    for thread in threads:
        thread.start()
    server.wait(lambda: server.metric("rain_answers_in_flight") == 2)
    server.proc.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(600)
    code = server.proc.wait(600)
    log = server.log.read_text()
    rows = [{"request": "SIGTERM, --grace 2, a RAIN answer in flight", "expected": 503, "status": out["plain"][0],
             "reply": said(out["plain"][2]), "content_type": out["plain"][1].get("content-type", "")},
            {"request": "SIGTERM, --grace 2, a RAIN stream in flight", "expected": 200, "status": out["stream"][0],
             "reply": said(out["stream"][2])},
            {"request": "SIGTERM: the process", "expected": 0, "status": code,
             "reply": f"exit {code}; tracebacks in the log: {log.count('Traceback')}, "
                      f"CancelledError: {log.count('CancelledError')}"}]
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        server = Server(Path(folder))
        try:
            rows = probe(server) + shutdown(server)
        finally:
            if server.proc.poll() is None:
                server.proc.kill()
    print("| request | status | what came back |\n|---|---|---|")
    for row in rows:
        shown = str(row["reply"]).replace("|", "\\|").replace("\n", " ")
        print(f"| {row['request']} | {row['status']} | {shown} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"command": "python benchmarks/serve_probe.py", "serve": SERVE,
                                              "rows": rows}, indent=1) + "\n")
    wrong = [row for row in rows if row["status"] != row["expected"] and not (
        isinstance(row["status"], list) and row["expected"] in row["status"])]
    for row in wrong:
        print(f"unexpected: {row['request']}: {row['status']} (expected {row['expected']})", file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
