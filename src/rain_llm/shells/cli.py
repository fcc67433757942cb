"""`rain`: the command line. A thin shell: parse, load, call the API, print.

    rain generate "How do I pick a lock?"
    rain generate --method vanilla "How do I pick a lock?"
    rain generate --model ./folder --preset paper-advbench --seed 3 --json --trace run.json "..."

Every RainConfig key is a flag (`t_max` -> `--t-max`); `--config FILE.toml` sets them from a
file, `--preset` picks a named set; flags win over the file, the file over the preset.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any, NoReturn

from rain_llm.config import PRESETS, RainConfig, check_speculate, load_config
from rain_llm.errors import RainError
from rain_llm.search import SearchStatus
from rain_llm.shells.protocol import Limits
from rain_llm.values.templates import load_template

HELP = {
    "method": "rain (search) or vanilla (plain greedy decoding)",
    "max_new_tokens": "answer length budget in tokens",
    "token_set_lengths": "token set length per depth, e.g. 1,2,4,10",
    "template": "self-evaluation template: harmlessness, truthfulness, sentiment, or a .toml file",
    "value_mode": "vote (official binary vote of both option orders) or mean (continuous)",
    "fewshot": "few-shot preamble for transcript prompts: 'default' or a file",
    "reuse_cache": "reuse KV caches across calls (--no-reuse-cache recomputes, to measure the saving)",
    "t_max": "iterations per committed step, counting the root's visits kept from the previous step "
             "(default 50); at least --fresh-iterations new ones run each step, so a t_max below it still "
             "runs that many",
    "fresh_iterations": "new iterations each committed step runs at least, whatever --t-max says (default 15, "
                        "as the official code)",
    "t_min": "a step may stop early once its best child has more than this many visits and a value above "
             "--value-threshold (default 6)",
    "max_search_tokens": "compute budget per answer in LM tokens processed (0: none; what --speculate runs beyond "
                         "one token per forward is not counted); then the best path is committed and the rest "
                         "decoded plainly",
    "max_search_seconds": "compute budget per answer in seconds (0: none), as --max-search-tokens",
}
MODEL_HELP = ("Hugging Face id, local folder, .gguf file, or a short name from `rain models list` (default: "
              "the bundled SmolLM2-135M-Instruct)")


class Parser(argparse.ArgumentParser):
    """argparse without prefix abbreviations (`--max-new-token` must not silently mean
    --max-new-tokens) and with one error line that suggests the option meant."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"rain: error: {message} (see {self.prog} --help)\n")


def _did_you_mean(parser: argparse.ArgumentParser, unknown: list[str]) -> str:
    """'unrecognized arguments: X' plus the closest options this command has."""
    options = [o for action in parser._actions for o in action.option_strings if o.startswith("--")]
    hints = []
    for arg in unknown:
        if arg.startswith("-"):
            close = difflib.get_close_matches(arg.split("=")[0], options, n=1, cutoff=0.6)
            if close:
                hints.append(f"{arg.split('=')[0]} -> did you mean {close[0]}?")
    return f"unrecognized arguments: {' '.join(unknown)}" + (f" ({'; '.join(hints)})" if hints else "")


def _add_config_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    group = parser.add_argument_group("search settings (defaults: the paper's; see src/rain_llm/config.py)")
    for f in fields(RainConfig):
        if f.name in skip:
            continue
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


