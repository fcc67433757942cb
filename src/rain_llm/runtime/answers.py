"""One answer as a generator of model calls: RAIN, vanilla or best-of-n, for one prompt.

Each answer is a generator that yields lists of calls (a backend and a request for it) and gets
their results back, in order; the scheduler batches the calls of every answer in flight. For
RAIN, `RainEnv` turns the search's token-level requests (`rain_llm.search.requests`) into backend
requests: it adds the prompt, builds the candidate and rollout rows with this answer's own random
stream (so an answer is the same alone or in any batch), renders the self-evaluation prompts,
caches values, and reads the results back as the search wants them.

Phases booked: prefill (prompt and evaluation prompt), expand (candidate token sets), simulate
(rollouts), evaluate (self-evaluation), embed (sentence embeddings), generate (plain decoding:
vanilla answers, best-of-n samples, an answer finished after its budget ran out).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Generator, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rain_llm.config import RainConfig
from rain_llm.runtime.accounting import Compute
from rain_llm.runtime.backend import (
    Backend,
    Embed,
    ModelRequest,
    Prefill,
    Row,
    Sample,
    SampleRows,
    TextStop,
    TopTokens,
)
from rain_llm.runtime.prompts import TURN_MARKER, PromptFormat
from rain_llm.runtime.text import Codec
from rain_llm.search import (
    Candidates,
    Complete,
    EmbedSpans,
    Expand,
    ExpandJob,
    Expansion,
    ProgressFn,
    Propose,
    RainSearch,
    SearchRequest,
    SearchResult,
    SearchStats,
    Tokens,
    Value,
)
from rain_llm.values.templates import SelfEvaluator

Call = tuple[Backend, ModelRequest]
Steps = Generator[list[Call], list[Any], "Outcome"]


@dataclass
class Outcome:
    """What an answer's generator returns."""

    tokens: list[int]
    method: str
    search: Any = None  # the SearchResult of a RAIN answer
    value_cache_hits: int = 0
    samples: int | None = None  # best-of-n: how many, and each one's value
    values: list[float] | None = None


@dataclass
class AnswerStats:
    """What one answer cost and how its search went. `to_dict()` is the JSON that `--json`, the
    server and `rain eval` records show (the shape of earlier versions, plus `engine` and
    per-phase `requests`)."""

    method: str
    answer_tokens: int
    seconds: float  # wall time from joining to finishing
    compute: Compute  # this answer's own work (in a batch: its rows' share of every forward)
    engine: str = ""  # which backend ran the language model
    prompt_tokens: int = 0
    committed_steps: int = 0
    batch: int = 1  # the most answers in flight beside it, itself included
    seconds_shared: float = 0.0  # its share of the wall time: every round's time split evenly among the answers in it
    batch_compute: Compute | None = None  # the whole batch's work (generate_many with several prompts)
    search: SearchStats | None = None
    value_cache_hits: int = 0
    samples: int | None = None
    values: list[float] | None = None

    @property
    def iterations(self) -> int:
        return self.search.iterations if self.search else 0

    @property
    def iterations_per_step(self) -> list[int]:
        return list(self.search.iterations_per_step) if self.search else []

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"committed_steps": self.committed_steps}
        s = self.search
        if s is not None:
            out |= {"iterations": s.iterations, "iterations_per_step": list(s.iterations_per_step), "nodes": s.nodes,
                    "rewinds": s.rewinds, "similarity_updates": s.similarity_updates,
                    "dynamic_additions": s.dynamic_additions, "value_cache_hits": self.value_cache_hits,
                    "budget_stopped": s.budget_stopped, "completed_tokens": s.completed_tokens}
        if self.samples is not None:
            out |= {"samples": self.samples, "values": self.values}
        out |= {"answer_tokens": self.answer_tokens, "seconds": round(self.seconds, 3),
                "seconds_shared": round(self.seconds_shared, 3), "prompt_tokens": self.prompt_tokens,
                "engine": self.engine, "compute": self.compute.to_dict()}
        if self.batch > 1:
            out["batch"] = self.batch
        if self.batch_compute is not None:
            out["batch_compute"] = self.batch_compute.to_dict()
        return out


