"""Vanilla vs RAIN vs RAIN with KV reuse off, side by side on the same prompts.

    .venv/bin/python benchmarks/bench_generate.py --n 3 --max-new-tokens 16 --out results/bench.json

Prompts: the first N of ../shared/data/hh/red_team_first_turns.jsonl (HH first human turns),
sent to the model as a user message. Prints a table and writes JSON: wall time per generated
token, forward passes and tokens processed per committed token, iterations per step, per
phase counts. Ratios in the table are to vanilla, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "hh" / "red_team_first_turns.jsonl"


def hh_prompts(path: Path, n: int) -> list[tuple[str, str]]:
    """(id, human text) for the first n rows; the RAIN transcript form is unwrapped."""
    out = []
    with path.open() as f:
        for line in f:
            row = json.loads(line)
            text = row["prompt"].strip()
            text = text.removeprefix("Human:").removesuffix("Assistant:").strip()
            out.append((row["id"], text))
            if len(out) == n:
                break
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=3, help="number of prompts")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    ap.add_argument("--preset", default="paper-hh")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--t-max", type=int, default=None, help="override T_max (fixed budget per step)")
    ap.add_argument("--methods", default="vanilla,rain,rain-no-reuse")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "bench_generate.json")
    args = ap.parse_args()

    from rain_llm import Rain, load_config

    cfg = load_config(args.preset, max_new_tokens=args.max_new_tokens, t_max=args.t_max, seed=args.seed)
    rain = Rain.load(args.model)
    prompts = hh_prompts(args.data, args.n)
    methods = args.methods.split(",")
    settings = {"vanilla": {"method": "vanilla"}, "rain": {}, "rain-no-reuse": {"reuse_cache": False}}
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for i, (pid, prompt) in enumerate(prompts):
        for m in methods:
            start = time.perf_counter()
            out = rain.generate(prompt, cfg, **settings[m])
            seconds = time.perf_counter() - start
            total = out.stats["compute"]["total"]
            embed = out.stats["compute"].get("embed", {}).get("tokens", 0)
            rec = {"id": pid, "answer_tokens": len(out.token_ids), "seconds": seconds,
                   "forward_passes": total["forward_passes"], "tokens_processed": total["tokens"],
                   "lm_tokens_processed": total["tokens"] - embed,
                   "least_work": out.stats["compute"].get("least_work", {}).get("tokens", 0),
                   "iterations_per_step": out.stats.get("iterations_per_step", []),
                   "compute": out.stats["compute"], "text": out.text}
            runs[m].append(rec)
            print(f"[{i + 1}/{len(prompts)}] {m:14s} {len(out.token_ids):3d} tokens {seconds:7.1f}s "
                  f"{total['tokens']:7d} tokens processed", file=sys.stderr, flush=True)

    summary = {}
    for m, recs in runs.items():
        answer = sum(r["answer_tokens"] for r in recs) or 1
        its = [x for r in recs for x in r["iterations_per_step"]]
        summary[m] = {
            "seconds_per_token": sum(r["seconds"] for r in recs) / answer,
            "forward_passes_per_token": sum(r["forward_passes"] for r in recs) / answer,
            "tokens_processed_per_token": sum(r["tokens_processed"] for r in recs) / answer,
            "iterations_per_step": statistics.mean(its) if its else 0.0,
            "lm_tokens_over_least_work": (sum(r["lm_tokens_processed"] for r in recs)
                                          / max(1, sum(r["least_work"] for r in recs))),
            "answer_tokens": answer,
        }
    base = summary.get("vanilla")
    print(f"{'method':14s} {'s/token':>9s} {'x vanilla':>9s} {'fwd/token':>10s} {'tok proc/token':>15s} "
          f"{'iter/step':>9s} {'LM tok/least':>12s}")
    for m, s in summary.items():
        ratio = s["seconds_per_token"] / base["seconds_per_token"] if base else float("nan")
        print(f"{m:14s} {s['seconds_per_token']:9.3f} {ratio:9.1f} {s['forward_passes_per_token']:10.1f} "
              f"{s['tokens_processed_per_token']:15.1f} {s['iterations_per_step']:9.1f} "
              f"{s['lm_tokens_over_least_work']:12.2f}")
    if "rain" in summary and "rain-no-reuse" in summary:
        r, o = summary["rain"], summary["rain-no-reuse"]
        print(f"KV reuse saves {o['tokens_processed_per_token'] / r['tokens_processed_per_token']:.1f}x tokens "
              f"processed and {o['seconds_per_token'] / r['seconds_per_token']:.1f}x wall time")
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "torch": torch.__version__, "threads": torch.get_num_threads(),
               "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": " ".join(sys.argv), "machine": machine, "config": cfg.to_dict(),
                                    "summary": summary, "runs": runs}, indent=1))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
