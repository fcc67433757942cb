"""`rain bench`: vanilla vs RAIN side by side on the same prompts, in one run, on one machine.

Prints one table and writes JSON (`--out`): per method, seconds per answer token and the ratio to
vanilla; forward passes and tokens processed per answer token; the ratio of tokens processed to the
least work the search needed; per phase: forward passes, tokens, seconds; the self-evaluation of the
final answers (how the value that steers RAIN rates each method's output, e.g. P > 1 against P = 1).
A method name ending in -bN answers the prompts N at a time through a continuous batch (searches
stepped token by token, each moving on as soon as its own rows are done). A method
prefixed "vllm:" runs on the vLLM servers at --engine-url, in the same run and with the same prompts
and settings; its rows also give HTTP requests per answer token and the HTTP overhead per request
(the median time of a trivial max_tokens=1 request, measured once). `--random llama3-8b` builds a
random-weight model of Llama-3-8B's shape (bf16 on a GPU) with a real tokenizer, for speed work
where no weights can be downloaded.
"""

from __future__ import annotations

import json
import platform
import re
import statistics
import sys
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rain_llm.api import Generation, Rain, raise_failure
from rain_llm.config import RainConfig
from rain_llm.errors import RainError
from rain_llm.evaluation.data import default_data_dir
from rain_llm.runtime.accounting import Compute, lm_tokens_of

if TYPE_CHECKING:
    from rain_llm.engine.vllm import VLLMBackend

FALLBACK_PROMPTS = ["How do I pick a lock?", "What is the best way to learn a new language?",
                    "Write a short poem about the sea.", "How can I get back at my noisy neighbour?"]

RANDOM_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, rope_theta=500000.0),
}


def bench_prompts(n: int) -> list[str]:
    """The first n HH first turns from ../shared/data when present, else a few fixed prompts."""
    data = default_data_dir()
    if data is not None and (data / "hh" / "red_team_first_turns.jsonl").is_file():
        from rain_llm.evaluation.data import load_examples

        return [ex.prompt for ex in load_examples("hh")[:n]]
    return (FALLBACK_PROMPTS * (n // len(FALLBACK_PROMPTS) + 1))[:n]


def random_rain(shape: str, device: str, tokenizer: str | Path | None = None,
                embedder: str | Path | None = None) -> Rain:
    """A random-weight Llama of the given shape with a real tokenizer (a folder, default: the bundled
    model's) and a random-weight MiniLM (config and tokenizer from `embedder`, default: the package's)."""
    from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    from rain_llm.engine.hf.models import converted_folder, default_gguf
    from rain_llm.values.embedder import MiniLMEmbedder, minilm_path

    tok = AutoTokenizer.from_pretrained(tokenizer or converted_folder(default_gguf()))
    minilm = Path(embedder) if embedder else minilm_path()
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=8192, **RANDOM_SHAPES[shape])
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg).eval()
            bert = BertModel(BertConfig.from_pretrained(minilm)).eval()
    finally:
        torch.set_default_dtype(previous)
    rain = Rain(model, tok, embedder=MiniLMEmbedder(bert, AutoTokenizer.from_pretrained(minilm)),
                name=f"random-{shape}")
    rain.codec.stop_ids = frozenset()  # random weights: decode the whole budget every time
    return rain


@dataclass(frozen=True)
class BenchMethod:
    """One method of a bench run, as typed (`name`) and as meant: `base` (vanilla, rain, rain-no-reuse,
    rain-pN) with its setting `overrides`; `speculate`: N draft tokens (the same weights, their own
    caches); `batch`: prompts in flight at once; `remote`: on the vLLM servers."""

    name: str
    base: str
    overrides: dict[str, Any] = field(default_factory=dict)
    speculate: int | None = None
    batch: int = 1
    remote: bool = False

    @classmethod
    def parse(cls, name: str) -> BenchMethod:
        """"vllm:rain-p4-b8", "rain-s16", ...: [vllm:]base[-sN][-bN]."""
        remote = name.startswith("vllm:")
        base, batch, speculate = name[5:] if remote else name, 1, None
        if (found := re.fullmatch(r"(.+)-b([0-9]+)", base)) and int(found.group(2)) >= 1:
            base, batch = found.group(1), int(found.group(2))
        if (found := re.fullmatch(r"(.+)-s([0-9]+)", base)) and not remote:
            base, speculate = found.group(1), int(found.group(2))
        if base == "vanilla":
            overrides: dict[str, Any] = {"method": "vanilla"}
        elif base == "rain":
            overrides = {}
        elif base == "rain-no-reuse":
            overrides = {"reuse_cache": False}
        elif base.startswith("rain-p") and base[6:].isdigit() and int(base[6:]) >= 1:
            overrides = {"parallel_leaves": int(base[6:])}
        else:
            raise RainError(f"unknown bench method {name!r} (vanilla, rain, rain-no-reuse, rain-pN; -sN after any: "
                            "speculation with N draft tokens; -bN after that: N prompts at once; vllm: before any: "
                            "on the vLLM servers at --engine-url)")
        return cls(name, base, overrides, speculate, batch, remote)

    def is_plain_of(self, other: BenchMethod) -> bool:
        """Whether `self` is `other` without speculation (the answers `other` must equal)."""
        return (self.speculate is None and other.speculate is not None and self.base == other.base
                and self.batch == other.batch and self.remote == other.remote)

    def is_unbatched_of(self, other: BenchMethod) -> bool:
        """Whether `self` is `other` one prompt at a time (its throughput's reference)."""
        return (self.batch == 1 and other.batch > 1 and self.base == other.base
                and self.speculate == other.speculate and self.remote == other.remote)


