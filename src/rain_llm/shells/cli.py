"""`rain`: the command line. A thin shell: parse, load, call the API, print.

    rain generate "How do I pick a lock?"
    rain generate --method vanilla "How do I pick a lock?"
    rain generate --model ./folder --preset paper-advbench --seed 3 --json --trace run.json "..."

Every RainConfig key is a flag (`t_max` -> `--t-max`); `--config FILE.toml` sets them from a
file, `--preset` picks a named set; flags win over the file, the file over the preset.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

from rain_llm.config import PRESETS, RainConfig, load_config
from rain_llm.errors import RainError
from rain_llm.values.templates import load_template

HELP = {
    "method": "rain (search) or vanilla (plain greedy decoding)",
    "max_new_tokens": "answer length budget in tokens",
    "token_set_lengths": "token set length per depth, e.g. 1,2,4,10",
    "template": "self-evaluation template: harmlessness, truthfulness, sentiment, or a .toml file",
    "value_mode": "vote (official binary vote of both option orders) or mean (continuous)",
    "fewshot": "few-shot preamble for transcript prompts: 'default' or a file",
    "reuse_cache": "reuse KV caches across calls (--no-reuse-cache recomputes, to measure the saving)",
}


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("search settings (defaults: the paper's; see rain_llm/config.py)")
    for f in fields(RainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(RainConfig, f.name, None)
        help_text = HELP.get(f.name, f"default {default!r}")
        if isinstance(default, bool):
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif isinstance(default, int):
            group.add_argument(flag, dest=f.name, type=int, default=None, metavar="N", help=help_text)
        elif isinstance(default, float):
            group.add_argument(flag, dest=f.name, type=float, default=None, metavar="X", help=help_text)
        else:
            group.add_argument(flag, dest=f.name, default=None, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rain", description="RAIN: rewindable auto-regressive inference")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="answer one prompt with RAIN or vanilla decoding")
    gen.add_argument("prompt", help="the user's message")
    gen.add_argument("--model", default=None, help="Hugging Face id, local folder or .gguf file (default: the "
                     "bundled SmolLM2-135M-Instruct)")
    gen.add_argument("--preset", choices=None, default=None, help=f"named settings: {', '.join(PRESETS)}")
    gen.add_argument("--config", default=None, help="TOML file of settings")
    gen.add_argument("--json", action="store_true", help="print JSON (text, token_ids, stats) instead of text")
    gen.add_argument("--trace", default=None, metavar="FILE", help="write the whole search per committed step")
    gen.add_argument("--trace-html", default=None, metavar="FILE", help="write the search as an offline HTML page "
                     "(see rain view)")
    gen.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    gen.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    gen.add_argument("--device-map", default=None, help="'auto' to spread a large model over GPUs")
    gen.add_argument("--quiet", action="store_true", help="no progress line or summary")
    _add_config_flags(gen)

    ev = sub.add_parser("eval", help="run one of the paper's experiments: answer, judge, append results")
    ev.add_argument("task", help="hh, advbench, truthfulqa, xstest, selfeval or sentiment")
    ev.add_argument("--model", default=None, help="the evaluated model (default: the bundled SmolLM2-135M-Instruct)")
    ev.add_argument("--methods", default="vanilla,rain", help="comma-separated: vanilla, rain, best-of-n")
    ev.add_argument("--out", default=None, help="results file, JSON lines (default results/TASK-MODEL.jsonl)")
    ev.add_argument("--data", default=None, help="data file or Hugging Face dataset name (default: ../shared/data)")
    ev.add_argument("--variant", default=None, help="advbench suffixes: none, smoothllm, jbb-vicuna, jbb-llama2")
    ev.add_argument("--limit", type=int, default=None, help="first N prompts (of this shard)")
    ev.add_argument("--shard", default=None, help="i/n: the i-th of n disjoint shards (0-based)")
    ev.add_argument("--batch", type=int, default=1, help="answers in flight at once, in one continuous batch: "
                    "RAIN searches run in lockstep with their model calls batched, and a finished answer's "
                    "place goes to the next prompt")
    ev.add_argument("--best-of-n", default="4", help="samples for best-of-n, or 'match' to match RAIN's compute")
    ev.add_argument("--judge-model", default=None, help="local model as LM judge ('policy': the model itself)")
    ev.add_argument("--judge-url", default=None, help="OpenAI-compatible endpoint as LM judge (base URL)")
    ev.add_argument("--judge-name", default=None, help="model name at --judge-url")
    ev.add_argument("--judge-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    ev.add_argument("--preset", default=None)
    ev.add_argument("--config", default=None)
    ev.add_argument("--device", default="auto")
    ev.add_argument("--dtype", default="auto")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_config_flags(ev)

    bench = sub.add_parser("bench", help="vanilla vs RAIN side by side: time, forward passes, tokens, least work")
    bench.add_argument("--model", default=None, help="model to load (default: the bundled SmolLM2-135M-Instruct)")
    bench.add_argument("--random", default=None, choices=["tiny", "llama3-8b"],
                       help="instead of --model: random weights of this shape (bf16 on a GPU)")
    bench.add_argument("--tokenizer", default=None, help="with --random: tokenizer folder (default: the "
                       "bundled model's; elsewhere e.g. ASSETS/lm from benchmarks/gpu_check.py --make-assets)")
    bench.add_argument("--embedder", default=None, help="with --random: MiniLM config + tokenizer folder "
                       "(e.g. ASSETS/minilm)")
    bench.add_argument("--prompts", type=int, default=3, help="number of HH first-turn prompts")
    bench.add_argument("--methods", default="vanilla,rain,rain-no-reuse",
                       help="comma-separated: vanilla, rain, rain-no-reuse, rain-pN (N parallel leaves); "
                       "-bN after any (e.g. rain-b16): N prompts in flight in a continuous batch; "
                       "rain-rounds-bN: the same with whole search iterations in lockstep")
    bench.add_argument("--fixed-budget", action="store_true",
                       help="no early stop (value_threshold 2, fresh_iterations 0): every step runs t_max iterations")
    bench.add_argument("--out", default=None, help="write JSON here")
    bench.add_argument("--preset", default="paper-hh")
    bench.add_argument("--config", default=None)
    bench.add_argument("--device", default="auto")
    bench.add_argument("--dtype", default="auto")
    _add_config_flags(bench)

    srv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/chat/completions) answering with RAIN")
    srv.add_argument("--model", default=None, help="Hugging Face id, local folder or .gguf file (default: the "
                     "bundled SmolLM2-135M-Instruct)")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    srv.add_argument("--served-name", default=None, help="the model name clients send (default: --model, or "
                     "'default')")
    srv.add_argument("--max-batch", type=int, default=16,
                     help="most requests answered at once, in one continuous batch (default 16)")
    srv.add_argument("--batch-window", type=float, default=0.05, metavar="SECONDS",
                     help="how long the first queued request waits for others to join its batch")
    srv.add_argument("--preset", default=None, help=f"named settings: {', '.join(PRESETS)}")
    srv.add_argument("--config", default=None, help="TOML file of settings (requests may change search settings)")
    srv.add_argument("--device", default="auto")
    srv.add_argument("--dtype", default="auto")
    srv.add_argument("--device-map", default=None)
    _add_config_flags(srv)

    mod = sub.add_parser("models", help="models split over PyPI packages: list them, fetch one by short name")
    mod_sub = mod.add_subparsers(dest="models_command", required=True)
    mod_sub.add_parser("list", help="known split models: size, fetched or not, folder")
    fetch = mod_sub.add_parser("fetch", help="download, join and convert one (then: --model NAME)")
    fetch.add_argument("name", help="short name, as `rain models list` shows")
    fetch.add_argument("--find-links", default=None, metavar="DIR",
                       help="take the wheels from this folder only (pip --no-index --find-links DIR)")

    rep = sub.add_parser("report", help="tables, CSV and plots from rain eval results")
    rep.add_argument("results", nargs="+", help="results files (JSON lines)")
    rep.add_argument("--out", default="report", help="output folder (default ./report)")

    view = sub.add_parser("view", help="a --trace file as one offline HTML page: the answer path and the "
                          "search tree of every step")
    view.add_argument("trace", help="trace file written by rain generate --trace")
    view.add_argument("-o", "--out", default=None, help="HTML file to write (default: the trace path with .html)")
    return parser


class Progress:
    """One live status line on stderr while the search runs."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.start = time.perf_counter()
        self.last_step = 0

    def __call__(self, info: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = (f"step {info['step']}  iteration {info['iteration']}/{info['budget']}  nodes {info['nodes']}  "
                f"answer {info['answer_tokens']} tokens  {time.perf_counter() - self.start:.1f}s")
        if self.tty:
            sys.stderr.write("\r" + line.ljust(100))
            sys.stderr.flush()
        elif info["step"] != self.last_step:
            sys.stderr.write(line + "\n")
        self.last_step = info["step"]

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")


def summary(stats: dict[str, Any], method: str) -> str:
    compute = stats["compute"]
    phases = ", ".join(f"{name} {c['forward_passes']}/{c['tokens']}" for name, c in compute.items()
                       if name not in ("total", "least_work"))
    total = compute["total"]
    least = compute.get("least_work", {}).get("tokens")
    if method == "vanilla":
        head = f"vanilla: {stats['answer_tokens']} tokens"
    else:
        head = (f"rain: {stats['committed_steps']} steps, {stats['iterations']} iterations "
                f"(per step {stats['iterations_per_step']}), {stats['nodes']} nodes, {stats['rewinds']} rewinds, "
                f"{stats['similarity_updates']} similarity updates, {stats['dynamic_additions']} added nodes")
    least_text = f" (least work {least} tokens)" if least else ""
    return (f"{head}\nforward passes/tokens: {phases}; total {total['forward_passes']}/{total['tokens']}{least_text}\n"
            f"wall time {stats['seconds']:.2f}s")


def _write_atomic(path: str, data: Any) -> None:
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, target)


