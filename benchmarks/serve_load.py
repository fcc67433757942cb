"""`rain serve` under load (issue #14): the real HTTP server started in this process, hit by
  1. many concurrent `openai` clients (small answers, vanilla and RAIN mixed): errors, duplicated
     ids, answers that differ from the same request answered alone by `rain.generate`, latency
     percentiles, wall time, memory (peak and sampled RSS);
  2. a burst above the queue bound: how many are answered, how many get 429 (and their Retry-After),
     and whether the answered ones are still the alone answers;
  3. a burst of raw TCP connections (one small request each) against a queue bound above and one
     below their number: connection resets, empty replies, 200s, 429s, other statuses;
  4. streaming clients that hang up after their first content chunk: are their searches cancelled,
     does the memory go back, is the next request still answered correctly.
Prints one table and writes JSON (with the machine, its load before and after, and the command).
Figures only: nothing here asserts a time; the exit status is 1 if a correctness figure that
must be 0 (errors, duplicated ids, mismatches, resets) is not.

    python benchmarks/serve_load.py --out results/serve_load_cpu.json          # tiny random model
    python benchmarks/serve_load.py --model default --parts 1,4 --out load.json  # bundled SmolLM2-135M
"""

from __future__ import annotations

import argparse
import gc
import http.client
import json
import math
import os
import platform
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import openai
import torch

from rain_llm import Rain, load_config
from rain_llm.shells.bench import bench_prompts
from rain_llm.shells.protocol import Limits
from rain_llm.shells.server import RainServer
from rain_llm.shells.worker import HoldingWorker

PRESET = "fast"


# ---------------------------------------------------------------------------------------------- helpers
class Log:
    """The server's log, kept in memory (written from several threads)."""

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._part = ""
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            parts = (self._part + text).split("\n")
            self._part = parts.pop()
            self._lines.extend(parts)
        return len(text)

    def flush(self) -> None:
        pass

    def lines(self) -> list[str]:
        with self._lock:
            return list(self._lines)


def status_kib(key: str) -> int | None:
    """A figure of /proc/self/status in KiB (VmRSS, VmHWM), None where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def mib(kib: float | None) -> float | None:
    return None if kib is None else round(kib / 1024, 1)


def reset_peak_rss() -> bool:
    """Reset VmHWM (the process's peak RSS) so each part reports its own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class RssSampler(threading.Thread):
    """VmRSS every `interval` seconds while a part runs."""

    def __init__(self, interval: float = 0.1):
        super().__init__(daemon=True)
        self.interval, self.samples = interval, []
        self.reset_ok = reset_peak_rss()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            value = status_kib("VmRSS")
            if value is not None:
                self.samples.append(value)
            self.done.wait(self.interval)

    def stop(self) -> dict[str, Any]:
        self.done.set()
        self.join()
        out = {"rss_samples": len(self.samples), "rss_start_mib": mib(self.samples[0]) if self.samples else None,
               "rss_max_sampled_mib": mib(max(self.samples, default=None)),
               "rss_mean_sampled_mib": mib(sum(self.samples) / len(self.samples)) if self.samples else None,
               "rss_end_mib": mib(status_kib("VmRSS")), "peak_rss_mib": mib(status_kib("VmHWM")),
               "peak_rss_is": "this part's (VmHWM reset before it)" if self.reset_ok else "the process's so far"}
        if out["peak_rss_mib"] is None:  # no /proc: getrusage's peak (KiB on Linux)
            import resource

            out["peak_rss_mib"] = mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        return out


class QueueWatcher(threading.Thread):
    """The longest the server's queue got while a part runs (polled every 5 ms); started at once."""

    def __init__(self, srv: RainServer):
        super().__init__(daemon=True)
        self.srv, self.peak, self.done = srv, 0, threading.Event()
        self.start()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, len(self.srv.worker.waiting))
            self.done.wait(0.005)

    def stop(self) -> int:
        self.done.set()
        self.join()
        return self.peak