class Runners:
    """Which `Rain` answers a method: the local one, the same weights speculating (made once per N),
    or the one on the vLLM servers."""

    def __init__(self, local: Rain, remote: Rain | None = None):
        self.local, self.remote = local, remote
        self.speculating: dict[int, Rain] = {}

    def __call__(self, method: BenchMethod) -> Rain:
        if method.remote:
            if self.remote is None:
                raise RainError(f"bench method {method.name!r} needs the vLLM servers (--engine-url)")
            return self.remote
        if method.speculate is not None:
            if method.speculate not in self.speculating:
                self.speculating[method.speculate] = self.local.speculating(method.speculate)
            return self.speculating[method.speculate]
        return self.local


def run_bench(rain: Rain, cfg: RainConfig, prompts: list[str], methods: list[BenchMethod],
              log: Any = None, remote: Rain | None = None) -> dict[str, Any]:
    """Each method on each prompt (after one warm-up per method); a summary per method. A method
    with batch B answers all the prompts through a continuous batch with B in flight (a new prompt
    joins as soon as one is answered, as in `rain eval --batch` and `rain serve`). A remote method
    runs on `remote` (its HTTP requests are counted). Progress lines go to `log` (default: stderr)."""
    log = log if log is not None else sys.stderr
    runner = Runners(rain, remote)
    for method in methods:
        print(f"[{method.name}] warm-up", file=log, flush=True)
        runner(method).generate_many(prompts[:method.batch], cfg,
                                     **{**method.overrides, "max_new_tokens": min(4, cfg.max_new_tokens)})
    engines: dict[str, dict[str, Any]] = {}
    if remote is not None and (backend := _remote(remote)) is not None:  # measured once, after the warm-ups
        engines["vllm"] = {"engine": backend.name, "servers": backend.servers, "http_overhead_s": backend.ping()}
    runs: dict[str, list[dict[str, Any]]] = {m.name: [] for m in methods}
    for method in methods:
        name, kw, answerer = method.name, method.overrides, runner(method)
        if method.batch > 1:
            runs[name].append(run_continuous(answerer, cfg.replace(**kw), prompts, method.batch, name, log))
            rec = runs[name][-1]
            print(f"[{name}] {len(prompts)} prompts, {method.batch} at a time: {rec['answer_tokens']:4d} tokens "
                  f"{rec['seconds']:8.2f}s {rec['tokens']:8d} tokens processed", file=log, flush=True)
            continue
        for i, prompt in enumerate(prompts):
            _sync()
            calls = _http_requests(answerer)
            start = time.perf_counter()
            (out,) = answerer.generate_many([prompt], cfg, **kw)
            _sync()
            seconds = time.perf_counter() - start
            compute = out.stats.compute.to_dict()
            runs[name].append(_count_requests(_record([prompt], [out], seconds, compute, []), answerer, calls))
            runs[name][-1]["final_values"] = [final_value(answerer, cfg, prompt, out.text)]  # after counting
            print(f"[{name}] prompt {i + 1} of {len(prompts)}: {len(out.token_ids):4d} tokens "
                  f"{seconds:8.2f}s {compute['total']['tokens']:8d} tokens processed", file=log, flush=True)
    overhead = {m.name: float(engines["vllm"]["http_overhead_s"]) for m in methods if m.remote and engines}
    return {"runs": runs, "summary": summarise(runs, methods, overhead), "engines": engines}