@dataclass
class Generation:
    """One answer: its text and tokens, what it cost, and (if asked) the search trace."""

    text: str
    token_ids: list[int]
    method: str
    stats: AnswerStats
    config: dict[str, Any]
    trace: list[dict[str, Any]] | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = {"text": self.text, "token_ids": self.token_ids, "method": self.method, "stats": self.stats.to_dict(),
             "config": self.config}
        if self.trace is not None:
            d["trace"] = self.trace
        return d


@dataclass
class Setup:
    """Everything one answer needs, checked before it starts (`Rain` prepares it)."""

    key: Hashable
    cfg: RainConfig
    fmt: PromptFormat
    context: list[int]  # the rendered prompt
    policy: Backend
    codec: Codec
    evaluator: Any = None  # bound value (RAIN, best-of-n): a SelfEvaluator (a model judges) or any `value(text)`
    embedder: Backend | None = None
    constant: list[int] | None = None  # the evaluation template's constant ids, kept cached across answers
    constant_cached: bool = False  # an earlier answer left it cached: not part of this answer's least work
    trace: bool = False
    progress: ProgressFn | None = None
    best_of_n: int | None = None
    best_of_n_tokens: int | None = None  # sample until about this many LM tokens are processed (compute match)

    def text(self, tokens: Sequence[int]) -> str:
        return self.fmt.clean(self.codec.decode(tokens))


class Answer:
    """An answer in flight: its generator of calls, its own compute, and how it turns into a
    `Generation`. `method`: rain, vanilla or best-of-n."""

    def __init__(self, setup: Setup):
        self.setup = setup
        self.key = setup.key
        self.compute = Compute()
        self.env: RainEnv | None = None
        self.search: RainSearch | None = None
        if setup.best_of_n is not None:
            self.method, self.steps = "best-of-n", best_of_n_steps(setup, setup.best_of_n, self.compute)
        elif setup.cfg.method == "vanilla":
            self.method, self.steps = "vanilla", vanilla_steps(setup)
        else:
            self.env = RainEnv(setup, self.compute)
            self.search = RainSearch(self.env, setup.cfg, trace=setup.trace, progress=setup.progress)
            self.method, self.steps = "rain", rain_steps(self.env, self.search)
        self.started = time.perf_counter()
        self.peak = 1
        self.share = 0.0

    def join(self, templates: Any) -> None:
        """Joining a scheduler: the evaluation template's constant part is kept cached from now on;
        where an earlier answer left it cached, it is no work of this one (least work)."""
        s = self.setup
        if s.constant is not None:
            s.constant_cached = templates.keep(s.evaluator.backend, s.constant)
            self.compute.least.add(s.constant, count=not s.constant_cached)
        self.started = time.perf_counter()

    def backends(self) -> list[Backend]:
        """The backends this answer may keep cache entries on (released when it ends)."""
        s = self.setup
        found = [s.policy] + ([s.evaluator.backend] if isinstance(s.evaluator, SelfEvaluator) else [])
        return list({id(b): b for b in found}.values())

    def committed(self) -> list[int]:
        """The tokens committed so far: a RAIN search never revises them, and greedy decoding
        (vanilla) keeps every token it decodes (as far as its backend tells: `partial`)."""
        if self.search is not None:
            return list(self.search.answer)
        decoded = getattr(self.setup.policy, "partial", None) if self.method == "vanilla" else None
        return list(decoded(self.key) or []) if decoded is not None else []

    def partial(self) -> Outcome:
        """What the answer is if it ends now: the committed tokens and the search so far."""
        if self.search is None:
            return Outcome(self.committed(), self.method)
        result = SearchResult(tuple(self.search.answer), self.search.stats, [], time.perf_counter() - self.started)
        return Outcome(self.committed(), self.method, result, self.env.value_cache_hits if self.env else 0)

    def generation(self, outcome: Outcome) -> Generation:
        s = self.setup
        stats = AnswerStats(method=outcome.method, answer_tokens=len(outcome.tokens),
                            seconds=time.perf_counter() - self.started, compute=self.compute,
                            engine=s.policy.name, prompt_tokens=len(s.context),
                            committed_steps=outcome.search.stats.steps if outcome.search else len(outcome.tokens),
                            batch=self.peak, seconds_shared=self.share,
                            search=outcome.search.stats if outcome.search else None,
                            value_cache_hits=outcome.value_cache_hits, samples=outcome.samples, values=outcome.values)
        trace = None
        if s.trace and outcome.search is not None:
            trace = [{"step": i, "iterations": r.iterations, "visits_before": r.visits_before,
                      "committed": list(r.committed), "committed_text": s.codec.decode(r.committed), "tree": r.tree}
                     for i, r in enumerate(outcome.search.steps)]
        return Generation(s.text(outcome.tokens), list(outcome.tokens), outcome.method, stats, s.cfg.to_dict(), trace)