def run_generate(args: argparse.Namespace) -> int:
    overrides = {f.name: getattr(args, f.name) for f in fields(RainConfig)}
    cfg = load_config(args.preset, args.config, **overrides)
    if not args.prompt.strip():
        raise RainError("empty prompt: give some text to answer")
    if cfg.method == "rain":
        load_template(cfg.template)  # fail before the model loads
    if args.trace:
        parent = Path(args.trace).resolve().parent
        if not parent.is_dir():
            raise RainError(f"cannot write trace: folder {parent} does not exist")
    if args.trace_html and not Path(args.trace_html).resolve().parent.is_dir():
        raise RainError(f"cannot write --trace-html: folder {Path(args.trace_html).resolve().parent} does not exist")
    from rain_llm.api import Rain  # heavy imports only once the arguments are known good

    rain = Rain.load(args.model, device=args.device, dtype=args.dtype, device_map=args.device_map)
    progress = Progress(not args.quiet and cfg.method == "rain")
    try:
        out = rain.generate(args.prompt, cfg, trace=bool(args.trace or args.trace_html), progress=progress)
    finally:
        progress.close()
    stats = out.stats.to_dict()
    record = {"prompt": args.prompt, "model": rain.name, "config": out.config, "text": out.text,
              "token_ids": out.token_ids, "stats": stats, "steps": out.trace or []}
    if args.trace:
        _write_atomic(args.trace, record)
    if args.trace_html:
        from rain_llm.shells.view import write_html

        write_html(record, args.trace_html)
    if args.json:
        print(json.dumps({"text": out.text, "token_ids": out.token_ids, "method": out.method, "model": rain.name,
                          "stats": stats, "config": out.config}))
    else:
        print(out.text)
    if not args.quiet:
        print(summary(stats, out.method), file=sys.stderr)
    return 0


