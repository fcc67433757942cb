"""What one answer needs before it starts (`Setup`), and the two kinds of value that steer it.

A value is either judged by a model (`ModelJudge`: it builds a scoring request that its backend
answers, and reads the value from the probabilities) or computed at once (`DirectValue`: a lexicon,
a reward model run in the process, any Python function). `evaluate` is the one place that tells
them apart.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from rain_llm.config import RainConfig
from rain_llm.runtime.backend import Backend, Call, Score
from rain_llm.runtime.prompts import PromptFormat
from rain_llm.runtime.text import Codec
from rain_llm.search import SearchStatus

ProgressFn = Callable[[SearchStatus], None]  # the search's live status, after each round


@runtime_checkable
class ModelJudge(Protocol):
    """A value read from a model: `backend` scores `request(response)`; `value_from` reads it."""

    backend: Backend

    def request(self, response: str, owner: Hashable = None) -> Score: ...

    def value_from(self, p: np.ndarray) -> float: ...

    def retain(self, response: str) -> list[list[int]]:
        """Token prefixes worth keeping cached after this response is committed."""
        ...

    def constant_ids(self) -> list[int]:
        """The part of its prompt no prompt or answer changes (kept cached across answers)."""
        ...


class DirectValue(Protocol):
    """A value computed at once, without the scheduler (lexicons, in-process reward models, functions)."""

    def value(self, response: str) -> float: ...


Evaluator = ModelJudge | DirectValue


@dataclass
class Setup:
    """Everything one answer needs, checked before it starts (`Rain` prepares it)."""

    key: Hashable
    cfg: RainConfig
    fmt: PromptFormat
    context: list[int]  # the rendered prompt
    policy: Backend
    codec: Codec
    evaluator: Evaluator | None = None  # what values a text (RAIN, best-of-n)
    embedder: Backend | None = None
    constant: list[int] | None = None  # the evaluation template's constant ids, kept cached across answers
    constant_cached: bool = False  # an earlier answer left it cached: not part of this answer's least work
    trace: bool = False
    progress: ProgressFn | None = None
    best_of_n: int | None = None
    best_of_n_tokens: int | None = None  # sample until about this many LM tokens are processed (compute match)

    def text(self, tokens: Sequence[int]) -> str:
        return self.fmt.clean(self.codec.decode(tokens))


def evaluate(owner: Hashable, evaluator: Evaluator | None,
             texts: list[str]) -> Generator[list[Call], list[Any], list[float]]:
    """Values of answer texts: one scoring request each to the judging model, or the value
    computed at once where no model judges (lexicons, callables, reward models)."""
    if evaluator is None:
        raise ValueError("no evaluator bound: RAIN and best-of-n need a value")
    if not isinstance(evaluator, ModelJudge):
        return [evaluator.value(text) for text in texts]
    judge: ModelJudge = evaluator
    probs = yield [(judge.backend, judge.request(text, owner)) for text in texts]
    return [judge.value_from(p) for p in probs]