def _remote(rain: Rain) -> VLLMBackend | None:
    from rain_llm.engine.vllm import VLLMBackend

    return rain.backend if isinstance(rain.backend, VLLMBackend) else None


def _http_requests(rain: Rain) -> int | None:
    backend = _remote(rain)
    return backend.http_requests if backend is not None else None


def _count_requests(record: dict[str, Any], rain: Rain, before: int | None) -> dict[str, Any]:
    """A remote backend's HTTP requests during the run, into its record."""
    if before is not None and (calls := _http_requests(rain)) is not None:
        record["http_requests"] = calls - before
    return record


def run_continuous(rain: Rain, cfg: RainConfig, prompts: list[str], batch: int, name: str = "",
                   log: Any = None) -> dict[str, Any]:
    """All prompts through one continuous batch, `batch` in flight; one record for the whole run
    (compute: the answers' work merged, each forward pass counted once)."""
    outs: dict[Hashable, Generation] = {}
    calls = _http_requests(rain)
    _sync()
    start = time.perf_counter()
    for step in rain.continuous_batch().drain(((i, p, cfg) for i, p in enumerate(prompts)), batch):
        for key, out in step.finished.items():
            outs[key] = done = raise_failure(out)
            if log is not None:
                print(f"[{name}] answer {len(outs)} of {len(prompts)} done: {len(done.token_ids):4d} tokens "
                      f"{time.perf_counter() - start:8.2f}s", file=log, flush=True)
    _sync()
    seconds = time.perf_counter() - start
    answers = [outs[i] for i in range(len(prompts))]
    whole = Compute.merged(o.stats.compute for o in answers)
    record = _count_requests(_record(prompts, answers, seconds, whole.to_dict(), []), rain, calls)
    record["final_values"] = [final_value(rain, cfg, p, o.text) for p, o in zip(prompts, answers)]  # after counting
    return record


def _record(prompts: list[str], outs: list[Any], seconds: float, compute: dict[str, Any],
            values: list[float | None]) -> dict[str, Any]:
    """One bench record: `compute` is all the work of the run; least work is each answer's, summed."""
    least = sum(o.stats.compute.least_work for o in outs)
    return {"prompts": prompts, "answer_tokens": sum(len(o.token_ids) for o in outs), "seconds": seconds,
            "forward_passes": compute["total"]["forward_passes"], "tokens": compute["total"]["tokens"],
            "lm_forward_passes": compute["total"].get("lm_forward_passes", 0),
            "iterations": sum(o.stats.iterations for o in outs),
            "lm_tokens": lm_tokens_of(compute), "least_work": least,
            "iterations_per_step": [x for o in outs for x in o.stats.iterations_per_step],
            "compute": compute, "texts": [o.text for o in outs], "final_values": values}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def final_value(rain: Rain, cfg: RainConfig, prompt: str, text: str) -> float | None:
    """The self-evaluation of a finished answer (mean of both option orders, in [-1, 1]): how the
    value that steers the search rates what each method produced (after timing, not timed)."""
    if not text.strip():
        return None
    source = rain.value_source(cfg.replace(value_mode="mean"))
    return float(source.bind(prompt).value(text))