def run_eval_command(args: argparse.Namespace) -> int:
    from rain_llm.evaluation.data import parse_shard
    from rain_llm.evaluation.harness import EvalSettings, run_eval, summary_line

    overrides = {f.name: getattr(args, f.name) for f in fields(RainConfig)}
    cfg = load_config(args.preset, args.config, **overrides)
    name = Path(args.model).name if args.model else "default"
    out = Path(args.out) if args.out else Path("results") / f"{args.task}-{name}.jsonl"
    settings = EvalSettings(task=args.task, out=out, methods=[m for m in args.methods.split(",") if m],
                            source=args.data, variant=args.variant, limit=args.limit,
                            shard=parse_shard(args.shard) if args.shard else None, best_of_n=args.best_of_n,
                            judge_model=args.judge_model, judge_url=args.judge_url, judge_name=args.judge_name,
                            judge_key_env=args.judge_key_env, progress=not args.quiet,
                            batch=args.batch).validate()
    if args.limit is not None and args.limit < 1:
        raise RainError(f"invalid --limit {args.limit}: must be at least 1")
    from rain_llm.api import Rain

    rain = Rain.load(args.model, device=args.device, dtype=args.dtype)
    result = run_eval(rain, cfg, settings)
    print(f"{result['written']} answers written to {result['out']} ({result['skipped']} already there)",
          file=sys.stderr)
    print(summary_line(out))
    return 0


