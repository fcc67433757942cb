"""A/B of two versions of the core, side by side: seconds and LM forwards per answer token.

Runs through the public API that every version since the request path has (`Rain.load`,
`generate_many`, `continuous_batch().add_many/step`), and counts forwards with the engine's own
counter (`rain.backend.engine.forwards`: every forward the language model ran, whatever the receipts
say), so the same script measures the code before and after a change:

    python benchmarks/ab_core.py --out new.json
    PYTHONPATH=/path/to/old/src python benchmarks/ab_core.py --out old.json

Methods: vanilla and RAIN one prompt at a time, and both with all prompts in one continuous batch.
Prints a line per method and writes JSON (answers included, to check they are equal).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def prompts(n: int) -> list[str]:
    from rain_llm.evaluation.data import load_examples

    return [ex.prompt for ex in load_examples("hh")[:n]]


def run(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    import rain_llm
    from rain_llm import Rain, load_config

    rain = Rain.load()
    cfg = load_config("paper-hh", max_new_tokens=args.max_new_tokens, t_max=args.t_max, value_threshold=2.0,
                      fresh_iterations=0)
    texts = prompts(args.prompts)
    engine = rain.backend.engine
    rain.generate_many(texts[:2], cfg, max_new_tokens=2)  # warm-up: the embedder loads, the template is cached
    out = {"version": rain_llm.__file__, "config": cfg.to_dict(), "methods": {}}
    for name, method, batch in (("vanilla", "vanilla", False), ("rain", "rain", False),
                                (f"vanilla-b{len(texts)}", "vanilla", True), (f"rain-b{len(texts)}", "rain", True)):
        c = cfg.replace(method=method)
        before, start, cpu = engine.forwards, time.perf_counter(), time.process_time()
        if batch:
            cb = rain.continuous_batch()
            cb.add_many([(i, p, c) for i, p in enumerate(texts)])
            done = {}
            while cb:
                done.update(cb.step())
            answers = [done[i] for i in range(len(texts))]
        else:
            answers = [rain.generate(p, c) for p in texts]
        seconds, forwards = time.perf_counter() - start, engine.forwards - before
        cpu = time.process_time() - cpu  # this process's CPU time: less sensitive than wall time to other jobs
        tokens = sum(len(a.token_ids) for a in answers)
        out["methods"][name] = {"seconds": seconds, "cpu_seconds": cpu, "answer_tokens": tokens,
                                "lm_forwards": forwards, "s_per_token": seconds / tokens,
                                "cpu_s_per_token": cpu / tokens, "lm_forwards_per_token": forwards / tokens,
                                "answers": [a.token_ids for a in answers]}
        print(f"{name:14s} {seconds:8.1f} s  {tokens:4d} tokens  {seconds / tokens:.3f} s/token  "
              f"{cpu / tokens:.3f} CPU s/token  {forwards / tokens:.2f} LM forwards/token", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--t-max", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.write_text(json.dumps(run(args), indent=1))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
