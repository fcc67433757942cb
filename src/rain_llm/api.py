"""The Python API: load a model once, then generate many answers.

    from rain_llm import Rain, load_config
    rain = Rain.load()                                   # the bundled default model
    out = rain.generate("How do I pick a lock?", load_config("fast"))
    print(out.text, out.stats["iterations_per_step"])
    plain = rain.generate("How do I pick a lock?", method="vanilla")
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from typing import Any

from rain_llm.config import RainConfig
from rain_llm.engine.base import Counters, Row
from rain_llm.engine.hf.engine import HFEngine
from rain_llm.engine.hf.models import load_model
from rain_llm.errors import RainError
from rain_llm.runtime.env import ExpandStream, ModelEnv, embed_many, expand_many, value_many
from rain_llm.runtime.prompts import (
    TURN_MARKER,
    Prompt,
    PromptFormat,
    as_messages,
    chat_wrapper,
    has_chat_template,
    prompt_format,
    user_request,
)
from rain_llm.search.rain import Lockstep, ProgressFn, RainSearch, SearchResult, run_lockstep
from rain_llm.values.embedder import MiniLMEmbedder
from rain_llm.values.sources import CallableValue, ValueSource, build_value_source
from rain_llm.values.templates import SelfEvaluator, load_template


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

    def prepare(self, prompt: Prompt, cfg: RainConfig) -> tuple[PromptFormat, list[int]]:
        """The prompt's format and token ids, after the checks every method needs. A prompt is
        a user message, or a conversation (chat messages: system first, the last one the user's)."""
        as_messages(prompt)  # first: an empty prompt or a malformed conversation is the error to report
        fmt = prompt_format(self.tokenizer, cfg.prompt_format, cfg.fewshot)
        context = fmt.render(self.tokenizer, prompt)
        window = self.engine.context_window
        if len(context) + cfg.max_new_tokens > window:
            raise RainError(f"prompt too long: {len(context)} tokens plus max_new_tokens={cfg.max_new_tokens} "
                            f"exceed the model's context window of {window}")
        return fmt, context

    def continuous_batch(self, schedule: str = "token") -> ContinuousBatch:
        """Answers that join and leave a running batch (see ContinuousBatch; `schedule` as in
        `generate_many`)."""
        return ContinuousBatch(self, schedule)

    @property
    def embedder(self) -> MiniLMEmbedder:
        if self._embedder is None:  # loaded on first RAIN call: vanilla decoding never needs it
            self._embedder = MiniLMEmbedder.load(device=self.engine.device)
        return self._embedder

    def generate(self, prompt: Prompt, config: RainConfig | None = None, *, trace: bool = False,
                 progress: ProgressFn | None = None, value_fn: ValueSource | Callable[[str, str], float] | None = None,
                 **overrides: Any) -> Generation:
        """Answer `prompt` with `config.method` ("rain" or "vanilla"); overrides change config keys.
        `value_fn` replaces what steers the search (default: `config.value`, the model's self-evaluation)."""
        return self.generate_many([prompt], config, trace=trace, progress=progress, value_fn=value_fn,
                                  **overrides)[0]

    def generate_many(self, prompts: Sequence[Prompt], config: RainConfig | None = None, *, trace: bool = False,
                      progress: ProgressFn | None = None,
                      value_fn: ValueSource | Callable[[str, str], float] | None = None,
                      schedule: str = "token", **overrides: Any) -> list[Generation]:
        """Answer several prompts at once, same settings for all. RAIN runs their searches side
        by side and batches their expansions, evaluations and embeddings across prompts; vanilla
        decodes them as one batch. `schedule`: "token" (default) steps the searches one token at a
        time, each moving on as soon as its own rows are done; "round" runs whole iterations in
        lockstep (each waits for the batch's longest row; kept for comparison, see `Lockstep`).
        Each answer's `stats` carries its own share of the work (`compute`) and the batch size;
        one prompt = `generate`."""
        cfg = config or RainConfig()
        cfg = cfg.replace(**overrides) if overrides else cfg.validate()
        if not isinstance(prompts, list | tuple) or not prompts:
            raise RainError("no prompts: give at least one")
        stream = _expand_stream(schedule)
        prepared = [self.prepare(p, cfg) for p in prompts]  # every prompt checked before any work
        engine = self.engine
        engine.reuse_cache = cfg.reuse_cache
        engine.seed(cfg.seed)
        engine.counters.reset()
        batch = len(prompts)
        owners = [Counters() for _ in prompts] if batch > 1 else None
        start = time.perf_counter()
        if cfg.method == "vanilla":
            engine.reset()
            answers = _greedy_decode(engine, [(context, cfg.max_new_tokens) for _, context in prepared], owners)
            seconds = time.perf_counter() - start
            out = []
            for i, ((fmt, _), tokens) in enumerate(zip(prepared, answers)):
                gen = self._vanilla_generation(tokens, fmt, cfg, owners[i] if owners else engine.counters,
                                               seconds, batch)
                if owners:
                    gen.stats["batch_compute"] = engine.counters.to_dict()
                out.append(gen)
            return out

        source = self.value_source(cfg, value_fn)
        evaluators = [source.bind(user_request(p)) for p in prompts]
        constant = self._check_evaluation(evaluators, cfg)
        if constant is not None:
            engine.retain([constant], exact=True)  # keep only the template's constant part from earlier prompts
            cached = engine.reuse_cache and engine.prefix_cache.num_tokens() >= len(constant)
            for counters in [engine.counters, *(owners or [])]:
                if cached:
                    counters.least.add(constant, count=False)  # cached already: no work this answer
        else:
            engine.reset()
        embedder = self.embedder
        embedder.counters.reset()
        eval_engine = getattr(evaluators[0], "engine", None)
        if eval_engine is not None and eval_engine is not engine:  # a judge model: count its work too
            eval_engine.counters.reset()
        if owners and engine.reuse_cache:  # every prompt and its evaluation prompt in one forward, not 2B
            _prefill_together(engine, [(context, ev, owner) for ev, (_, context), owner in
                                       zip(evaluators, prepared, owners)])
        envs = [ModelEnv(engine, ev, embedder, context, fmt, cfg, owner=owners[i] if owners else None)
                for i, (ev, (fmt, context)) in enumerate(zip(evaluators, prepared))]
        searches = [RainSearch(env, cfg, trace=trace, progress=progress if batch == 1 else None) for env in envs]
        results = run_lockstep(searches, expand_many, value_many, embed_many, stream) if batch > 1 \
            else [searches[0].run()]
        for env in envs:
            env.close()
        seconds = time.perf_counter() - start
        whole = Counters()  # all the work: policy model, embedder and judge model (each once)
        for model in {id(m): m for m in (engine, embedder, eval_engine) if m is not None}.values():
            whole.merge(model.counters)
        if owners:  # each answer's compute holds its own share; least work is per answer
            whole.least.tokens = sum(o.least.tokens for o in owners)
        else:
            whole.least = engine.counters.least
        out = []
        for i, (env, result, (fmt, _)) in enumerate(zip(envs, results, prepared)):
            compute = owners[i] if owners else whole
            gen = self._rain_generation(env, result, fmt, cfg, compute, seconds if batch == 1 else result.seconds,
                                        trace, batch)
            if owners:
                gen.stats["batch_compute"] = whole.to_dict()
            out.append(gen)
        return out

    def _check_evaluation(self, evaluators: list[Any], cfg: RainConfig) -> list[int] | None:
        """Context-window check of the self-evaluation prompts; the template's constant ids when
        the policy model evaluates itself (kept cached across prompts), else None."""
        constant = None
        for evaluator in evaluators:
            if isinstance(evaluator, SelfEvaluator) and evaluator.engine is self.engine:
                eval_len = len(evaluator.prefix_ids("")) + max(len(s) for s in evaluator.suffix_ids)
                if eval_len + cfg.max_new_tokens + cfg.max_rollout_tokens > self.engine.context_window:
                    raise RainError(f"prompt too long: its self-evaluation prompt ({eval_len} tokens) plus the "
                                    f"answer budget exceeds the model's context window of {self.engine.context_window}")
                constant = evaluator.constant_ids()
        return constant

    def _vanilla_generation(self, tokens: list[int], fmt: PromptFormat, cfg: RainConfig, compute: Counters,
                            seconds: float, batch: int) -> Generation:
        stats = {"committed_steps": len(tokens), "seconds": round(seconds, 3), "answer_tokens": len(tokens),
                 "compute": compute.to_dict()}
        if batch > 1:
            stats["batch"] = batch
        return Generation(self._text(fmt, tokens), tokens, "vanilla", stats, cfg.to_dict())

    def _text(self, fmt: PromptFormat, tokens: list[int]) -> str:
        return fmt.clean(self.engine.decode(tokens))

    def _rain_generation(self, env: ModelEnv, result: SearchResult, fmt: PromptFormat, cfg: RainConfig,
                         compute: Counters, seconds: float, trace: bool, batch: int) -> Generation:
        engine = self.engine
        tokens = list(result.tokens)
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
        if batch > 1:
            stats["batch"] = batch
        steps = None
        if trace:
            steps = [{"step": i, "iterations": r.iterations, "visits_before": r.visits_before,
                      "committed": list(r.committed), "committed_text": engine.decode(r.committed), "tree": r.tree}
                     for i, r in enumerate(result.steps)]
        return Generation(self._text(fmt, tokens), tokens, "rain", stats, cfg.to_dict(), steps)


Queued = tuple[Hashable, PromptFormat, list[int], RainConfig]  # a vanilla answer waiting: key, format, context


class ContinuousBatch:
    """Answers that join a running batch and leave it when done (continuous batching, what a
    server needs). `add` starts an answer: a RAIN search joins the lockstep at once, a vanilla
    answer joins the decode stream at the next `step` (with schedule="round": is decoded with the
    other vanilla answers then). `step` runs one round of every live search (one token with the
    default schedule), each kind of model call batched across them, and returns the answers that
    finished. Answers may differ in settings (sampling rules travel per row). Each answer equals
    `Rain.generate`'s: it draws from its own random stream and its compute is its own share.

        batch = rain.continuous_batch()
        batch.add("a", "How do I pick a lock?", cfg)
        while batch:
            for key, generation in batch.step().items(): ...
            # add more at any time
    One continuous batch at a time per Rain: it shares the engine's cache with its answers only.
    """

    def __init__(self, rain: Rain, schedule: str = "token"):
        self.stream = _expand_stream(schedule)
        self.rain = rain
        self.engine = rain.engine
        self.lockstep = Lockstep(expand_many, value_many, embed_many, self.stream)
        self.plain: dict[Hashable, tuple[Queued, Counters, _Live]] = {}  # vanilla answers decoding in the stream
        self.live: dict[Hashable, _Live] = {}
        self.queued: list[Queued] = []
        self.done: dict[Hashable, Generation] = {}  # finished inside `add`, returned by the next step
        self.constants: list[list[int]] = []  # the evaluation templates' constant parts: always kept cached

    def __len__(self) -> int:
        return len(self.live) + len(self.queued) + len(self.done) + len(self.plain)

    def add(self, key: Hashable, prompt: Prompt, config: RainConfig, *,
            value_fn: ValueSource | Callable[[str, str], float] | None = None) -> None:
        """Start answering `prompt`. Raises RainError (and starts nothing) for a bad prompt or setting."""
        self.add_many([(key, prompt, config)], value_fn=value_fn)

    def add_many(self, items: Sequence[tuple[Hashable, Prompt, RainConfig]], *,
                 value_fn: ValueSource | Callable[[str, str], float] | None = None) -> None:
        """Start several answers, (key, prompt, settings) each; their prompts and evaluation
        prompts are encoded in one forward. Every item is checked first: one bad item raises
        RainError and none starts."""
        start = time.perf_counter()
        engine = self.engine
        keys = [key for key, _, _ in items]
        running = {*self.live, *(k for k, *_ in self.queued), *self.done, *self.plain}
        plans = []
        for key, prompt, config in items:
            cfg = config.validate()
            if key in running or keys.count(key) > 1:
                raise RainError(f"answer {key!r} is already in the batch")
            if cfg.reuse_cache != (engine.reuse_cache if len(self) else items[0][2].reuse_cache):
                raise RainError("reuse_cache must be the same for every answer of a running batch")
            fmt, context = self.rain.prepare(prompt, cfg)
            evaluator, constant = None, None
            if cfg.method == "rain":
                evaluator = self.rain.value_source(cfg, value_fn).bind(user_request(prompt))
                constant = self.rain._check_evaluation([evaluator], cfg)
            plans.append((key, fmt, context, cfg, evaluator, constant))
        engine.reuse_cache = items[0][2].reuse_cache if items else engine.reuse_cache
        searches = [plan for plan in plans if plan[4] is not None]
        self.queued += [(key, fmt, context, cfg) for key, fmt, context, cfg, evaluator, _ in plans if evaluator is None]
        owners = [Counters() for _ in searches]
        for (*_, constant), owner in zip(searches, owners):
            if constant is None:
                continue
            if engine.reuse_cache and engine.prefix_cache.lookup(constant)[2] >= len(constant):
                owner.least.add(constant, count=False)  # cached already: no work for this answer
            if constant not in self.constants:
                self.constants.append(constant)
                engine.claim(self.constants, owner=self, exact=True)
        if len(searches) > 1 and engine.reuse_cache:  # all prompts and evaluation prompts in one forward
            _prefill_together(engine, [(context, evaluator, owner) for (_, _, context, _, evaluator, _), owner in
                                       zip(searches, owners)])
        started = []
        for (key, fmt, context, cfg, evaluator, _), owner in zip(searches, owners):
            env = ModelEnv(engine, evaluator, self.rain.embedder, context, fmt, cfg, owner=owner)
            self.live[key] = _Live(env, peak=len(self.live) + 1)
            started.append((key, self.lockstep.add(key, RainSearch(env, cfg))))
        for key, _ in started:  # the setup's wall time, split among the answers it started
            self.live[key].share += (time.perf_counter() - start) / len(started)
        for key, result in started:
            if result is not None:
                self.done[key] = self._finish(key, result)

    def cancel(self, key: Hashable) -> None:
        """Drop an answer that is no longer wanted: its search stops and its cache may go."""
        self.queued = [q for q in self.queued if q[0] != key]
        self.done.pop(key, None)
        if self.plain.pop(key, None) is not None:
            self.stream.cancel_plain(key)
        live = self.live.pop(key, None)
        if live is not None:
            self.lockstep.remove(key)
            live.env.close()
            self._free()

    def partial_text(self, key: Hashable) -> str | None:
        """The text a live RAIN answer has committed so far, held back where it may still change
        (an unfinished character; a transcript's possible start of a new turn). RAIN never revises
        a commit, so the final text starts with it. None for answers not searching now."""
        live, search = self.live.get(key), self.lockstep.searches.get(key)
        if live is None or search is None:
            return None
        text = self.rain._text(live.env.fmt, list(search.answer))
        if not live.env.fmt.chat:
            text = text[:max(0, len(text) - len(TURN_MARKER))]
        return text.rstrip("\ufffd")

    def step(self) -> dict[Hashable, Generation]:
        """One round of every live search (and the queued vanilla answers); the answers finished.
        Each answer's stats get `seconds_shared`: its share of the wall time (every phase's time
        split evenly among the answers that took part), beside `seconds`, its wall time; and
        `prompt_tokens`, the length of its rendered prompt."""
        engine, embedder = self.engine, self.rain._embedder
        for counters in (engine.counters, *([embedder.counters] if embedder else [])):
            counters.reset()  # each answer counts its own work; the shared counters must not grow forever
        in_flight = len(self.live) + len(self.queued) + len(self.plain)
        finished, self.done = self.done, {}
        if self.queued and self.stream is None:  # decoded together now, before the round
            finished.update(self._vanilla(self.queued, in_flight))
        for queued in self.queued if self.stream is not None else []:  # decoded in the round's stream
            key, _, context, cfg = queued
            owner = Counters()
            self.stream.start_plain(key, engine, context, Row(cfg.max_new_tokens, 1.0, 0, greedy=True), owner)
            self.plain[key] = (queued, owner, _Live(None, peak=in_flight))
        self.queued = []
        running = list(self.live.values()) + [live for _, _, live in self.plain.values()]
        for live in running:  # the most answers this one ran beside (its stats' "batch")
            live.peak = max(live.peak, in_flight)
        start = time.perf_counter()
        results = self.lockstep.round()
        for live in running:
            live.share += (time.perf_counter() - start) / len(running)
        for key, result in results.items():
            finished[key] = self._finish(key, result)
        for key, sample in (self.stream.take_plain() if self.stream is not None else {}).items():
            (_, fmt, context, cfg), owner, live = self.plain.pop(key)
            gen = finished[key] = self.rain._vanilla_generation(sample.tokens, fmt, cfg, owner,
                                                                time.perf_counter() - live.started, live.peak)
            gen.stats["seconds_shared"] = round(live.share, 3)
            gen.stats["prompt_tokens"] = len(context)
        if finished:
            self._free()
        return finished

    def _free(self) -> None:
        """Drop cached work only finished or cancelled answers kept (the templates' constant parts stay)."""
        if self.engine.reuse_cache:
            self.engine.retain(self.constants, owner=self, exact=True)

    def _vanilla(self, queued: list[Queued], in_flight: int) -> dict[Hashable, Generation]:
        engine = self.engine
        owners = [Counters() for _ in queued]
        start = time.perf_counter()
        answers = _greedy_decode(engine, [(context, cfg.max_new_tokens) for _, _, context, cfg in queued], owners)
        seconds = time.perf_counter() - start
        out = {}
        for (key, fmt, context, cfg), tokens, owner in zip(queued, answers, owners):
            gen = out[key] = self.rain._vanilla_generation(tokens, fmt, cfg, owner, seconds, in_flight)
            gen.stats["seconds_shared"] = round(seconds / len(queued), 3)
            gen.stats["prompt_tokens"] = len(context)
        return out

    def _finish(self, key: Hashable, result: SearchResult) -> Generation:
        live = self.live.pop(key)
        live.env.close()
        env = live.env
        gen = self.rain._rain_generation(env, result, env.fmt, env.cfg, env.owner, result.seconds, False, live.peak)
        gen.stats["seconds_shared"] = round(live.share, 3)
        gen.stats["prompt_tokens"] = len(env.context)
        return gen


@dataclass
class _Live:
    """A RAIN answer in a continuous batch."""

    env: ModelEnv | None  # its prompt format, settings and own counters (owner); None for a vanilla answer
    peak: int = 1  # the most answers in flight beside it, itself included
    share: float = 0.0  # its share of the wall time so far
    started: float = field(default_factory=time.perf_counter)


def _expand_stream(schedule: str) -> ExpandStream | None:
    """The stream that steps batched searches token by token ("token"), or none: whole
    iterations in lockstep ("round")."""
    if schedule not in ("token", "round"):
        raise RainError(f"schedule must be 'token' or 'round', not {schedule!r}")
    return ExpandStream() if schedule == "token" else None


def _greedy_decode(engine: HFEngine, requests: list[tuple[list[int], int]],
                   owners: list[Counters] | None) -> list[list[int]]:
    """Vanilla answers, (context, max tokens) each, greedy-decoded as one batch; counted under
    "generate" in the engine's counters and each answer's own (`owners`, optional)."""
    with ExitStack() as stack:
        for counters in [engine.counters, *(owners or [])]:
            stack.enter_context(counters.phase("generate"))
        rows = engine.decode_groups([(context, [Row(n, 1.0, 0, greedy=True)], None) for context, n in requests],
                                    owners)
    return [sample.tokens for (sample,) in rows]


def _prefill_together(engine: HFEngine, answers: list[tuple[list[int], Any, Counters]]) -> None:
    """Encode several answers' prompts and their evaluation prompts (when the policy model
    evaluates itself) in one forward, each row charged to its answer; (context, evaluator, owner) each."""
    contexts, whose = [], []
    for context, evaluator, owner in answers:
        for ids in [context, *(evaluator.retain("") if getattr(evaluator, "engine", None) is engine else [])]:
            contexts.append(ids)
            whose.append(owner)
    with ExitStack() as stack:
        for counters in [engine.counters, *{id(o): o for o in whose}.values()]:
            stack.enter_context(counters.phase("prefill"))
        engine.prefill_many(contexts, whose)


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