def run_bench_command(args: argparse.Namespace) -> int:
    from rain_llm.api import Rain
    from rain_llm.engine.hf.models import pick_device
    from rain_llm.shells.bench import bench_prompts, machine, random_rain, run_bench, table, write_json

    overrides = {f.name: getattr(args, f.name) for f in fields(RainConfig)}
    if args.fixed_budget:
        overrides.update(value_threshold=2.0, fresh_iterations=0)
    cfg = load_config(args.preset, args.config, **overrides)
    methods: dict[str, dict[str, Any]] = {}
    for m in [m for m in args.methods.split(",") if m]:
        base, batch = m, 1
        if (found := re.fullmatch(r"(.+)-b([0-9]+)", m)) and int(found.group(2)) >= 1:
            base, batch = found.group(1), int(found.group(2))
        if base == "vanilla":
            kw: dict[str, Any] = {"method": "vanilla"}
        elif base == "rain":
            kw = {}
        elif base == "rain-no-reuse":
            kw = {"reuse_cache": False}
        elif base == "rain-rounds":  # batched searches in whole-iteration lockstep (the older schedule)
            kw = {"schedule": "round"}
        elif base.startswith("rain-p") and base[6:].isdigit() and int(base[6:]) >= 1:
            kw = {"parallel_leaves": int(base[6:])}
        else:
            raise RainError(f"unknown bench method {m!r} (vanilla, rain, rain-no-reuse, rain-pN, rain-rounds; "
                            "-bN after any: N prompts at once)")
        methods[m] = kw | ({"batch": batch} if batch > 1 else {})
    if args.prompts < 1:
        raise RainError(f"invalid --prompts {args.prompts}: must be at least 1")
    rain = random_rain(args.random, pick_device(args.device), args.tokenizer, args.embedder) if args.random else \
        Rain.load(args.model, device=args.device, dtype=args.dtype)
    result = run_bench(rain, cfg, bench_prompts(args.prompts), methods)
    print(table(result["summary"]))
    if args.out:
        write_json(Path(args.out), {"command": " ".join(sys.argv), "machine": machine(), "model": rain.name,
                                    "config": cfg.to_dict(), **result})
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def run_serve_command(args: argparse.Namespace) -> int:
    overrides = {f.name: getattr(args, f.name) for f in fields(RainConfig)}
    cfg = load_config(args.preset, args.config, **overrides)
    if not 0 <= args.port <= 65535:
        raise RainError(f"invalid --port {args.port}: must be in 0..65535")
    if args.max_batch < 1:
        raise RainError(f"invalid --max-batch {args.max_batch}: must be at least 1")
    if args.batch_window < 0:
        raise RainError(f"invalid --batch-window {args.batch_window}: must not be negative")
    if cfg.method == "rain":
        load_template(cfg.template)  # fail before the model loads
    from rain_llm.shells.server import RainServer, check_port

    check_port(args.host, args.port)  # a busy port is reported before a large model loads, not after
    from rain_llm.api import Rain

    rain = Rain.load(args.model, device=args.device, dtype=args.dtype, device_map=args.device_map)
    server = RainServer(rain, cfg, host=args.host, port=args.port, model_name=args.served_name,
                        max_batch=args.max_batch, batch_window=args.batch_window)
    print(f"rain: serving {server.model_name!r} at {server.url} (POST /chat/completions; up to {args.max_batch} "
          "requests at once; Ctrl-C stops)", file=sys.stderr, flush=True)
    server.serve_forever()
    return 0


def run_view_command(args: argparse.Namespace) -> int:
    from rain_llm.shells.view import write_view

    print(write_view(args.trace, args.out))
    return 0


def run_report_command(args: argparse.Namespace) -> int:
    from rain_llm.evaluation.report import write_report

    result = write_report(args.results, args.out)
    for path in result["files"]:
        print(path)
    for name, why in result.get("skipped_plots", {}).items():
        print(f"rain: {name} not drawn: {why}", file=sys.stderr)
    return 0


def run_models_command(args: argparse.Namespace) -> int:
    """`rain models list` and `rain models fetch NAME`."""
    from rain_llm.engine.hf import models

    if args.models_command == "fetch":
        pip_args = ["--no-index", "--find-links", args.find_links] if args.find_links else []
        print(models.fetch(args.name, pip_args=pip_args))
        return 0
    for spec in models.SPLIT_MODELS.values():
        status, folder = models.split_status(spec)
        where = folder if folder is not None else models.split_gguf(spec)
        label = {"missing": "not fetched", "joined": "joined, not converted"}.get(status, status)
        print(f"{spec.name:<22} {spec.size / 1e9:5.2f} GB  {len(spec.packages):2d} parts  {label:<12} {where}")
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        if args.command == "generate":
            return run_generate(args)
        if args.command == "eval":
            return run_eval_command(args)
        if args.command == "report":
            return run_report_command(args)
        if args.command == "bench":
            return run_bench_command(args)
        if args.command == "serve":
            return run_serve_command(args)
        if args.command == "view":
            return run_view_command(args)
        if args.command == "models":
            return run_models_command(args)
    except RainError as err:
        print(f"rain: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rain: interrupted", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