def _add_model_flags(parser: argparse.ArgumentParser, *, preset: str | None = None, device_map: bool = False,
                     model_help: str = MODEL_HELP) -> None:
    """The flags of every command that runs a model: which one, where, and its settings."""
    group = parser.add_argument_group("model and settings")
    group.add_argument("--model", default=None, help=model_help)
    group.add_argument("--preset", default=preset, help=f"named settings: {', '.join(PRESETS)} (default "
                       f"{preset or 'none: the paper-hh defaults'}); see README")
    group.add_argument("--config", default=None, metavar="FILE", help="TOML file of settings (any key of "
                       "RainConfig); flags win over the file, the file over --preset")
    group.add_argument("--device", default="auto", help="auto (CUDA when there is one, else CPU), cpu, cuda, "
                       "cuda:1, ... (default auto)")
    group.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, float32 on CPU), float32, "
                       "bfloat16, float16 (default auto)")
    group.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads for torch (default: "
                       "$RAIN_THREADS, else torch's default of one per core); idle threads sleep rather than spin "
                       "(OMP_WAIT_POLICY=PASSIVE unless set), so a shared machine costs little; see README")
    group.add_argument("--speculate", type=int, default=0, metavar="N", help="verify up to N draft tokens per "
                       "decode forward, drafted from text the search already produced; the same answers with fewer "
                       "sequential forwards (transformers engine only; default 0: off; see README)")
    if device_map:
        group.add_argument("--device-map", default=None, help="'auto' to spread a large model over GPUs")
    group.add_argument("--engine", default="hf", choices=["hf", "vllm"], help="hf: transformers in this process "
                       "(default); vllm: vLLM servers at --engine-url (then --model, optional, names the tokenizer "
                       "folder or name; default: the folder the server loaded)")
    group.add_argument("--engine-url", action="append", default=None, metavar="URL", help="base URL of a vLLM "
                       "server, e.g. http://127.0.0.1:8000; repeat for several servers (each answer stays on one)")
    group.add_argument("--engine-key-env", default="RAIN_ENGINE_KEY", metavar="NAME", help="environment variable "
                       "holding the vLLM server's --api-key, if it has one (default RAIN_ENGINE_KEY)")
    group.add_argument("--engine-isolate-scoring", default="auto", choices=["auto", "on", "off"],
                       help="keep scoring and top-k requests out of one vLLM batch (vLLM's V1 sampler mixes up "
                       "their logprobs, PR #51789): auto decides from the server's version (on for every release "
                       "so far); off for a server known fixed (default auto)")


