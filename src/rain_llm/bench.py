"""`rain bench`: vanilla vs RAIN side by side on the same prompts, in one run, on one machine.

Prints one table and writes JSON (`--out`): per method, seconds per answer token and the ratio to
vanilla; forward passes and tokens processed per answer token; the ratio of tokens processed to the
least work the search needed; per phase: forward passes, tokens, seconds. `--random llama3-8b`
builds a random-weight model of Llama-3-8B's shape (bf16 on a GPU) with the default model's tokenizer,
for speed work where no weights can be downloaded.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .api import Rain
from .config import RainConfig
from .data import default_data_dir

FALLBACK_PROMPTS = ["How do I pick a lock?", "What is the best way to learn a new language?",
                    "Write a short poem about the sea.", "How can I get back at my noisy neighbour?"]

RANDOM_SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, rope_theta=500000.0),
}


def bench_prompts(n: int) -> list[str]:
    """The first n HH first turns from ../shared/data when present, else a few fixed prompts."""
    data = default_data_dir()
    if data is not None and (data / "hh" / "red_team_first_turns.jsonl").is_file():
        from .data import load_examples

        return [ex.prompt for ex in load_examples("hh")[:n]]
    return (FALLBACK_PROMPTS * (n // len(FALLBACK_PROMPTS) + 1))[:n]


def random_rain(shape: str, device: str) -> Rain:
    """A random-weight Llama of the given shape with the default model's tokenizer (and a random MiniLM)."""
    from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    from .embedder import MiniLMEmbedder, minilm_path
    from .models import converted_folder, default_gguf

    tok = AutoTokenizer.from_pretrained(converted_folder(default_gguf()))
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=8192, **RANDOM_SHAPES[shape])
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg).eval()
            bert = BertModel(BertConfig.from_pretrained(minilm_path())).eval()
    finally:
        torch.set_default_dtype(previous)
    rain = Rain(model, tok, embedder=MiniLMEmbedder(bert, AutoTokenizer.from_pretrained(minilm_path())),
                name=f"random-{shape}")
    rain.engine.stop_ids = frozenset()  # random weights: decode the whole budget every time
    return rain


def run_bench(rain: Rain, cfg: RainConfig, prompts: list[str], methods: dict[str, dict[str, Any]],
              log: Any = sys.stderr) -> dict[str, Any]:
    """Each method on each prompt (after one warm-up answer per method); a summary per method."""
    for kw in methods.values():
        rain.generate(prompts[0], cfg, **{**kw, "max_new_tokens": min(4, cfg.max_new_tokens)})
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    for i, prompt in enumerate(prompts):
        for name, kw in methods.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = rain.generate(prompt, cfg, **kw)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            compute = out.stats["compute"]
            embed = compute.get("embed", {}).get("tokens", 0)
            runs[name].append({"prompt": prompt, "answer_tokens": len(out.token_ids), "seconds": seconds,
                               "forward_passes": compute["total"]["forward_passes"],
                               "tokens": compute["total"]["tokens"], "lm_tokens": compute["total"]["tokens"] - embed,
                               "least_work": compute.get("least_work", {}).get("tokens", 0),
                               "iterations_per_step": out.stats.get("iterations_per_step", []),
                               "compute": compute, "text": out.text})
            print(f"[{i + 1}/{len(prompts)}] {name:14s} {len(out.token_ids):4d} tokens {seconds:8.2f}s "
                  f"{compute['total']['tokens']:8d} tokens processed", file=log, flush=True)
    return {"runs": runs, "summary": summarise(runs)}


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, recs in runs.items():
        answer = sum(r["answer_tokens"] for r in recs) or 1
        phases: dict[str, dict[str, float]] = {}
        for r in recs:
            for phase, c in r["compute"].items():
                if phase in ("total", "least_work"):
                    continue
                p = phases.setdefault(phase, {"forward_passes": 0, "tokens": 0, "seconds": 0.0})
                for k in p:
                    p[k] += c.get(k, 0)
        its = [x for r in recs for x in r["iterations_per_step"]]
        least = sum(r["least_work"] for r in recs)
        out[name] = {
            "answer_tokens": answer,
            "seconds_per_token": sum(r["seconds"] for r in recs) / answer,
            "forward_passes_per_token": sum(r["forward_passes"] for r in recs) / answer,
            "tokens_per_token": sum(r["tokens"] for r in recs) / answer,
            "lm_tokens_over_least_work": sum(r["lm_tokens"] for r in recs) / least if least else None,
            "iterations_per_step": statistics.mean(its) if its else None,
            "phases": phases,
        }
    base = out.get("vanilla")
    for s in out.values():
        s["x_vanilla"] = s["seconds_per_token"] / base["seconds_per_token"] if base else None
    return out


def table(summary: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'method':16s} {'s/token':>9s} {'x vanilla':>9s} {'fwd/token':>10s} {'tok/token':>10s} "
             f"{'iter/step':>9s} {'LM tok/least':>12s}"]
    for name, s in summary.items():
        least = s["lm_tokens_over_least_work"]
        lines.append(f"{name:16s} {s['seconds_per_token']:9.4f} {s['x_vanilla'] or 0:9.2f} "
                     f"{s['forward_passes_per_token']:10.1f} {s['tokens_per_token']:10.1f} "
                     f"{s['iterations_per_step'] or 0:9.1f} {least if least is not None else float('nan'):12.2f}")
    lines.append("per phase (forward passes / tokens / seconds):")
    for name, s in summary.items():
        parts = [f"{p} {c['forward_passes']}/{c['tokens']}/{c['seconds']:.2f}" for p, c in sorted(s["phases"].items())]
        lines.append(f"  {name:14s} " + ", ".join(parts))
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)
