"""RAIN's requests made concrete for one answer: `RainEnv` turns the search's token-level requests
(`rain_llm.search.requests`) into backend calls.

It adds the prompt; builds the candidate and rollout rows with this answer's own random stream (so
an answer is the same alone or in any batch); renders the self-evaluation prompts and caches values;
reads the results back as the search wants them; keeps cached what a commit keeps; and answers the
search's checkpoints with the answer's compute budget.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Sequence
from typing import Any

import numpy as np

from rain_llm.runtime.accounting import Compute
from rain_llm.runtime.backend import (
    Backend,
    Call,
    Embed,
    ModelRequest,
    Prefill,
    Row,
    Sample,
    SampleRows,
    TextStop,
    TopTokens,
)
from rain_llm.runtime.prompts import TURN_MARKER
from rain_llm.runtime.setup import ModelJudge, ProgressFn, Setup, evaluate
from rain_llm.search import (
    Candidates,
    Checkpoint,
    Commit,
    Complete,
    EmbedSpans,
    Expand,
    ExpandJob,
    Expansion,
    Propose,
    SearchRequest,
    Tokens,
    Value,
)


class RainEnv:
    """The search's view of one prompt (`SearchEnv`: two pure functions), and what its requests
    mean for this answer's backends (`serve`)."""

    def __init__(self, setup: Setup, compute: Compute, progress: ProgressFn | None = None):
        self.setup = setup
        self.key = setup.key
        self.cfg = setup.cfg
        self.codec = setup.codec
        self.context = setup.context
        self.compute = compute
        self.evaluator = setup.evaluator
        self.progress = progress
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

    def decode(self, tokens: Tokens) -> str:
        return self.codec.decode(tokens)

    def over_budget(self) -> bool:
        """Whether this answer's compute budget (LM tokens processed, seconds) is spent."""
        cfg = self.cfg
        if cfg.max_search_tokens and self.compute.budget_tokens >= cfg.max_search_tokens:
            return True
        return bool(cfg.max_search_seconds) and time.perf_counter() - self.started >= cfg.max_search_seconds

    def commit(self, answer: Tokens) -> None:
        """Keep cached only what extends the committed answer (and its evaluation prompt): bounded memory."""
        for backend, prefixes in self._kept(answer):
            backend.retain(self.key, prefixes)

    def _kept(self, answer: Tokens) -> list[tuple[Backend, list[list[int]]]]:
        kept: list[tuple[Backend, list[list[int]]]] = [(self.setup.policy, [self.context + list(answer)])]
        if isinstance(self.evaluator, ModelJudge):
            keep = self.evaluator.retain(self.text(answer))
            if self.evaluator.backend is self.setup.policy:
                kept[0][1].extend(keep)
            else:
                kept.append((self.evaluator.backend, keep))
        return kept

    def prefill_calls(self) -> list[Call]:
        """The prompt and the evaluation prompt up to the answer, once; a backend keeps what it
        prefilled for this answer until the answer commits or ends."""
        return [(backend, Prefill(self.key, "prefill", prefixes)) for backend, prefixes in self._kept(())]

    def text(self, answer: Sequence[int]) -> str:
        return self.setup.text(answer)

    # ------------------------------------------------------------------ requests
    def serve(self, request: SearchRequest) -> Generator[list[Call], list[Any], Any]:
        """Answer one search request: with backend calls (yielded as one list), or at once (a
        commit, a checkpoint)."""
        if isinstance(request, Commit):
            self.commit(request.answer)
            return None
        if isinstance(request, Checkpoint):
            if request.status is not None and self.progress is not None:
                self.progress(request.status)
            return self.over_budget()
        if isinstance(request, Expand):
            return (yield from self._expand(request.jobs))
        if isinstance(request, Propose):
            return (yield from self._propose(request.job))
        if isinstance(request, Value):
            return (yield from self._value(request.answers))
        if isinstance(request, EmbedSpans):
            texts = [self.codec.decode(span) for span in request.spans]
            if self.setup.embedder is None:
                raise ValueError("a RAIN answer needs a sentence embedder")
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
        calls: list[Call] = []
        plans: list[tuple[ExpandJob, int, bool]] = []
        for job in jobs:
            length = self._clip(job.answer, job.length)
            rollout = self._rollout_row(job.answer)
            ctx = self._ctx(job.answer)
            if length > 1:
                rows = self._candidate_rows(length, job.attempts)
                uniforms = self.uniforms(rows + ([rollout] if rollout else []))
                calls.append((self.setup.policy, SampleRows(self.key, "expand", ctx, rows, uniforms[:len(rows)])))
            else:
                uniforms = self.uniforms([rollout]) if rollout else np.zeros((0, 0))
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
        transcript), or None where the answer already ends a clause. It stops at the model's
        context window (the prompt and answer budget fit it; a rollout past the budget may not)."""
        room = min(self.cfg.max_rollout_tokens, self.setup.policy.context_window - len(self.context) - len(answer))
        if room < 1 or self._ends_clause(self.codec.decode(answer)):
            return None
        stop = TextStop(self.cfg.rollout_stop_chars, () if self.setup.fmt.chat else (TURN_MARKER,),
                        tuple(answer[-8:]))
        if self.cfg.rollout_temperature == 0:  # greedy rollouts: nothing is sampled but the candidates
            return Row(room, 1.0, 0, greedy=True, stop=stop)
        return Row(room, self.cfg.rollout_temperature, 0, stop=stop)

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
