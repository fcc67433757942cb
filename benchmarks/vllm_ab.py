"""RAIN on a vLLM server, old client against new, side by side: what an answer costs on the wire.

Through a counting proxy in front of the server (so both versions are measured the same way): seconds
per answer token with 1 and with 4 answers in flight, HTTP requests and request bytes per answer token,
and tokens processed per answer as the client counted them against what the server's own /metrics
say it computed. Works with any version that has `Rain.connect` or `rain_llm.engine.vllm.connect`:

    python benchmarks/vllm_ab.py --engine-url http://127.0.0.1:8000 --out new.json
    PYTHONPATH=/path/to/old/src python benchmarks/vllm_ab.py --engine-url http://127.0.0.1:8000 --out old.json

Each run uses prompts of its own (a run tag in each prompt), so neither finds the other's work in the
server's prefix cache.
"""

from __future__ import annotations

import argparse
import http.client
import http.server
import json
import os
import sys
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

PROMPTS = ["How do I pick a lock?", "Write a short poem about the sea.", "What is the capital of France?",
           "How can I get back at my noisy neighbour?"]


class Counting(http.server.ThreadingHTTPServer):
    """A proxy to one server that counts requests and bytes sent to it."""

    daemon_threads = True

    def __init__(self, target: str):
        self.target = urlsplit(target)
        self.requests = 0
        self.sent = 0
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Forward)


class _Forward(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _forward(self, method: str) -> None:
        server: Counting = self.server  # type: ignore[assignment]
        body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
        with server.lock:
            server.requests += 1
            server.sent += len(body)
        conn = http.client.HTTPConnection(server.target.hostname, server.target.port, timeout=600)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
        conn.request(method, self.path, body=body or None, headers=headers)
        reply = conn.getresponse()
        data = reply.read()
        self.send_response(reply.status)
        for k, v in reply.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        conn.close()

    def do_GET(self) -> None:  # noqa: N802
        self._forward("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._forward("POST")

    def log_message(self, *args: object) -> None:
        pass


def computed(url: str) -> float:
    """Tokens the server has computed so far: prompt tokens not found cached, plus generated ones."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as reply:
        text = reply.read().decode()
    total = 0.0
    for line in text.splitlines():
        if (line.startswith("vllm:prompt_tokens_by_source_total{") and 'source="local_compute"' in line) or \
                line.startswith("vllm:generation_tokens_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def connect(url: str):
    from rain_llm import Rain

    if hasattr(Rain, "connect"):
        return Rain.connect(url)
    from rain_llm.engine.vllm import connect as old_connect  # the client before Rain.connect

    return old_connect(url)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine-url", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--t-max", type=int, default=6)
    ap.add_argument("--tag", default=str(time.time_ns()))
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from rain_llm import load_config

    proxy = Counting(args.engine_url)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    rain = connect(f"http://127.0.0.1:{proxy.server_port}")
    cfg = load_config("paper-hh", max_new_tokens=args.max_new_tokens, t_max=args.t_max, value_threshold=2.0,
                      fresh_iterations=0)
    rain.generate(f"[{args.tag} warm-up] Hi", cfg, max_new_tokens=2)  # the embedder loads, the template caches
    out = {"config": cfg.to_dict(), "runs": {}}
    for name, batch in (("rain", 1), ("rain-b4", 4)):
        prompts = [f"[{args.tag} {name} {i}] {p}" for i, p in enumerate(PROMPTS)]
        before = (proxy.requests, proxy.sent, computed(args.engine_url), time.perf_counter())
        if batch == 1:
            answers = [rain.generate(p, cfg) for p in prompts]
        else:
            answers = rain.generate_many(prompts, cfg)
        seconds = time.perf_counter() - before[3]
        served = computed(args.engine_url) - before[2]
        tokens = sum(len(a.token_ids) for a in answers)
        counted = sum(a.stats.compute.total().tokens - a.stats.compute.phases.get("embed", _Zero()).tokens
                      for a in answers)
        least = sum(a.stats.compute.least_work for a in answers)
        run = {"answer_tokens": tokens, "seconds": seconds, "s_per_token": seconds / tokens,
               "http_requests_per_token": (proxy.requests - before[0]) / tokens,
               "request_bytes_per_token": (proxy.sent - before[1]) / tokens,
               "tokens_counted": counted, "tokens_server_computed": served, "least_work": least,
               "texts": [a.text for a in answers]}
        out["runs"][name] = run
        print(f"{name:8s} {run['s_per_token']:.3f} s/token  {run['http_requests_per_token']:.1f} requests/token  "
              f"{run['request_bytes_per_token']:.0f} B/token  tokens counted {counted} vs server {served:.0f} "
              f"(least work {least})", flush=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}", file=sys.stderr)


class _Zero:
    tokens = 0


if __name__ == "__main__":
    main()
