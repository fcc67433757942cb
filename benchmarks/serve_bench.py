"""`rain serve` under load: N requests sent at once, sent one after another, and arriving at a
fixed interval, through the official `openai` client against the real HTTP server. Prints a table
and writes JSON (throughput, latency, and whether the answers equal the one-at-a-time answers).

    python benchmarks/serve_bench.py --prompts 8 --max-tokens 16 --t-max 12 --out results/serve_cpu.json
    python benchmarks/serve_bench.py --random llama3-8b --tokenizer A/lm --embedder A/minilm   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import openai

from rain_llm import Rain, load_config
from rain_llm.engine.hf.models import pick_device
from rain_llm.shells.bench import bench_prompts, machine, random_rain
from rain_llm.shells.server import RainServer


def ask(client: openai.OpenAI, name: str, prompt: str, max_tokens: int, search: dict) -> dict:
    start = time.perf_counter()
    reply = client.chat.completions.create(model=name, messages=[{"role": "user", "content": prompt}],
                                           max_tokens=max_tokens, extra_body={"rain": search})
    return {"text": reply.choices[0].message.content, "tokens": reply.usage.completion_tokens,
            "latency": time.perf_counter() - start, "batch": reply.model_extra["rain"]["stats"].get("batch", 1),
            "start": start}


def run(pattern: str, client, name, prompts, max_tokens, search, interval: float) -> dict:
    """pattern: 'sequential' (each waits for the previous), 'together' (all at once), 'staggered'
    (one every `interval` seconds, not waiting)."""
    results: list[dict | None] = [None] * len(prompts)
    start = time.perf_counter()
    if pattern == "sequential":
        for i, p in enumerate(prompts):
            results[i] = ask(client, name, p, max_tokens, search)
    else:
        def go(i: int) -> None:
            results[i] = ask(client, name, prompts[i], max_tokens, search)

        threads = []
        for i in range(len(prompts)):
            if pattern == "staggered" and i:
                time.sleep(interval)
            threads.append(threading.Thread(target=go, args=(i,)))
            threads[-1].start()
        for t in threads:
            t.join()
    wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    return {"wall_s": round(wall, 3), "answer_tokens": tokens, "tokens_per_s": round(tokens / wall, 3),
            "latency_mean_s": round(statistics.mean(r["latency"] for r in results), 3),
            "latency_max_s": round(max(r["latency"] for r in results), 3),
            "most_in_flight": max(r["batch"] for r in results), "answers": [r["text"] for r in results]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--random", default=None, choices=["tiny", "llama3-8b"])
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--embedder", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--t-max", type=int, default=12)
    ap.add_argument("--preset", default="paper-hh")
    ap.add_argument("--interval", type=float, default=None,
                    help="staggered arrivals: seconds between requests (default: sequential time / (2 N))")
    ap.add_argument("--patterns", default="sequential,together,staggered")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    rain = random_rain(args.random, pick_device(args.device), args.tokenizer, args.embedder) if args.random \
        else Rain.load(args.model, device=args.device)
    # a fixed budget (no early stop) so every pattern does the same search work
    cfg = load_config(args.preset, max_new_tokens=args.max_tokens, t_max=args.t_max, value_threshold=2.0,
                      fresh_iterations=0)
    prompts = bench_prompts(args.prompts)
    log = open(os.devnull, "w")
    server = RainServer(rain, cfg, port=0, max_batch=max(args.prompts, 1), batch_window=0.2, log=log).start()
    client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=3600)
    search: dict = {}
    ask(client, server.model_name, prompts[0], 2, search)  # warm-up: embedder and first-call costs
    out: dict = {}
    for pattern in [p for p in args.patterns.split(",") if p]:
        interval = args.interval
        if pattern == "staggered" and interval is None:
            interval = out["sequential"]["wall_s"] / (2 * len(prompts)) if "sequential" in out else 1.0
        out[pattern] = run(pattern, client, server.model_name, prompts, args.max_tokens, search, interval or 0)
        if pattern == "staggered":
            out[pattern]["interval_s"] = round(interval, 3)
        print(f"{pattern:>10}: {out[pattern]['wall_s']:8.1f} s wall, {out[pattern]['tokens_per_s']:6.2f} tokens/s, "
              f"latency mean {out[pattern]['latency_mean_s']:.1f} s max {out[pattern]['latency_max_s']:.1f} s, "
              f"up to {out[pattern]['most_in_flight']} in flight", flush=True)
    server.close()
    if "sequential" in out:
        base = out["sequential"]
        for r in out.values():
            r["throughput_x_sequential"] = round(r["tokens_per_s"] / base["tokens_per_s"], 2)
            r["same_answers_as_sequential"] = r["answers"] == base["answers"]
        print("throughput vs one at a time: " + ", ".join(f"{n} {r['throughput_x_sequential']}x"
                                                          for n, r in out.items()))
        print("same answers as one at a time: " + ", ".join(f"{n} {r['same_answers_as_sequential']}"
                                                            for n, r in out.items()))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "machine": machine(),
                                              "model": rain.name, "config": cfg.to_dict(), "results": out}, indent=1))
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