def sampling() -> RssSampler:
    sampler = RssSampler()
    sampler.start()
    return sampler


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile."""
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)], 3)


def latency_figures(values: list[float]) -> dict[str, float | None]:
    return {"latency_p50_s": percentile(values, 50), "latency_p90_s": percentile(values, 90),
            "latency_p99_s": percentile(values, 99), "latency_max_s": round(max(values), 3) if values else None}


def load_average() -> dict[str, Any]:
    try:
        line = subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        line = None
    return {"uptime": line, "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()]}


def machine() -> dict[str, Any]:
    import resource

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = None
    somaxconn = Path("/proc/sys/net/core/somaxconn")
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "cpu_count": os.cpu_count(), "cpus_usable": usable,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "open_files_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            "somaxconn": int(somaxconn.read_text()) if somaxconn.is_file() else None,
            "openai": openai.__version__}


def metrics(srv: RainServer) -> dict[str, float]:
    """The server's /metrics as {"name{labels}": value} (counters and gauges of interest)."""
    text = urllib.request.urlopen(srv.url.removesuffix("/v1") + "/metrics", timeout=60).read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(rain_(?:http_requests_total|rejected_total|answers_total|queue_length|answers_in_flight|"
                     r"request_seconds_count)(?:\{[^}]*\})?) (\S+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def chat_statuses(found: dict[str, float]) -> dict[str, int]:
    return {re.search(r'status="(\d+)"', k).group(1): int(v) for k, v in found.items()
            if k.startswith("rain_http_requests_total") and 'route="/v1/chat/completions"' in k}


def tiny_rain() -> Rain:
    """The tests' tiny random-weight Llama (tests/conftest.py tiny_model("llama", ...)) with the
    bundled model's tokenizer and the real MiniLM embedder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from rain_llm.engine.hf.models import converted_folder, default_gguf
    from rain_llm.values.embedder import MiniLMEmbedder

    tokenizer = AutoTokenizer.from_pretrained(converted_folder(default_gguf()))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, vocab_size=len(tokenizer), hidden_size=64,
                                         intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=512)).eval()
    return Rain(model, tokenizer, embedder=MiniLMEmbedder.load(), name="tiny")


def prefix_cache_tokens(rain: Rain) -> int | None:
    try:
        return int(rain.backend.engine.prefix_cache.num_tokens())
    except AttributeError:
        return None


# ---------------------------------------------------------------------------------------------- requests
@dataclass(frozen=True)
class Req:
    prompt: str
    settings: tuple  # the request's "rain" settings as sorted items
    seed: int
    max_tokens: int

    @property
    def rain(self) -> dict[str, Any]:
        return dict(self.settings)

    def config(self):
        return load_config(PRESET, max_new_tokens=self.max_tokens, seed=self.seed, **self.rain)


def make_requests(n: int, prompts: list[str], max_tokens: int, search: dict) -> list[Req]:
    """n small requests, vanilla and RAIN alternating, each its own prompt and seed."""
    vanilla = (("method", "vanilla"),)
    rain = tuple(sorted(search.items()))
    return [Req(prompts[i % len(prompts)], rain if i % 2 == 0 else vanilla, i, max_tokens) for i in range(n)]


def distinct_prompts(rain: Rain, n: int, cfg) -> list[str]:
    """n different prompts (HH first turns where ../shared/data has them) that fit the model with
    the RAIN settings `cfg` (the tiny model's window is 512 tokens, the self-evaluation prompt's
    template alone about 400)."""
    out: list[str] = []
    for i, p in enumerate([*bench_prompts(4 * n), *(f"Question {i}: how do I boil an egg?" for i in range(n))]):
        if p in out:
            continue
        try:
            rain.answer(i, p, cfg)
        except Exception:  # too long for this model: not a load test's prompt
            continue
        out.append(p)
        if len(out) == n:
            break
    return out


def chat(client: openai.OpenAI, name: str, req: Req):
    return client.chat.completions.create(model=name, messages=[{"role": "user", "content": req.prompt}],
                                          max_tokens=req.max_tokens, seed=req.seed, extra_body={"rain": req.rain})


def client_for(srv: RainServer, timeout: float) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url, api_key="none", max_retries=0, timeout=timeout)


def in_threads(fn, n: int, timeout: float) -> tuple[list[Any], float, int]:
    """fn(i) for i < n, each in its own thread, released together: (results, wall seconds from the
    release to the last one, how many had not finished within `timeout`). A result is what fn
    returned or the exception it raised."""
    out: list[Any] = [None] * n
    finished = [False] * n
    gate = threading.Barrier(n + 1)

    def go(i: int) -> None:
        try:
            gate.wait(timeout=120)
        except threading.BrokenBarrierError:
            pass
        try:
            out[i] = fn(i)
        except Exception as err:  # counted by the caller
            out[i] = err
        finished[i] = True

    threads = [threading.Thread(target=go, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    try:
        gate.wait(timeout=120)
    except threading.BrokenBarrierError:
        pass
    start = time.perf_counter()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return out, time.perf_counter() - start, finished.count(False)


def error_kind(err: BaseException) -> str:
    if isinstance(err, openai.APIStatusError):
        return f"HTTP {err.status_code}"
    cause = err.__cause__ or err.__context__
    return type(err).__name__ + (f" ({type(cause).__name__})" if cause is not None else "")


def compare(replies: list[Any], reqs: list[Req], alone: dict[Req, str]) -> tuple[int, list[dict]]:
    """Mismatches of the answered replies against the alone answers, with a few examples."""
    bad = []
    for reply, req in zip(replies, reqs):
        if hasattr(reply, "choices") and reply.choices[0].message.content != alone[req]:
            bad.append({"prompt": req.prompt[:60], "rain": req.rain, "seed": req.seed,
                        "served": reply.choices[0].message.content, "alone": alone[req]})
    return len(bad), bad[:5]


# ---------------------------------------------------------------------------------------------- part 1
def part_clients(rain: Rain, cfg, reqs: list[Req], alone: dict[Req, str], max_batch: int, timeout: float) -> dict:
    log = Log()
    with RainServer(rain, cfg, port=0, max_batch=max_batch, log=log) as srv:
        chat(client_for(srv, timeout), srv.model_name, Req("Hi", (("method", "vanilla"),), 0, 2))  # warm-up
        clients = [client_for(srv, timeout) for _ in reqs]
        latencies: list[float | None] = [None] * len(reqs)

        def one(i: int):
            start = time.perf_counter()
            reply = chat(clients[i], srv.model_name, reqs[i])
            latencies[i] = time.perf_counter() - start
            return reply

        sampler = sampling()
        replies, wall, unfinished = in_threads(one, len(reqs), timeout)
        memory = sampler.stop()
        found = metrics(srv)
    answered = [r for r in replies if hasattr(r, "choices")]
    errors = Counter(error_kind(r) for r in replies if isinstance(r, BaseException))
    ids = [r.id for r in answered]
    mismatches, examples = compare(replies, reqs, alone)
    return {"server": {"max_batch": max_batch, "max_queue": Limits().max_queue},
            "clients": len(reqs), "answered": len(answered), "errors": sum(errors.values()),
            "error_kinds": dict(errors), "unfinished": unfinished, "duplicated_ids": len(ids) - len(set(ids)),
            "mismatches": mismatches, "mismatch_examples": examples, "wall_s": round(wall, 3),
            **latency_figures([x for x in latencies if x is not None]),
            "most_in_flight": max((r.model_extra["rain"]["stats"].get("batch", 1) for r in answered), default=0),
            "finish_reasons": dict(Counter(r.choices[0].finish_reason for r in answered)),
            **memory, "chat_statuses_in_metrics": chat_statuses(found)}


# ---------------------------------------------------------------------------------------------- part 2
def part_burst(rain: Rain, cfg, reqs: list[Req], alone: dict[Req, str], max_queue: int, max_batch: int,
               timeout: float) -> dict:
    log = Log()
    with RainServer(rain, cfg, port=0, max_batch=max_batch, limits=Limits(max_queue=max_queue), log=log) as srv:
        chat(client_for(srv, timeout), srv.model_name, Req("Hi", (("method", "vanilla"),), 0, 2))  # warm-up
        clients = [client_for(srv, timeout) for _ in reqs]
        watcher = QueueWatcher(srv)
        sampler = sampling()
        replies, wall, unfinished = in_threads(lambda i: chat(clients[i], srv.model_name, reqs[i]), len(reqs),
                                               timeout)
        memory = sampler.stop()
        peak_queue = watcher.stop()
        found = metrics(srv)
    answered = [r for r in replies if hasattr(r, "choices")]
    limited = [r for r in replies if isinstance(r, openai.RateLimitError)]
    other = Counter(error_kind(r) for r in replies if isinstance(r, BaseException)
                    and not isinstance(r, openai.RateLimitError))
    retry_after = Counter(r.response.headers.get("retry-after") for r in limited)
    mismatches, examples = compare(replies, reqs, alone)
    return {"server": {"max_batch": max_batch, "max_queue": max_queue}, "requests": len(reqs),
            "answered": len(answered), "status_429": len(limited), "retry_after_values": dict(retry_after),
            "other_errors": sum(other.values()), "other_error_kinds": dict(other), "unfinished": unfinished,
            "mismatches": mismatches, "mismatch_examples": examples, "peak_queue_length": peak_queue,
            "wall_s": round(wall, 3), **memory, "chat_statuses_in_metrics": chat_statuses(found),
            "rejected_in_metrics": {k: int(v) for k, v in found.items() if k.startswith("rain_rejected_total")}}


# ---------------------------------------------------------------------------------------------- part 3
def raw_exchange(address: tuple[str, int], body: bytes, gate: threading.Barrier, timeout: float) -> dict:
    """Connect, wait at the gate with the others, send one request, read the reply until the
    server closes: {"outcome": "200" | "429" | "reset" | "empty" | ..., ...}."""
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    sock, result = None, {}
    try:
        sock = socket.create_connection(address, timeout=timeout)
    except ConnectionResetError:
        result = {"outcome": "reset", "stage": "connect"}
    except TimeoutError:
        result = {"outcome": "timeout", "stage": "connect"}
    except OSError as err:
        result = {"outcome": f"connect error {type(err).__name__} {err.errno}", "stage": "connect"}
    try:
        gate.wait(timeout=120)
    except threading.BrokenBarrierError:
        pass
    if sock is None:
        return result
    stage = "send"
    try:
        sock.sendall(head + body)
        stage = "read"
        data = bytearray()
        while chunk := sock.recv(65536):
            data += chunk
        if not data:
            return {"outcome": "empty", "stage": stage}
        top, _, payload = bytes(data).partition(b"\r\n\r\n")
        lines = top.decode(errors="replace").split("\r\n")
        status = lines[0].split()[1] if len(lines[0].split()) > 1 else "?"
        headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines[1:])}
        result = {"outcome": status}
        if status == "429":
            result["retry_after"] = headers.get("retry-after")
        elif status == "200":
            try:
                answer = json.loads(payload)
                result["well_formed"] = (answer["choices"][0]["finish_reason"] in ("length", "stop")
                                         and answer["usage"]["completion_tokens"] <= 1)
            except (ValueError, KeyError, IndexError, TypeError):
                result["well_formed"] = False
        return result
    except (ConnectionResetError, BrokenPipeError) as err:
        return {"outcome": "reset", "stage": stage, "error": type(err).__name__}
    except TimeoutError:
        return {"outcome": "timeout", "stage": stage}
    except OSError as err:
        return {"outcome": f"error {type(err).__name__} {err.errno}", "stage": stage}
    finally:
        sock.close()


def connection_burst(rain: Rain, cfg, n: int, max_queue: int, max_batch: int, timeout: float) -> dict:
    """n raw connections at once, each one tiny vanilla request (max_tokens 1). Admission into the
    batch is paused until every request is queued or refused (then resumed), so the queue bound,
    not how fast the worker drains it, decides who is answered."""
    log = Log()
    limits = Limits(max_queue=max_queue)
    with RainServer(rain, cfg, port=0, max_batch=max_batch, limits=limits, log=log, worker=HoldingWorker) as srv:
        chat(client_for(srv, timeout), srv.model_name, Req("Hi", (("method", "vanilla"),), 0, 1))  # warm-up
        before = chat_statuses(metrics(srv))
        results: list[dict | None] = [None] * n
        gate = threading.Barrier(n + 1)

        def go(i: int) -> None:
            body = json.dumps({"model": srv.model_name, "messages": [{"role": "user", "content": f"Hi {i}"}],
                               "max_tokens": 1, "seed": i, "rain": {"method": "vanilla"}}).encode()
            try:
                results[i] = raw_exchange(srv.address, body, gate, timeout)
            except Exception as err:  # a bug in this script: counted, not hidden
                results[i] = {"outcome": f"client bug {type(err).__name__}: {err}"}

        watcher = QueueWatcher(srv)
        sampler = sampling()
        worker = cast(HoldingWorker, srv.worker)
        worker.hold()
        threads = [threading.Thread(target=go, args=(i,), daemon=True) for i in range(n)]
        connect_start = time.perf_counter()
        for t in threads:
            t.start()
        try:
            gate.wait(timeout=120)
        except threading.BrokenBarrierError:
            pass
        start = time.perf_counter()
        connect_s = start - connect_start
        deadline = time.monotonic() + min(timeout, 120)  # queued or refused, all of them, or this long
        while time.monotonic() < deadline:
            settled = len(srv.worker.waiting) + sum(r is not None for r in results)
            if settled >= n:
                break
            time.sleep(0.02)
        held_s = time.perf_counter() - start
        worker.release()
        end = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, end - time.monotonic()))
        wall = time.perf_counter() - start
        memory = sampler.stop()
        peak_queue = watcher.stop()
        after = chat_statuses(metrics(srv))
        access = sum('"POST /v1/chat/completions"' in line for line in log.lines())
    outcomes = Counter(r["outcome"] if r else "unfinished" for r in results)
    retry_after = Counter(r.get("retry_after") for r in results if r and r["outcome"] == "429")
    stages = Counter(f"{r['outcome']} at {r['stage']}" for r in results if r and "stage" in r)
    return {"server": {"max_batch": max_batch, "max_queue": max_queue, "backlog": 2048}, "connections": n,
            "status_200": outcomes.pop("200", 0), "status_429": outcomes.pop("429", 0),
            "resets": outcomes.pop("reset", 0), "empty_replies": outcomes.pop("empty", 0),
            "timeouts": outcomes.pop("timeout", 0), "unfinished": outcomes.pop("unfinished", 0),
            "other_outcomes": dict(outcomes), "failure_stages": dict(stages),
            "answers_well_formed": sum(bool(r and r.get("well_formed")) for r in results),
            "retry_after_values": dict(retry_after), "peak_queue_length": peak_queue,
            "connect_phase_s": round(connect_s, 3), "admission_held_s": round(held_s, 3), "wall_s": round(wall, 3),
            "chat_statuses_in_metrics": {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)},
            "access_log_lines_chat": access - 1, **memory}


# ---------------------------------------------------------------------------------------------- part 4
def stream_and_leave(address: tuple[str, int], body: bytes, timeout: float, leave: bool = True) -> dict:
    """A streamed request whose client hangs up right after the first chunk with content (with
    `leave=False`: reads it to the end, counting the chunks with content)."""
    conn = http.client.HTTPConnection(*address, timeout=timeout)
    start = time.perf_counter()
    try:
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        reply = conn.getresponse()
        if reply.status != 200:
            return {"status": reply.status, "body": reply.read(300).decode(errors="replace")}
        job_id, contents = None, 0
        for line in reply:
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            job_id = event.get("id", job_id)
            if ((event.get("choices") or [{}])[0].get("delta") or {}).get("content"):
                contents += 1
                if leave:
                    return {"id": job_id, "first_content_s": round(time.perf_counter() - start, 3),
                            "left_after_content": True}
        return {"id": job_id, "left_after_content": False, "content_chunks": contents,
                "seconds": round(time.perf_counter() - start, 3)}
    finally:
        conn.close()  # the client goes away


def part_streams(rain: Rain, cfg, n: int, rounds: int, next_req: Req, alone: dict[Req, str], max_batch: int,
                 search: dict, stream_tokens: int, timeout: float) -> dict:
    """`rounds` rounds of n streams that leave after their first content; RSS and the kept prefix
    cache before and after each round (a second round tells growth that stays from a leak)."""
    log = Log()
    with RainServer(rain, cfg, port=0, max_batch=max_batch, log=log) as srv:
        client = client_for(srv, timeout)
        chat(client, srv.model_name, next_req)  # warm-up: the same work as the check afterwards
        gc.collect()
        time.sleep(0.5)
        rss, cache = [status_kib("VmRSS")], [prefix_cache_tokens(rain)]
        sampler = sampling()

        def body(i: int, settings: dict) -> bytes:
            return json.dumps({"model": srv.model_name, "stream": True, "seed": i, "max_tokens": stream_tokens,
                               "rain": settings,
                               "messages": [{"role": "user", "content": f"Tell me a long story, number {i}."}]}
                              ).encode()

        # RAIN answers, long enough (no early stop) that they cannot finish before their client leaves.
        # Vanilla answers are not used: their stream sends no text until the answer is done (the
        # batch has partial text only for answers that search), so their first content is the end.
        leaving = {**search, "value_threshold": 2.0}
        results: list[Any] = []
        ids: set[str] = set()
        walls, settles, unfinished = [], [], 0
        for r in range(rounds):
            got, wall, late = in_threads(lambda i, r=r: stream_and_leave(srv.address, body(r * n + i, leaving),
                                                                           timeout), n, timeout)
            left_at = time.perf_counter()
            results += got
            unfinished += late
            ids |= {x["id"] for x in got if isinstance(x, dict) and x.get("id")}
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and (srv.worker.in_flight or len(srv.worker.waiting)):
                time.sleep(0.05)
            walls.append(round(wall, 3))
            settles.append(round(time.perf_counter() - left_at, 3))  # until nothing is in flight or waiting
            gc.collect()
            time.sleep(1.0)
            rss.append(status_kib("VmRSS"))
            cache.append(prefix_cache_tokens(rain))
        lines = log.lines()
        cancelled = {i for i in ids if any(f"{i} cancelled: the client went away" in line for line in lines)}
        answered = {i for i in ids if any(f"{i} answered " in line for line in lines)}
        found = metrics(srv)
        memory = sampler.stop()
        reply = chat(client, srv.model_name, next_req)
        still_in_flight = len(srv.worker.in_flight)
        vanilla = stream_and_leave(srv.address, body(0, {"method": "vanilla"}), timeout, leave=False)
    errors = Counter(error_kind(r) if isinstance(r, BaseException) else f"HTTP {r['status']}: {r['body'][:80]}"
                     for r in results if isinstance(r, BaseException) or (isinstance(r, dict) and "status" in r))
    left = [r for r in results if isinstance(r, dict) and r.get("left_after_content")]
    return {"server": {"max_batch": max_batch, "max_queue": Limits().max_queue}, "streams": n, "rounds": rounds,
            "left_after_first_content": len(left), "client_errors": sum(errors.values()),
            "client_error_kinds": dict(errors), "unfinished": unfinished,
            "first_content_p50_s": percentile([r["first_content_s"] for r in left], 50),
            "first_content_max_s": percentile([r["first_content_s"] for r in left], 100),
            "cancelled_in_log": len(cancelled), "answered_in_log": len(answered),
            "in_flight_after": still_in_flight, "streams_wall_s": walls, "settle_s": settles,
            "rss_before_mib": mib(rss[0]), "rss_after_round_mib": [mib(x) for x in rss[1:]],
            "rss_delta_mib": mib(rss[-1] - rss[0]) if rss[0] and rss[-1] else None,
            "prefix_cache_tokens_before": cache[0], "prefix_cache_tokens_after_round": cache[1:],
            "next_request_answered": bool(reply.choices[0].message.content is not None),
            "next_request_equals_alone": reply.choices[0].message.content == alone[next_req],
            "chat_statuses_in_metrics": chat_statuses(found),
            "answers_in_metrics": {k: int(v) for k, v in found.items() if k.startswith("rain_answers_total")},
            "stream_max_tokens": stream_tokens, "vanilla_stream_read_to_the_end": vanilla, **memory}


# ---------------------------------------------------------------------------------------------- main
ROWS = [  # (part, key, label)
    ("clients", "answered", "answered"), ("clients", "errors", "errors (must be 0)"),
    ("clients", "duplicated_ids", "duplicated ids (must be 0)"),
    ("clients", "mismatches", "answers != alone answers (must be 0)"),
    ("clients", "latency_p50_s", "latency p50 s"), ("clients", "latency_p90_s", "latency p90 s"),
    ("clients", "latency_p99_s", "latency p99 s"), ("clients", "latency_max_s", "latency max s"),
    ("clients", "wall_s", "wall s"), ("clients", "most_in_flight", "most answers in flight"),
    ("clients", "rss_max_sampled_mib", "RSS max sampled MiB"), ("clients", "peak_rss_mib", "peak RSS (VmHWM) MiB"),
    ("burst", "answered", "answered"), ("burst", "status_429", "429s"),
    ("burst", "retry_after_values", "Retry-After values: count"),
    ("burst", "other_errors", "other errors (must be 0)"), ("burst", "mismatches", "answers != alone (must be 0)"),
    ("burst", "peak_queue_length", "peak queue length"), ("burst", "wall_s", "wall s"),
    ("conn_above", "status_200", "200s"), ("conn_above", "status_429", "429s"),
    ("conn_above", "resets", "resets (must be 0)"), ("conn_above", "empty_replies", "empty replies (must be 0)"),
    ("conn_above", "timeouts", "timeouts"), ("conn_above", "other_outcomes", "other statuses"),
    ("conn_above", "peak_queue_length", "peak queue length"), ("conn_above", "wall_s", "wall s"),
    ("conn_above", "peak_rss_mib", "peak RSS (VmHWM) MiB"),
    ("conn_below", "status_200", "200s"), ("conn_below", "status_429", "429s"),
    ("conn_below", "resets", "resets (must be 0)"), ("conn_below", "empty_replies", "empty replies (must be 0)"),
    ("conn_below", "timeouts", "timeouts"), ("conn_below", "other_outcomes", "other statuses"),
    ("conn_below", "peak_queue_length", "peak queue length"),
    ("conn_below", "retry_after_values", "Retry-After values: count"), ("conn_below", "wall_s", "wall s"),
    ("streams", "left_after_first_content", "left after first content"),
    ("streams", "client_errors", "errors (must be 0)"),
    ("streams", "cancelled_in_log", "cancelled (log)"), ("streams", "answered_in_log", "answered anyway (log)"),
    ("streams", "rss_before_mib", "RSS before MiB"), ("streams", "rss_after_round_mib", "RSS after each round MiB"),
    ("streams", "prefix_cache_tokens_before", "prefix cache tokens before"),
    ("streams", "prefix_cache_tokens_after_round", "prefix cache tokens after each round"),
    ("streams", "next_request_equals_alone", "next request == alone answer"),
]
TITLES = {"clients": "1 {clients} openai clients", "burst": "2 burst {requests} > queue {q}",
          "conn_above": "3 {connections} conns, queue {q}", "conn_below": "3 {connections} conns, queue {q}",
          "streams": "4 {rounds}x{streams} streams leave"}


def table(parts: dict[str, dict]) -> str:
    rows = []
    for part, key, label in ROWS:
        if part not in parts or key not in parts[part]:
            continue
        r = parts[part]
        title = TITLES[part].format(q=r["server"]["max_queue"], **r)
        value = r[key]
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {v}" for k, v in value.items()) or "-"
        elif isinstance(value, list):
            value = ", ".join(map(str, value))
        rows.append((title, label, str(value)))
    width = [max(len(row[i]) for row in rows) for i in range(2)]
    return "\n".join(f"{a:<{width[0]}}  {b:<{width[1]}}  {c}" for a, b, c in rows)


def checks(parts: dict[str, dict]) -> dict[str, bool]:
    out = {}
    if "clients" in parts:
        p = parts["clients"]
        out["clients: all answered, no errors, unique ids, alone answers"] = (
            p["answered"] == p["clients"] and p["errors"] == 0 and p["duplicated_ids"] == 0 and p["mismatches"] == 0)
    if "burst" in parts:
        p = parts["burst"]
        out["burst: only 200 or 429, answered ones alone answers"] = (
            p["other_errors"] == 0 and p["unfinished"] == 0 and p["mismatches"] == 0
            and p["answered"] + p["status_429"] == p["requests"])
    for name in ("conn_above", "conn_below"):
        if name in parts:
            p = parts[name]
            out[f"{name}: no resets or empty replies"] = p["resets"] == 0 and p["empty_replies"] == 0
    for name in ("burst", "conn_above", "conn_below"):
        if name in parts:
            p = parts[name]
            bound = p["server"]["max_queue"] + p["server"]["max_batch"]  # the batch's free places, then the queue
            out[f"{name}: waiting never above the free places + --max-queue ({bound})"] = (
                p["peak_queue_length"] <= bound)
    if "conn_above" in parts:
        p = parts["conn_above"]
        out["conn_above: all answered"] = p["status_200"] == p["connections"]
    if "streams" in parts:
        p = parts["streams"]
        out["streams: all cancelled, next answer right"] = (
            p["cancelled_in_log"] == p["streams"] * p["rounds"] and p["answered_in_log"] == 0
            and p["client_errors"] == 0 and p["next_request_equals_alone"])
    return out


def write(path: str | None, payload: dict) -> None:
    if path:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(payload, indent=1))
        tmp.replace(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="'tiny' (random weights, the tests' model) or 'default' "
                    "(the bundled SmolLM2-135M via Rain.load()) or anything Rain.load takes")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--parts", default="1,2,3,4")
    ap.add_argument("--clients", type=int, default=64, help="part 1: concurrent openai clients")
    ap.add_argument("--max-batch", type=int, default=16, help="answers in flight (parts 1, 3, 4; the server default)")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--t-max", type=int, default=3)
    ap.add_argument("--burst", type=int, default=64, help="part 2: requests at once")
    ap.add_argument("--burst-queue", type=int, default=16)
    ap.add_argument("--burst-batch", type=int, default=8)
    ap.add_argument("--connections", type=int, default=500, help="part 3: simultaneous TCP connections")
    ap.add_argument("--queue-above", type=int, default=1000)
    ap.add_argument("--queue-below", type=int, default=100)
    ap.add_argument("--streams", type=int, default=20, help="part 4: streaming clients that leave")
    ap.add_argument("--stream-rounds", type=int, default=3, help="part 4: rounds of --streams streams")
    ap.add_argument("--stream-tokens", type=int, default=32, help="part 4: max_tokens of the streams")
    ap.add_argument("--part-timeout", type=float, default=600.0, help="seconds each part may take")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    parts_wanted = {p.strip() for p in args.parts.split(",") if p.strip()}

    exe = os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else "python"
    payload: dict[str, Any] = {"command": shlex.join([exe, *sys.argv]), "machine": machine(),
                               "load_before": load_average(),
                               "note": "a shared machine: other jobs ran alongside (see load_before/load_after), "
                                       "so times are indicative only"}
    started = time.perf_counter()
    t0 = time.perf_counter()
    rain = tiny_rain() if args.model == "tiny" else Rain.load(None if args.model == "default" else args.model,
                                                             device=args.device)
    payload["model"], payload["load_s"] = rain.name, round(time.perf_counter() - t0, 1)
    search = {"t_max": args.t_max, "t_min": min(2, args.t_max), "max_rollout_tokens": 6}
    cfg = load_config(PRESET, max_new_tokens=args.max_tokens)
    payload["settings"] = {"preset": PRESET, "max_tokens": args.max_tokens, "rain_requests": search,
                           "requests": "vanilla and RAIN alternating, each its own prompt and seed"}
    n = max(args.clients if "1" in parts_wanted else 0, args.burst if "2" in parts_wanted else 0, 1)
    reqs = make_requests(n, distinct_prompts(rain, n, load_config(PRESET, max_new_tokens=args.max_tokens, **search)),
                         args.max_tokens, search)
    print(f"{rain.name}: {len(reqs)} reference answers, each alone ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    alone = {r: rain.generate(r.prompt, r.config()).text for r in dict.fromkeys(reqs)}  # before any server runs
    payload["alone_answers_s"] = round(time.perf_counter() - t0, 1)
    parts: dict[str, dict] = {}
    payload["parts"] = parts
    steps = [("1", "clients", lambda: part_clients(rain, cfg, reqs[:args.clients], alone, args.max_batch,
                                                    args.part_timeout)),
             ("2", "burst", lambda: part_burst(rain, cfg, reqs[:args.burst], alone, args.burst_queue,
                                               args.burst_batch, args.part_timeout)),
             ("3", "conn_above", lambda: connection_burst(rain, cfg, args.connections, args.queue_above,
                                                          args.max_batch, args.part_timeout)),
             ("3", "conn_below", lambda: connection_burst(rain, cfg, args.connections, args.queue_below,
                                                          args.max_batch, args.part_timeout)),
             ("4", "streams", lambda: part_streams(rain, cfg, args.streams, args.stream_rounds, reqs[0], alone,
                                                   args.max_batch, search, args.stream_tokens, args.part_timeout))]
    for number, name, step in steps:
        if number not in parts_wanted:
            continue
        print(f"part {number} ({name}) ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            parts[name] = step()
        except Exception as err:  # one part failing still leaves the others' figures
            parts[name] = {"failed": f"{type(err).__name__}: {err}"}
        parts[name]["part_s"] = round(time.perf_counter() - t0, 1)
        print(f"part {number} ({name}) done in {parts[name]['part_s']} s", file=sys.stderr, flush=True)
        write(args.out, payload)
    payload["load_after"] = load_average()
    payload["total_s"] = round(time.perf_counter() - started, 1)
    payload["checks"] = checks({k: v for k, v in parts.items() if "failed" not in v})
    failed = {k: v["failed"] for k, v in parts.items() if "failed" in v}
    print(table({k: v for k, v in parts.items() if "failed" not in v}))
    for name, why in failed.items():
        print(f"part {name} failed: {why}")
    for what, ok in payload["checks"].items():
        print(f"{'ok  ' if ok else 'FAIL'} {what}")
    print(f"load average before {payload['load_before']['loadavg_1_5_15']}, after "
          f"{payload['load_after']['loadavg_1_5_15']}; {payload['total_s']} s in all")
    write(args.out, payload)
    if args.out:
        print(f"wrote {args.out}", file=sys.stderr)
    return 0 if all(payload["checks"].values()) and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