# ---------------------------------------------------------------------------------------------- answers
def vanilla_steps(setup: Setup) -> Steps:
    """Greedy decoding of the whole answer."""
    row = Row(setup.cfg.max_new_tokens, 1.0, 0, greedy=True)
    (samples,) = yield [(setup.policy, SampleRows(setup.key, "generate", setup.context, [row]))]
    return Outcome(samples[0].tokens, "vanilla")


def best_of_n_steps(setup: Setup, n: int, compute: Compute) -> Steps:
    """The paper's sample-evaluate baseline: answers sampled (temperature, top-k; this answer's own
    random stream), each valued as RAIN values a leaf; the best is kept. n samples at once; or, with
    `setup.best_of_n_tokens`, in waves until the answer's LM tokens (`compute`, sampling and judging)
    reach that budget, each wave sized by the cost per sample so far, at most n in all. Sample i is
    the same either way (row i's uniforms come from the stream in order)."""
    cfg = setup.cfg
    rng = np.random.default_rng(cfg.seed)
    budget = setup.best_of_n_tokens
    samples: list[Any] = []
    values: list[float] = []
    while len(samples) < n:
        size = n - len(samples)
        if budget is not None:
            spent = compute.total().tokens
            if samples and spent >= budget:
                break
            per_sample = spent / len(samples) if samples else 0.0
            size = min(size, 4 if not samples else max(1, math.ceil((budget - spent) / max(per_sample, 1.0))))
        rows = [Row(cfg.max_new_tokens, cfg.temperature, cfg.top_k) for _ in range(size)]
        uniforms = rng.random((size, cfg.max_new_tokens))
        (wave,) = yield [(setup.policy, SampleRows(setup.key, "generate", setup.context, rows, uniforms))]
        values += yield from evaluate(setup.key, setup.evaluator, [setup.text(s.tokens) for s in wave])
        samples += wave
    best = int(np.argmax(values))
    return Outcome(samples[best].tokens, "best-of-n", samples=len(samples), values=values)


def rain_steps(env: RainEnv, search: RainSearch) -> Steps:
    """A RAIN search: the prompt and evaluation prompt prefilled, then the search's requests
    translated by its env until it returns."""
    yield env.prefill_calls()
    gen = search.steps()
    reply: Any = None
    while True:
        try:
            request = gen.send(reply)
        except StopIteration as stop:
            result = stop.value
            return Outcome(list(result.tokens), "rain", result, env.value_cache_hits)
        reply = yield from env.serve(request)


def evaluate(owner: Hashable, evaluator: Any, texts: list[str]) -> Generator[list[Call], list[Any], list[float]]:
    """Values of answer texts: one scoring request each to the judging model, or the value
    computed at once where no model judges (lexicons, callables, reward models)."""
    if not isinstance(evaluator, SelfEvaluator):
        return [evaluator.value(text) for text in texts]
    probs = yield [(evaluator.backend, evaluator.request(text, owner)) for text in texts]
    return [evaluator.value_from(p) for p in probs]