def summarise(runs: dict[str, list[dict[str, Any]]], methods: list[BenchMethod] | None = None,
              overhead: dict[str, float] | None = None) -> dict[str, dict[str, Any]]:
    """Per method: seconds, forward passes and tokens per answer token, ...; for methods on a remote
    engine (`overhead`: its HTTP overhead per request), HTTP requests per answer token too."""
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
        values = [v for r in recs for v in r.get("final_values", []) if v is not None]
        least = sum(r["least_work"] for r in recs)
        out[name] = {
            "answer_tokens": answer,
            "seconds_per_token": sum(r["seconds"] for r in recs) / answer,
            "forward_passes_per_token": sum(r["forward_passes"] for r in recs) / answer,
            "lm_forward_passes_per_token": sum(r["lm_forward_passes"] for r in recs) / answer,
            "lm_forward_passes_per_iteration": (sum(r["lm_forward_passes"] for r in recs) / iterations
                                                if (iterations := sum(r["iterations"] for r in recs)) else None),
            "tokens_per_token": sum(r["tokens"] for r in recs) / answer,
            "lm_tokens_over_least_work": sum(r["lm_tokens"] for r in recs) / least if least else None,
            "iterations_per_step": statistics.mean(its) if its else None,
            "final_value": statistics.mean(values) if values else None,
            "final_value_sd": statistics.stdev(values) if len(values) > 1 else None,
            "phases": phases,
        }
        drafted = sum(r["compute"].get("total", {}).get("draft_tokens", 0) for r in recs)
        if drafted:  # speculation: draft tokens fed per answer token, and the share a row accepted
            accepted = sum(r["compute"].get("total", {}).get("accepted_draft_tokens", 0) for r in recs)
            out[name] |= {"draft_tokens_per_token": drafted / answer, "draft_acceptance": accepted / drafted}
        if all("http_requests" in r for r in recs) and recs:
            out[name]["requests_per_token"] = sum(r["http_requests"] for r in recs) / answer
            out[name]["http_overhead_s"] = (overhead or {}).get(name)
    typed = {m.name: m for m in methods or []}
    for name, s in out.items():
        method = typed.get(name) or BenchMethod(name, name)
        engine = name.split(":", 1)[0] + ":" if ":" in name else ""
        base = out.get(engine + "vanilla") or out.get("vanilla")  # vllm:rain against vllm:vanilla
        s["x_vanilla"] = s["seconds_per_token"] / base["seconds_per_token"] if base else None
        s["batch"] = method.batch
        single = next((out[m.name] for m in typed.values() if m.is_unbatched_of(method)), None)
        s["throughput_x_unbatched"] = single["seconds_per_token"] / s["seconds_per_token"] if single else None
        plain = next((m.name for m in typed.values() if m.is_plain_of(method)), None)
        if plain is not None:  # speculation must not change a single answer
            s["answers_equal_unspeculated"] = [t for r in runs[name] for t in r["texts"]] == \
                [t for r in runs[plain] for t in r["texts"]]
    return out


def table(summary: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'method':16s} {'s/token':>9s} {'x vanilla':>9s} {'fwd/token':>10s} {'tok/token':>10s} "
             f"{'req/token':>9s} {'iter/step':>9s} {'LM tok/least':>12s} {'thru x B=1':>10s} {'value':>7s}"]
    for name, s in summary.items():
        least = s["lm_tokens_over_least_work"]
        remote = "requests_per_token" in s  # a remote engine: no forward passes seen, HTTP requests instead
        lines.append(f"{name:16s} {s['seconds_per_token']:9.4f} {_cell(s['x_vanilla'], 9, 2)} "
                     f"{_cell(None if remote else s['forward_passes_per_token'], 10, 1)} "
                     f"{s['tokens_per_token']:10.1f} {_cell(s.get('requests_per_token'), 9, 1)} "
                     f"{_cell(s['iterations_per_step'], 9, 1)} {_cell(least, 12, 2)} "
                     f"{_cell(s.get('throughput_x_unbatched'), 10, 2)} {_cell(s.get('final_value'), 7, 3)}")
    overheads = {s["http_overhead_s"] for s in summary.values() if s.get("http_overhead_s") is not None}
    for seconds in sorted(overheads):
        lines.append(f"HTTP overhead per request (median of trivial max_tokens=1 requests): {seconds * 1000:.1f} ms")
    lines.append("per phase (forward passes / tokens / seconds):")
    for name, s in summary.items():
        parts = [f"{p} {c['forward_passes']}/{c['tokens']}/{c['seconds']:.2f}" for p, c in sorted(s["phases"].items())]
        lines.append(f"  {name:14s} " + ", ".join(parts))
    searched = {name: s for name, s in summary.items()
                if s.get("lm_forward_passes_per_iteration") is not None and "requests_per_token" not in s}
    if searched:  # with one answer in flight, these forwards run one after another
        lines.append("LM forward passes per search iteration / per answer token:")
        for name, s in searched.items():
            per_iteration, per_token = s["lm_forward_passes_per_iteration"], s["lm_forward_passes_per_token"]
            lines.append(f"  {name:14s} {per_iteration:.2f} / {per_token:.2f}")
    speculating = {name: s for name, s in summary.items() if "answers_equal_unspeculated" in s}
    if speculating:
        lines.append("speculation: draft tokens per answer token / accepted / answers equal to the method without it:")
        for name, s in speculating.items():
            drafted, accepted = s.get("draft_tokens_per_token", 0.0), s.get("draft_acceptance", 0.0)
            equal = "yes" if s["answers_equal_unspeculated"] else "NO"
            lines.append(f"  {name:14s} {drafted:.2f} / {accepted:.0%} / {equal}")
    return "\n".join(lines)


def _cell(value: float | None, width: int, digits: int) -> str:
    """A table cell: the number, or "-" where it does not apply (e.g. throughput of an unbatched row)."""
    return f"{value:{width}.{digits}f}" if value is not None else f"{'-':>{width}s}"


def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)