def build_parser() -> tuple[Parser, dict[str, Parser]]:
    """The parser and each command's subparser (for suggestions on mistyped options)."""
    parser = Parser(prog="rain", description="RAIN: rewindable auto-regressive inference")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    gen = sub.add_parser("generate", help="answer one prompt with RAIN or vanilla decoding")
    gen.add_argument("prompt", help="the user's message")
    gen.add_argument("--json", action="store_true", help="print JSON (text, token_ids, stats) instead of text")
    gen.add_argument("--trace", default=None, metavar="FILE", help="write the whole search per committed step")
    gen.add_argument("--trace-html", default=None, metavar="FILE", help="write the search as an offline HTML page "
                     "(see rain view)")
    gen.add_argument("--quiet", action="store_true", help="no progress line or summary")
    _add_model_flags(gen, device_map=True)
    _add_config_flags(gen)

    ev = sub.add_parser("eval", help="run one of the paper's experiments: answer, judge, append results")
    ev.add_argument("task", help="hh, advbench, truthfulqa, xstest, selfeval or sentiment")
    ev.add_argument("--methods", default="vanilla,rain", help="comma-separated methods to answer every prompt "
                    "with: vanilla, rain, best-of-n (default vanilla,rain); the search settings below apply to "
                    "rain and best-of-n")
    ev.add_argument("--out", default=None, help="results file, JSON lines (default results/TASK-MODEL.jsonl)")
    ev.add_argument("--data", default=None, help="data file or Hugging Face dataset name (default: $RAIN_DATA_DIR "
                    "or ../shared/data next to the repository); for selfeval any labelled pairs: HH chosen/rejected "
                    "transcripts, prompt + chosen + rejected, or prompt + a + b + label (a or b)")
    ev.add_argument("--variant", default=None, help="advbench suffixes: none, smoothllm, jbb-vicuna, jbb-llama2")
    ev.add_argument("--limit", type=int, default=None, help="first N prompts (of this shard)")
    ev.add_argument("--shard", default=None, help="i/n: the i-th of n disjoint shards (0-based)")
    ev.add_argument("--batch", type=int, default=1, help="answers in flight at once, in one continuous batch: "
                    "their model calls are batched, and a finished answer's place goes to the next prompt "
                    "(default 1)")
    ev.add_argument("--best-of-n", default="4", help="samples for best-of-n, or 'match' to match RAIN's compute "
                    "(default 4)")
    ev.add_argument("--judge-model", default=None, help="local model as LM judge ('policy': the model itself)")
    ev.add_argument("--judge-url", default=None, help="OpenAI-compatible endpoint as LM judge (base URL)")
    ev.add_argument("--judge-name", default=None, help="model name at --judge-url")
    ev.add_argument("--judge-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_model_flags(ev, model_help="the evaluated model: " + MODEL_HELP)
    _add_config_flags(ev, skip=("method",))  # the methods are --methods

    bench = sub.add_parser("bench", help="vanilla vs RAIN side by side: time, forward passes, tokens, least work")
    bench.add_argument("--random", default=None, choices=["tiny", "llama3-8b"],
                       help="instead of --model: random weights of this shape (bf16 on a GPU)")
    bench.add_argument("--tokenizer", default=None, help="with --random: tokenizer folder (default: the "
                       "bundled model's; elsewhere e.g. ASSETS/lm from benchmarks/gpu_check.py --make-assets)")
    bench.add_argument("--embedder", default=None, help="with --random: MiniLM config + tokenizer folder "
                       "(e.g. ASSETS/minilm)")
    bench.add_argument("--prompts", type=int, default=3, help="number of HH first-turn prompts (default 3)")
    bench.add_argument("--methods", default="vanilla,rain,rain-no-reuse",
                       help="comma-separated: vanilla, rain, rain-no-reuse, rain-pN (N parallel leaves); "
                       "-bN after any (e.g. rain-b16): N prompts in flight in a continuous batch "
                       "(default vanilla,rain,rain-no-reuse)")
    bench.add_argument("--fixed-budget", action="store_true",
                       help="no early stop (value_threshold 2, fresh_iterations 0): every step runs t_max iterations")
    bench.add_argument("--out", default=None, help="write JSON here")
    _add_model_flags(bench, preset="paper-hh")
    _add_config_flags(bench)

    srv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions) "
                         "answering with RAIN")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    srv.add_argument("--served-name", default=None, help="the model name clients send (default: --model, or "
                     "'default')")
    srv.add_argument("--max-batch", type=int, default=16,
                     help="most requests answered at once, in one continuous batch (default 16)")
    srv.add_argument("--batch-window", type=float, default=0.05, metavar="SECONDS",
                     help="how long the first queued request waits for others to join its batch (default 0.05)")
    srv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes (visible to "
                     "other users in the process list: prefer --api-key-env)")
    srv.add_argument("--api-key-env", default=None, metavar="VAR", help="take the API key from this environment "
                     "variable (default: RAIN_API_KEY when it is set; else no key is asked for)")
    srv.add_argument("--answer-log", default=None, metavar="FILE", help="append one JSON line per answer to FILE "
                     "(id, method, finish reason, prompt, text): what the server answered, e.g. to check an "
                     "evaluation run")
    limits = srv.add_argument_group("limits (per request, and the server's)")
    defaults = Limits()
    for name, kind, text in [
            ("max_tokens", int, "most answer tokens a request may ask for"),
            ("max_t_max", int, "largest t_max (and fresh_iterations)"),
            ("max_parallel_leaves", int, "largest parallel_leaves"),
            ("max_candidates", int, "largest num_candidates, sample_attempts, dynamic_extra_samples"),
            ("max_rollout_tokens", int, "largest max_rollout_tokens"),
            ("max_token_set_length", int, "longest token set"),
            ("max_queue", int, "requests that may wait for a place in the batch; more get 429 with Retry-After"),
            ("request_timeout", float, "seconds from a request's arrival to its deadline: then it gets the "
                                       "answer committed so far, finish_reason 'timeout'"),
            ("max_body_bytes", int, "largest request body (413 beyond)"),
            ("max_prompt_bytes", int, "largest prompt, checked before tokenising"),
            ("header_timeout", float, "seconds a client has to send a request's headers"),
            ("body_timeout", float, "seconds a client has to send a request's body (408 after)")]:
        shown = f"{getattr(defaults, name):{'d' if kind is int else 'g'}}"
        limits.add_argument(Limits.FLAGS[name], dest=f"limit_{name}", type=kind, default=None,
                            metavar="N" if kind is int else "X", help=f"{text} (default {shown})")
    limits.add_argument("--grace", type=float, default=30.0, metavar="SECONDS", help="on SIGTERM or Ctrl-C: how "
                        "long answers in flight may take to finish (default 30)")
    _add_model_flags(srv, device_map=True)
    _add_config_flags(srv)

    mod = sub.add_parser("models", help="models split over PyPI packages: list them, fetch one by short name")
    mod_sub = mod.add_subparsers(dest="models_command", required=True, parser_class=Parser)
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
    commands = {"generate": gen, "eval": ev, "bench": bench, "serve": srv, "models": mod, "report": rep,
                "view": view}
    return parser, commands


