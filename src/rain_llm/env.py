"""`ModelEnv`: the search's view of one prompt on one engine (the `SearchEnv` functions).

Turns token-level requests of the search into engine calls, in phases that the engine counts:
expand (candidate token sets), simulate (rollout to the next punctuation mark), evaluate
(self-evaluation), embed (sentence embeddings for similarity updates).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from .config import RainConfig
from .embedder import MiniLMEmbedder
from .engine.base import Engine, Row, Sample
from .prompts import PromptFormat
from .search import Tokens
from .values import Evaluator


class ModelEnv:
    def __init__(self, engine: Engine, evaluator: Evaluator, embedder: MiniLMEmbedder,
                 context: list[int], fmt: PromptFormat, config: RainConfig):
        self.engine = engine
        self.evaluator = evaluator
        self.embedder = embedder
        self.context = context
        self.fmt = fmt
        self.cfg = config
        self.values: dict[Tokens, float] = {}  # official: values cached by text (dic)
        self.started = time.perf_counter()
        self.value_cache_hits = 0
        self.eval_engine = getattr(evaluator, "engine", None)  # None: the value needs no model of ours
        with engine.counters.phase("prefill"):  # the prompt and the evaluation prompt, once
            engine.next_logits(context)
            for ids in evaluator.retain("") if self.eval_engine is not None else []:
                self.eval_engine.next_logits(ids)

    def text(self, answer: Sequence[int]) -> str:
        return self.fmt.clean(self.engine.decode(answer))

    # ------------------------------------------------------------------ SearchEnv
    def expand(self, answer: Tokens, length: int, n: int, attempts: int) -> tuple[list[tuple[Tokens, float]], Tokens]:
        """Candidates and the rollout in one batch: the rollout is one more row of the
        expansion's decode, with its own sampling rule (full distribution) and stop rule."""
        length = self._clip(answer, length)
        rollout_row = self._rollout_row(answer)
        if length == 1 or rollout_row is None:
            candidates = self.propose(answer, length, n, attempts)
            return candidates, self.rollout(answer) if rollout_row is not None else ()
        cfg = self.cfg
        rows = [Row(length, cfg.temperature, cfg.top_k, greedy=True)]
        rows += [Row(length, cfg.temperature, cfg.top_k) for _ in range(attempts)]
        with self.engine.counters.phase("expand"):
            samples = self.engine.decode_rows(self.context + list(answer), rows + [rollout_row])
        return self._candidates(samples[:-1], n), tuple(samples[-1].tokens)

    def propose(self, answer: Tokens, length: int, n: int, attempts: int) -> list[tuple[Tokens, float]]:
        cfg = self.cfg
        length = self._clip(answer, length)
        ctx = self.context + list(answer)
        with self.engine.counters.phase("expand"):
            if length == 1:  # official: the top-k tokens with their probabilities (no sampling)
                logits = self.engine.next_logits(ctx).astype(np.float64) / cfg.temperature
                top = np.argsort(-logits, kind="stable")[:n]
                p = np.exp(logits[top] - logits[top].max())
                p /= p.sum()
                return [((int(t),), float(pt)) for t, pt in zip(top, p)]
            samples = self.engine.sample(ctx, 1 + attempts, length, temperature=cfg.temperature,
                                         top_k=cfg.top_k, greedy_first=True)
        return self._candidates(samples, n)

    def _clip(self, answer: Tokens, length: int) -> int:
        return max(1, min(length, self.cfg.max_new_tokens - len(answer)))

    @staticmethod
    def _candidates(samples: list[Sample], n: int) -> list[tuple[Tokens, float]]:
        """Greedy first, then distinct samples (official group_getp)."""
        greedy = samples[0]
        seen = {tuple(greedy.tokens)}
        others: list[tuple[Tokens, float]] = []
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

    def _rollout_row(self, answer: Tokens) -> Row | None:
        """The simulation's decode rule, or None where the answer already ends a clause."""
        if self._ends_clause(self.engine.decode(answer)):
            return None
        tail = list(answer[-8:])
        return Row(self.cfg.max_rollout_tokens, self.cfg.rollout_temperature, 0,
                   done=lambda tokens: self._ends_clause(self.engine.decode(tail + tokens)))

    def rollout(self, answer: Tokens) -> Tokens:
        row = self._rollout_row(answer)
        if row is None:
            return ()
        with self.engine.counters.phase("simulate"):
            return tuple(self.engine.decode_rows(self.context + list(answer), [row])[0].tokens)

    def _ends_clause(self, text: str) -> bool:
        return (bool(text) and text[-1] in self.cfg.rollout_stop_chars) or self.fmt.ended(text)

    def value(self, answer: Tokens) -> float:
        if answer in self.values:
            self.value_cache_hits += 1
            return self.values[answer]
        counters = (self.eval_engine or self.engine).counters
        with counters.phase("evaluate"):
            v = self.evaluator.value(self.text(answer))
        self.values[answer] = v
        return v

    def embed(self, spans: Sequence[Tokens]) -> np.ndarray:
        with self.embedder.counters.phase("embed"):
            return self.embedder.embed([self.engine.decode(s) for s in spans])

    def is_terminal(self, answer: Tokens) -> bool:
        if len(answer) >= self.cfg.max_new_tokens:
            return True
        if answer and answer[-1] in self.engine.stop_ids:
            return True
        return self.fmt.ended(self.engine.decode(answer[-16:]))

    def decode(self, tokens: Tokens) -> str:
        return self.engine.decode(tokens)

    def over_budget(self) -> bool:
        cfg = self.cfg
        if cfg.max_search_tokens and self.engine.counters.total().tokens >= cfg.max_search_tokens:
            return True
        return bool(cfg.max_search_seconds) and time.perf_counter() - self.started >= cfg.max_search_seconds

    def complete(self, answer: Tokens) -> Tokens:
        with self.engine.counters.phase("generate"):
            return tuple(self.engine.generate(self.context + list(answer), self.cfg.max_new_tokens - len(answer)))

    def on_commit(self, answer: Tokens) -> None:
        """Free cached KV that no longer extends the committed answer (bounded memory)."""
        keep = self.evaluator.retain(self.text(answer))
        if self.eval_engine is self.engine:
            self.engine.retain([self.context + list(answer), *keep])
        else:
            self.engine.retain([self.context + list(answer)])
            if self.eval_engine is not None:
                self.eval_engine.retain(keep)
