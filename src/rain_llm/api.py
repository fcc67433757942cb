"""The Python API: load a model once, then generate many answers.

    from rain_llm import Rain, load_config
    rain = Rain.load()                                   # the bundled default model
    out = rain.generate("How do I pick a lock?", load_config("fast"))
    print(out.text, out.stats["iterations_per_step"])
    plain = rain.generate("How do I pick a lock?", method="vanilla")
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from .config import RainConfig
from .embedder import MiniLMEmbedder
from .engine.hf import HFEngine
from .env import ModelEnv
from .errors import RainError
from .evaluators import SelfEvaluator, load_template
from .models import load_model
from .prompts import PromptFormat, chat_wrapper, has_chat_template, prompt_format
from .search import ProgressFn, RainSearch
from .values import CallableValue, ValueSource, build_value_source


@dataclass
class Generation:
    """One answer: its text and tokens, what it cost, and (if asked) the search trace."""

    text: str
    token_ids: list[int]
    method: str
    stats: dict[str, Any]
    config: dict[str, Any]
    trace: list[dict[str, Any]] | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.trace is None:
            d.pop("trace")
        return d


class Rain:
    """A loaded model (and the sentence embedder) ready to answer prompts with RAIN or vanilla decoding."""

    def __init__(self, model: Any, tokenizer: Any, *, embedder: MiniLMEmbedder | None = None,
                 name: str = "model"):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        stop = _stop_ids(model, tokenizer)
        self.engine = HFEngine(model, tokenizer, stop_ids=stop)
        self._embedder = embedder
        self._value_sources: dict[tuple, ValueSource] = {}

    @classmethod
    def load(cls, model: str | None = None, *, device: str = "auto", dtype: str = "auto",
             device_map: str | None = None) -> Rain:
        """Load a Hugging Face id, a local folder, a .gguf file, or (None) the bundled default."""
        lm, tok = load_model(model, device=device, dtype=dtype, device_map=device_map)
        return cls(lm, tok, name=model or "default")

    def value_source(self, cfg: RainConfig, value: Any = None) -> ValueSource:
        """The value source for `cfg` (built once per setting and kept: judge models load once)."""
        if value is not None and hasattr(value, "bind"):
            return value
        if callable(value):
            return CallableValue(value)
        key = (cfg.value, cfg.template, cfg.eval_format, cfg.value_mode)
        if key not in self._value_sources:
            chat = has_chat_template(self.tokenizer) if cfg.eval_format == "auto" else cfg.eval_format == "chat"
            if chat and not has_chat_template(self.tokenizer):
                raise RainError("eval_format=chat, but the tokenizer has no chat template")
            self._value_sources[key] = build_value_source(
                cfg.value, policy=self, template=load_template(cfg.template), chat=chat, mode=cfg.value_mode,
                chat_template=chat_wrapper(self.tokenizer) if chat else None, device=str(self.engine.device))
        return self._value_sources[key]

    def prepare(self, prompt: str, cfg: RainConfig) -> tuple[PromptFormat, list[int]]:
        """The prompt's format and token ids, after the checks every method needs."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise RainError("empty prompt: give some text to answer")
        fmt = prompt_format(self.tokenizer, cfg.prompt_format, cfg.fewshot)
        context = fmt.render(self.tokenizer, prompt)
        window = self.engine.context_window
        if len(context) + cfg.max_new_tokens > window:
            raise RainError(f"prompt too long: {len(context)} tokens plus max_new_tokens={cfg.max_new_tokens} "
                            f"exceed the model's context window of {window}")
        return fmt, context

    @property
    def embedder(self) -> MiniLMEmbedder:
        if self._embedder is None:  # loaded on first RAIN call: vanilla decoding never needs it
            self._embedder = MiniLMEmbedder.load(device=self.engine.device)
        return self._embedder

    def generate(self, prompt: str, config: RainConfig | None = None, *, trace: bool = False,
                 progress: ProgressFn | None = None, value_fn: ValueSource | Callable[[str, str], float] | None = None,
                 **overrides: Any) -> Generation:
        """Answer `prompt` with `config.method` ("rain" or "vanilla"); overrides change config keys.
        `value_fn` replaces what steers the search (default: `config.value`, the model's self-evaluation)."""
        cfg = config or RainConfig()
        cfg = cfg.replace(**overrides) if overrides else cfg.validate()
        fmt, context = self.prepare(prompt, cfg)
        window = self.engine.context_window
        engine = self.engine
        engine.reuse_cache = cfg.reuse_cache
        engine.seed(cfg.seed)
        engine.counters.reset()
        start = time.perf_counter()
        if cfg.method == "vanilla":
            engine.reset()
            with engine.counters.phase("generate"):
                tokens = engine.generate(context, cfg.max_new_tokens)
            seconds = time.perf_counter() - start
            stats = {"committed_steps": len(tokens), "seconds": round(seconds, 3),
                     "answer_tokens": len(tokens), "compute": engine.counters.to_dict()}
            return Generation(fmt.clean(engine.decode(tokens)), tokens, "vanilla", stats, cfg.to_dict())

        source = self.value_source(cfg, value_fn)
        evaluator = source.bind(prompt)
        if isinstance(evaluator, SelfEvaluator) and evaluator.engine is engine:
            eval_len = len(evaluator.prefix_ids("")) + max(len(s) for s in evaluator.suffix_ids)
            if eval_len + cfg.max_new_tokens + cfg.max_rollout_tokens > window:
                raise RainError(f"prompt too long: its self-evaluation prompt ({eval_len} tokens) plus the answer "
                                f"budget exceeds the model's context window of {window}")
            constant = evaluator.constant_ids()
            engine.retain([constant])  # keep only the template's constant part from earlier prompts
            if engine.reuse_cache and engine.prefix_cache.num_tokens() >= len(constant):
                engine.counters.least.add(constant, count=False)  # cached already: no work this answer
        else:
            engine.reset()
        embedder = self.embedder
        embedder.counters.reset()
        eval_engine = getattr(evaluator, "engine", None)
        if eval_engine is not None and eval_engine is not engine:  # a judge model: count its work too
            eval_engine.counters.reset()
        env = ModelEnv(engine, evaluator, embedder, context, fmt, cfg)
        search = RainSearch(env, cfg, trace=trace, progress=progress)
        result = search.run()
        seconds = time.perf_counter() - start
        tokens = list(result.tokens)
        compute = engine.counters
        compute.merge(embedder.counters)
        if eval_engine is not None and eval_engine is not engine:
            compute.merge(eval_engine.counters)
        s = result.stats
        stats = {
            "committed_steps": s.steps,
            "iterations": s.iterations,
            "iterations_per_step": s.iterations_per_step,
            "nodes": s.nodes,
            "rewinds": s.rewinds,
            "similarity_updates": s.similarity_updates,
            "dynamic_additions": s.dynamic_additions,
            "value_cache_hits": env.value_cache_hits,
            "budget_stopped": s.budget_stopped,
            "completed_tokens": s.completed_tokens,
            "answer_tokens": len(tokens),
            "seconds": round(seconds, 3),
            "compute": compute.to_dict(),
        }
        steps = None
        if trace:
            steps = [{"step": i, "iterations": r.iterations, "visits_before": r.visits_before,
                      "committed": list(r.committed), "committed_text": engine.decode(r.committed), "tree": r.tree}
                     for i, r in enumerate(result.steps)]
        return Generation(fmt.clean(engine.decode(tokens)), tokens, "rain", stats, cfg.to_dict(), steps)


def _stop_ids(model: Any, tokenizer: Any) -> list[int]:
    """End-of-turn ids: the tokenizer's EOS and the generation config's (often a list)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, list | tuple):
        ids.update(int(e) for e in eos)
    return sorted(ids)