def set_threads(threads: int | None) -> None:
    """torch's intra-op threads: --threads, else $RAIN_THREADS, else torch's default."""
    if threads is None:
        env = os.environ.get("RAIN_THREADS")
        if env is None or not env.strip():
            return
        if not env.strip().isdigit():
            raise RainError(f"invalid RAIN_THREADS={env!r}: a positive integer")
        threads = int(env)
    if threads < 1:
        raise RainError(f"invalid --threads {threads}: must be at least 1")
    import torch

    torch.set_num_threads(threads)


def load_rain(args: argparse.Namespace, *, engine: str | None = None) -> Any:
    """The model a command runs, from its model flags (threads set first): in this process, or
    (--engine vllm) on the vLLM servers at --engine-url. `engine` overrides --engine (bench)."""
    engine = engine or args.engine
    check_speculate(args.speculate, remote=engine == "vllm")
    if engine == "vllm":
        if not args.engine_url:
            raise RainError("--engine vllm (or a vllm: bench method) needs --engine-url URL (a vLLM server's base "
                            "URL, e.g. http://127.0.0.1:8000)")
        from rain_llm.engine.vllm import open_servers

        isolate = {"auto": None, "on": True, "off": False}[args.engine_isolate_scoring]
        remote = open_servers(args.engine_url, tokenizer=args.model, key_env=args.engine_key_env,
                              isolate_scoring=isolate)  # the servers are asked before torch loads
        set_threads(args.threads)
        from rain_llm.api import Rain

        return Rain.from_remote(remote)
    set_threads(args.threads)
    if args.engine_url and args.command != "bench":
        raise RainError("--engine-url is for --engine vllm: add --engine vllm, or drop --engine-url")
    from rain_llm.api import Rain  # heavy imports only once the arguments are known good

    return Rain.load(args.model, device=args.device, dtype=args.dtype,
                     device_map=getattr(args, "device_map", None), speculate=args.speculate)


