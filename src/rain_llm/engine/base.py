"""The engine interface: what the rest of rain-llm asks of a language model.

Token ids in, numpy/python out: no framework types cross this line, so a remote server can
be a backend as well as transformers. Every backend counts its forward passes and processed
tokens per phase, so a search can report what it cost.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np

T = TypeVar("T")
PHASES = ("prefill", "expand", "simulate", "evaluate", "embed", "generate")


@dataclass
class PhaseCount:
    forward_passes: int = 0
    tokens: int = 0  # token positions run through the model (batch rows x new positions)
    seconds: float = 0.0


class LeastWork:
    """The least work a search could have done: every distinct token position it asked the model
    about (contexts whose logits it needed, rows it decoded, prompts it scored), each processed
    once. Set beside the tokens actually processed, it shows the waste."""

    def __init__(self) -> None:
        self.root: dict[int, dict] = {}
        self.tokens = 0

    def add(self, sequence: Sequence[int], *, count: bool = True) -> None:
        """Note positions the search asked about; `count=False` for ones cached by an earlier answer."""
        node = self.root
        for token in sequence:
            child = node.get(token)
            if child is None:
                child = node[token] = {}
                self.tokens += int(count)
            node = child


class Counters:
    """Forward passes, tokens processed and wall time, per phase; and the least work possible."""

    def __init__(self) -> None:
        self.phases: dict[str, PhaseCount] = {}
        self.current = "prefill"
        self.least = LeastWork()

    def add(self, rows: int, positions: int) -> None:
        count = self.phases.setdefault(self.current, PhaseCount())
        count.forward_passes += 1
        count.tokens += rows * positions

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        previous, self.current = self.current, name
        start = time.perf_counter()
        try:
            yield
        finally:
            count = self.phases.setdefault(name, PhaseCount())
            count.seconds += time.perf_counter() - start
            self.current = previous

    def merge(self, other: Counters) -> None:
        for name, c in other.phases.items():
            mine = self.phases.setdefault(name, PhaseCount())
            mine.forward_passes += c.forward_passes
            mine.tokens += c.tokens
            mine.seconds += c.seconds

    def reset(self) -> None:
        self.phases.clear()
        self.least = LeastWork()

    def total(self) -> PhaseCount:
        total = PhaseCount()
        for c in self.phases.values():
            total.forward_passes += c.forward_passes
            total.tokens += c.tokens
            total.seconds += c.seconds
        return total

    def to_dict(self) -> dict[str, dict[str, float]]:
        out = {name: {"forward_passes": c.forward_passes, "tokens": c.tokens, "seconds": round(c.seconds, 4)}
               for name, c in sorted(self.phases.items())}
        t = self.total()
        out["total"] = {"forward_passes": t.forward_passes, "tokens": t.tokens}
        if self.least.tokens:
            out["least_work"] = {"tokens": self.least.tokens}
        return out


def split(items: Sequence[T], sizes: Sequence[int]) -> list[Sequence[T]]:
    """Consecutive slices of `items` of the given sizes (a batch's rows back to their requests)."""
    out, start = [], 0
    for size in sizes:
        out.append(items[start:start + size])
        start += size
    return out


@dataclass
class Sample:
    """One sampled token sequence and its log-probability under the sampling distribution."""

    tokens: list[int]
    logprob: float


@dataclass
class Row:
    """How one row of a batched decode samples and when it stops."""

    max_tokens: int
    temperature: float = 1.0
    top_k: int = 0  # 0: the whole vocabulary
    greedy: bool = False
    done: Callable[[list[int]], bool] | None = None  # extra stop rule on the row's tokens so far


class Engine(Protocol):
    """A causal LM seen as token ids. Implementations: `rain_llm.engine.hf.HFEngine`."""

    counters: Counters
    context_window: int
    stop_ids: frozenset[int]

    def encode(self, text: str, *, special: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def next_logits(self, context: Sequence[int]) -> np.ndarray:
        """Next-token logits (float32, vocabulary-sized) after `context`."""

    def prefill_many(self, contexts: Sequence[Sequence[int]], owners: Sequence[Counters | None] | None = None) -> None:
        """Cache several contexts at once (a backend without a cache may do nothing)."""

    def decode_rows(self, context: Sequence[int], rows: Sequence[Row],
                    uniforms: np.ndarray | None = None) -> list[Sample]:
        """Rows with their own sampling and stop rules, decoded as one batch over `context`."""

    def decode_groups(self, requests: Sequence[tuple[Sequence[int], Sequence[Row], np.ndarray | None]],
                      owners: Sequence[Counters | None] | None = None) -> list[list[Sample]]:
        """`decode_rows` for several (context, rows, uniforms) in one batch; `owners[i]`, if
        given, is charged request i's work as well as this engine's counters."""

    def sample(self, context: Sequence[int], rows: int, length: int, *, temperature: float, top_k: int,
               greedy_first: bool, uniforms: np.ndarray | None = None) -> list[Sample]:
        """`rows` continuations of up to `length` tokens, sampled as one batch over the shared
        context (row 0 greedy if `greedy_first`). A row ends after a stop token."""

    def rollout(self, context: Sequence[int], max_tokens: int, *, temperature: float,
                done: Callable[[list[int]], bool]) -> list[int]:
        """Sample one continuation until `done(tokens)` or a stop token or `max_tokens`."""

    def score_options(self, prefix: Sequence[int], suffixes: Sequence[Sequence[int]],
                      option_ids: Sequence[int]) -> np.ndarray:
        """Probabilities of `option_ids` after prefix + each suffix, shape (suffixes, options)."""

    def score_many(self, requests: Sequence[tuple[Sequence[int], Sequence[Sequence[int]], Sequence[int]]],
                   owners: Sequence[Counters | None] | None = None) -> list[np.ndarray]:
        """`score_options` for several (prefix, suffixes, option_ids) in one batch."""

    def generate(self, context: Sequence[int], max_tokens: int, *, temperature: float = 0.0) -> list[int]:
        """Plain decoding (greedy at temperature 0) until a stop token or `max_tokens`."""

    def retain(self, prefixes: Sequence[Sequence[int]], owner: Hashable | None = None, *,
               exact: bool = False) -> None:
        """Free cached work that extends none of `prefixes` (nor what other live owners retain);
        exact=True keeps the prefixes themselves, not what extends them."""

    def claim(self, prefixes: Sequence[Sequence[int]], owner: Hashable, *, exact: bool = False) -> None:
        """Register what `owner` keeps, freeing nothing yet."""

    def release(self, owner: Hashable) -> None:
        """Forget what `owner` retained."""

    def reset(self) -> None:
        """Drop all cached work."""