# ---------------------------------------------------------------------------------------------- RAIN
class RainEnv:
    """The search's view of one prompt (`SearchEnv`), and the translation of its requests into
    backend calls (`serve`)."""

    def __init__(self, setup: Setup, compute: Compute):
        self.setup = setup
        self.key = setup.key
        self.cfg = setup.cfg
        self.codec = setup.codec
        self.context = setup.context
        self.compute = compute
        self.evaluator = setup.evaluator
        self.judge = setup.evaluator.backend if isinstance(setup.evaluator, SelfEvaluator) else None
        self.values: dict[Tokens, float] = {}  # official: values cached by text (dic)
        # this answer's own random stream: its samples do not depend on which answers share a batch
        self.rng = np.random.default_rng(setup.cfg.seed)
        self.started = time.perf_counter()
        self.value_cache_hits = 0

    # ------------------------------------------------------------------ SearchEnv
    def is_terminal(self, answer: Tokens) -> bool:
        if len(answer) >= self.cfg.max_new_tokens:
            return True
        if answer and answer[-1] in self.codec.stop_ids:
            return True
        return self.setup.fmt.ended(self.codec.decode(answer[-16:]))

    def over_budget(self) -> bool:
        cfg = self.cfg
        if cfg.max_search_tokens and self.compute.lm_tokens >= cfg.max_search_tokens:
            return True
        return bool(cfg.max_search_seconds) and time.perf_counter() - self.started >= cfg.max_search_seconds

    def decode(self, tokens: Tokens) -> str:
        return self.codec.decode(tokens)

    def on_commit(self, answer: Tokens) -> None:
        """Keep cached only what extends the committed answer (and its evaluation prompt): bounded memory."""
        for backend, prefixes in self._kept(answer).items():
            backend.retain(self.key, prefixes)

    def _kept(self, answer: Tokens) -> dict[Backend, list[list[int]]]:
        keep = self.evaluator.retain(self.text(answer)) if self.judge is not None else []
        kept: dict[Backend, list[list[int]]] = {self.setup.policy: [self.context + list(answer)]}
        if self.judge is not None:
            kept.setdefault(self.judge, []).extend(keep)
        return kept

    def prefill_calls(self) -> list[Call]:
        """The prompt and the evaluation prompt up to the answer, once; a backend keeps what it
        prefilled for this answer until the answer commits or ends."""
        return [(backend, Prefill(self.key, "prefill", prefixes)) for backend, prefixes in self._kept(()).items()]

    def text(self, answer: Sequence[int]) -> str:
        return self.setup.text(answer)

    # ------------------------------------------------------------------ requests
    def serve(self, request: SearchRequest) -> Generator[list[Call], list[Any], Any]:
        """Answer one search request with backend calls (yielded as one list)."""
        if isinstance(request, Expand):
            return (yield from self._expand(request.jobs))
        if isinstance(request, Propose):
            return (yield from self._propose(request.job))
        if isinstance(request, Value):
            return (yield from self._value(request.answers))
        if isinstance(request, EmbedSpans):
            texts = [self.codec.decode(span) for span in request.spans]
            (vectors,) = yield [(self.setup.embedder, Embed(self.key, "embed", texts))]
            return vectors
        if isinstance(request, Complete):
            row = Row(self.cfg.max_new_tokens - len(request.answer), 1.0, 0, greedy=True)
            (samples,) = yield [(self.setup.policy, SampleRows(self.key, "generate", self._ctx(request.answer), [row]))]
            return tuple(samples[0].tokens)
        raise TypeError(f"unknown search request {request!r}")

    def _expand(self, jobs: list[ExpandJob]) -> Generator[list[Call], list[Any], list[Expansion]]:
        """Each leaf's candidates (sampled rows, or the top tokens for one-token sets) and its
        rollout, all in one list of calls: the backend decodes them side by side."""
        calls, plans = [], []
        for job in jobs:
            length = self._clip(job.answer, job.length)
            rollout = self._rollout_row(job.answer)
            ctx = self._ctx(job.answer)
            if length > 1:
                rows = self._candidate_rows(length, job.attempts)
                uniforms = self.uniforms(rows + ([rollout] if rollout else []))
                calls.append((self.setup.policy, SampleRows(self.key, "expand", ctx, rows, uniforms[:len(rows)])))
            else:
                uniforms = self.uniforms([rollout]) if rollout else None
                calls.append((self.setup.policy, TopTokens(self.key, "expand", ctx, job.candidates)))
            if rollout is not None:
                calls.append((self.setup.policy, SampleRows(self.key, "simulate", ctx, [rollout], uniforms[-1:])))
            plans.append((job, length, rollout is not None))
        results = iter((yield calls))
        out = []
        for job, length, has_rollout in plans:
            candidates = self._read_candidates(next(results), length, job.candidates)
            rollout_tokens = tuple(next(results)[0].tokens) if has_rollout else ()
            out.append(Expansion(candidates, rollout_tokens))
        return out

    def _propose(self, job: ExpandJob) -> Generator[list[Call], list[Any], Candidates]:
        length = self._clip(job.answer, job.length)
        ctx = self._ctx(job.answer)
        if length == 1:
            request: ModelRequest = TopTokens(self.key, "expand", ctx, job.candidates)
        else:
            rows = self._candidate_rows(length, job.attempts)
            request = SampleRows(self.key, "expand", ctx, rows, self.uniforms(rows))
        (result,) = yield [(self.setup.policy, request)]
        return self._read_candidates(result, length, job.candidates)

    def _value(self, answers: list[Tokens]) -> Generator[list[Call], list[Any], list[float]]:
        out: list[float | None] = [None] * len(answers)
        todo: dict[Tokens, list[int]] = {}  # answers to value now (the same answer twice: once)
        for i, answer in enumerate(answers):
            if answer in self.values:
                self.value_cache_hits += 1
                out[i] = self.values[answer]
            else:
                todo.setdefault(answer, []).append(i)
        values = yield from evaluate(self.key, self.evaluator, [self.text(a) for a in todo])
        for (answer, places), value in zip(todo.items(), values):
            self.values[answer] = value
            for i in places:
                out[i] = value
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------ rows and reading them back
    def _ctx(self, answer: Sequence[int]) -> list[int]:
        return self.context + list(answer)

    def _clip(self, answer: Tokens, length: int) -> int:
        return max(1, min(length, self.cfg.max_new_tokens - len(answer)))

    def _candidate_rows(self, length: int, attempts: int) -> list[Row]:
        """The greedy token set, then `attempts` sampled ones (temperature, top-k)."""
        cfg = self.cfg
        return [Row(length, cfg.temperature, cfg.top_k, greedy=i == 0) for i in range(1 + attempts)]

    def uniforms(self, rows: Sequence[Row]) -> np.ndarray:
        """Uniforms for the rows' inverse-CDF sampling, from this answer's stream."""
        return self.rng.random((len(rows), max(r.max_tokens for r in rows)))

    def _rollout_row(self, answer: Tokens) -> Row | None:
        """The simulation's decode rule (to the next punctuation mark, or a new user turn in a
        transcript), or None where the answer already ends a clause."""
        if self._ends_clause(self.codec.decode(answer)):
            return None
        stop = TextStop(self.cfg.rollout_stop_chars, () if self.setup.fmt.chat else (TURN_MARKER,),
                        tuple(answer[-8:]))
        return Row(self.cfg.max_rollout_tokens, self.cfg.rollout_temperature, 0, stop=stop)

    def _ends_clause(self, text: str) -> bool:
        return (bool(text) and text[-1] in self.cfg.rollout_stop_chars) or self.setup.fmt.ended(text)

    def _read_candidates(self, result: Any, length: int, n: int) -> Candidates:
        if length == 1:  # official: the top-k tokens with their probabilities (no sampling)
            logits = np.array([logit for _, logit in result], dtype=np.float64) / self.cfg.temperature
            p = np.exp(logits - logits.max())
            p /= p.sum()
            return [((token,), float(pt)) for (token, _), pt in zip(result, p)]
        return candidates_from(result, n)


def candidates_from(samples: list[Sample], n: int) -> Candidates:
    """Greedy first, then distinct samples (official group_getp)."""
    greedy = samples[0]
    seen = {tuple(greedy.tokens)}
    others: Candidates = []
    for s in samples[1:]:
        t = tuple(s.tokens)
        if t not in seen and len(others) < n - 1:
            seen.add(t)
            others.append((t, float(np.exp(s.logprob))))
    gp = float(np.exp(greedy.logprob))
    if others:  # official: keep the greedy prior between max + min and the sum of the others
        ps = np.array([p for _, p in others])
        gp = max(min(gp, float(ps.sum())), float(ps.max() + ps.min()))
    return [(tuple(greedy.tokens), gp)] + others


ValueFn = Callable[[str, str], float]