class Progress:
    """The search's status on stderr: one live line on a terminal; in a log, a line at every new
    step and at least every `every` seconds, so a long step never looks stuck."""

    def __init__(self, enabled: bool, every: float = 5.0, stream: Any = None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every = every
        self.start = time.perf_counter()
        self.last_step = 0
        self.last_line = -every

    def __call__(self, info: SearchStatus) -> None:
        if not self.enabled:
            return
        now = time.perf_counter() - self.start
        budget = f"{info.iteration}/{info.budget}"
        if info.budget > info.t_max - info.visits_before:
            budget += f" (t_max={info.t_max}, but at least fresh_iterations={info.fresh} new per step)"
        line = (f"step {info.step}  iteration {budget}  nodes {info.nodes}  "
                f"answer {info.answer_tokens} tokens  {now:.1f}s")
        if self.tty:
            self.stream.write("\r" + line.ljust(100))
            self.stream.flush()
        elif info.step != self.last_step or now - self.last_line >= self.every:
            self.stream.write(line + "\n")
            self.stream.flush()
            self.last_line = now
        self.last_step = info.step

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")


def summary(stats: dict[str, Any], method: str) -> str:
    compute = stats["compute"]
    remote = str(stats.get("engine", "")).startswith("vllm:")  # a server does not report its forward passes

    def passes(name: str, count: int) -> str:
        return "-" if remote and name != "embed" else str(count)

    phases = ", ".join(f"{name} {passes(name, c['forward_passes'])}/{c['tokens']}" for name, c in compute.items()
                       if name not in ("total", "least_work"))
    total = compute["total"]
    if remote:
        total = {**total, "forward_passes": "-"}
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
    rain = load_rain(args)
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

    overrides = {f.name: getattr(args, f.name, None) for f in fields(RainConfig)}
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
    rain = load_rain(args)
    result = run_eval(rain, cfg, settings)
    print(f"{result['written']} answers written to {result['out']} ({result['skipped']} already there)",
          file=sys.stderr)
    print(summary_line(out))
    return 0


def run_bench_command(args: argparse.Namespace) -> int:
    from rain_llm.engine.hf.models import pick_device
    from rain_llm.shells.bench import (
        BenchMethod,
        bench_prompts,
        machine,
        random_rain,
        run_bench,
        table,
        write_json,
    )

    overrides = {f.name: getattr(args, f.name) for f in fields(RainConfig)}
    if args.fixed_budget:
        overrides.update(value_threshold=2.0, fresh_iterations=0)
    cfg = load_config(args.preset, args.config, **overrides)
    methods = [BenchMethod.parse(m) for m in args.methods.split(",") if m]
    if args.prompts < 1:
        raise RainError(f"invalid --prompts {args.prompts}: must be at least 1")
    remote = load_rain(args, engine="vllm") if any(m.remote for m in methods) else None
    if args.random:
        set_threads(args.threads)
        rain = random_rain(args.random, pick_device(args.device), args.tokenizer, args.embedder)
    elif remote is not None and (args.engine == "vllm" or all(m.remote for m in methods)):
        rain = remote  # no method runs in this process: no local model to load
    else:
        rain = load_rain(args)
    result = run_bench(rain, cfg, bench_prompts(args.prompts), methods, remote=remote)
    print(table(result["summary"]))
    if args.out:
        write_json(Path(args.out), {"command": " ".join(sys.argv), "machine": machine(), "model": rain.name,
                                    "config": cfg.to_dict(), **result})
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def run_serve_command(args: argparse.Namespace) -> int:
    from rain_llm.shells.server import RainServer, api_key_from, check_port

    overrides = {f.name: getattr(args, f.name) for f in fields(RainConfig)}
    cfg = load_config(args.preset, args.config, **overrides)
    if not 0 <= args.port <= 65535:
        raise RainError(f"invalid --port {args.port}: must be in 0..65535")
    if args.max_batch < 1:
        raise RainError(f"invalid --max-batch {args.max_batch}: must be at least 1")
    if args.batch_window < 0:
        raise RainError(f"invalid --batch-window {args.batch_window}: must not be negative")
    if args.grace < 0:
        raise RainError(f"invalid --grace {args.grace}: must not be negative")
    chosen = {k[len("limit_"):]: v for k, v in vars(args).items() if k.startswith("limit_") and v is not None}
    # the compute budget flags are the server's default and the cap no request may exceed
    for name in ("max_search_seconds", "max_search_tokens"):
        if getattr(cfg, name):
            chosen[name] = getattr(cfg, name)
    limits = Limits(**chosen).check()
    key = args.api_key or api_key_from(args.api_key_env or ("RAIN_API_KEY" if os.environ.get("RAIN_API_KEY") else None))
    if cfg.method == "rain":
        load_template(cfg.template)  # fail before the model loads
    check_port(args.host, args.port)  # a busy port is reported before a large model loads, not after
    server = RainServer(None, cfg, host=args.host, port=args.port, model_name=args.served_name or args.model or
                        "default", max_batch=args.max_batch, batch_window=args.batch_window, limits=limits,
                        api_key=key, grace=args.grace, loader=lambda: load_rain(args), answer_log=args.answer_log)
    if key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"rain: warning: listening on {args.host} without an API key (--api-key-env)", file=sys.stderr)

    def listening() -> None:
        print(f"rain: loading {args.model or 'the default model'}; {server.url.removesuffix('/v1')}/health "
              "says when it is ready", file=sys.stderr, flush=True)

    def ready() -> None:
        print(f"rain: serving {server.model_name!r} at {server.url} (POST /chat/completions, /completions; up to "
              f"{args.max_batch} requests at once, {limits.max_queue} waiting; /health, /metrics; Ctrl-C stops)",
              file=sys.stderr, flush=True)

    server.serve_forever(on_listening=listening, on_ready=ready)
    if server.failed:
        raise RainError(server.failed)
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
    # OpenMP threads that wait by sleeping, not spinning, unless the user chose: beside a busy
    # neighbour, spinning threads made a search 3.4x slower at 2 threads (results/threads_cpu.json;
    # README "Threads"). libgomp reads this once, when torch loads it, so it is set before any import.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    parser, commands = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        command = commands.get(args.command, parser)
        command.error(_did_you_mean(command, unknown))
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
