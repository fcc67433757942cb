"""One answer as a generator of model calls: RAIN, vanilla or best-of-n, for one prompt.

Each answer is a generator that yields lists of calls (a backend and a request for it) and gets
their results back, in order; the scheduler batches the calls of every answer in flight. For
RAIN, `RainEnv` (`rain_env.py`) says what each of the search's requests means for this answer.

Phases booked: prefill (prompt and evaluation prompt), expand (candidate token sets), simulate
(rollouts), evaluate (self-evaluation), embed (sentence embeddings), generate (plain decoding:
vanilla answers, best-of-n samples, an answer finished after its budget ran out).
"""

from __future__ import annotations

import math
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rain_llm.runtime.accounting import Compute
from rain_llm.runtime.backend import Backend, Call, Row, Sample, SampleRows
from rain_llm.runtime.rain_env import RainEnv
from rain_llm.runtime.scheduler import Templates
from rain_llm.runtime.setup import ModelJudge, Setup, evaluate
from rain_llm.search import RainSearch, SearchResult, SearchStats

Steps = Generator[list[Call], list[Any], "Outcome"]


@dataclass
class Outcome:
    """What an answer's generator returns."""

    tokens: list[int]
    method: str
    search: SearchResult | None = None  # a RAIN answer's search
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


class Answer:
    """An answer in flight (a scheduler `Job`): its generator of calls, its own compute, and how
    it turns into a `Generation`. `method`: rain, vanilla or best-of-n."""

    def __init__(self, setup: Setup):
        self.setup = setup
        self.key = setup.key
        self.compute = Compute()
        self.env: RainEnv | None = None
        self.search: RainSearch | None = None
        self.decoding: SampleRows | None = None  # a vanilla answer's one request
        self.steps: Steps
        if setup.best_of_n is not None:
            self.method, self.steps = "best-of-n", best_of_n_steps(setup, setup.best_of_n, self.compute)
        elif setup.cfg.method == "vanilla":
            self.decoding = SampleRows(setup.key, "generate", setup.context,
                                       [Row(setup.cfg.max_new_tokens, 1.0, 0, greedy=True)])
            self.method, self.steps = "vanilla", vanilla_steps(setup, self.decoding)
        else:
            self.env = RainEnv(setup, self.compute, setup.progress)
            self.search = RainSearch(self.env, setup.cfg, trace=setup.trace)
            self.method, self.steps = "rain", rain_steps(self.env, self.search)
        self.started = time.perf_counter()
        self.peak = 1
        self.share = 0.0

    def join(self, templates: Templates) -> None:
        """Joining a scheduler: the evaluation template's constant part is kept cached from now on;
        where an earlier answer left it cached, it is no work of this one (least work)."""
        s = self.setup
        if s.constant is not None and isinstance(s.evaluator, ModelJudge):
            s.constant_cached = templates.keep(s.evaluator.backend, s.constant)
            self.compute.least.add(s.constant, count=not s.constant_cached)
        self.started = time.perf_counter()

    def backends(self) -> list[Backend]:
        """The backends this answer may keep cache entries on (released when it ends)."""
        s = self.setup
        found = [s.policy] + ([s.evaluator.backend] if isinstance(s.evaluator, ModelJudge) else [])
        return list({id(b): b for b in found}.values())

    def note_step(self, in_flight: int, seconds: float) -> None:
        """`peak`: the most answers in flight beside it; `share`: an even share of each step's time."""
        self.peak = max(self.peak, in_flight)
        self.share += seconds / in_flight

    def committed(self) -> list[int]:
        """The tokens committed so far: a RAIN search never revises them, and greedy decoding
        (vanilla) keeps every token it decodes (as far as its backend tells: `partial`)."""
        if self.search is not None:
            return list(self.search.answer)
        if self.method == "vanilla" and self.decoding is not None:
            return self.setup.policy.decoded(self.decoding) or []
        return []

    def stop(self) -> Generation:
        """What the answer is if it ends now: the committed tokens and the search so far."""
        if self.search is None:  # vanilla: what it decoded; best-of-n: nothing before it finishes
            return self.finish(Outcome(self.committed(), self.method))
        result = SearchResult(tuple(self.search.answer), self.search.stats, [])
        return self.finish(Outcome(self.committed(), self.method, result,
                                   self.env.value_cache_hits if self.env else 0))

    def finish(self, outcome: Outcome) -> Generation:
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
def vanilla_steps(setup: Setup, request: SampleRows) -> Steps:
    """Greedy decoding of the whole answer: `request` (made by the answer, which reads its tokens so
    far from the backend while it runs)."""
    (samples,) = yield [(setup.policy, request)]
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
    samples: list[Sample] = []
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
