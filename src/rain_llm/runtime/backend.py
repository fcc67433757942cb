"""The backend interface: all the scheduler may ask of a model. Token ids in, numbers out.

A backend takes lists of requests (`submit`) and hands back completions as they come (`run`),
each with its result and a `Receipt` of the work it caused. Five kinds of request:

    Prefill    cache contexts (prompts, evaluation prompts) before they are used   -> None
    SampleRows decode rows after a context, each with its own sampling and stop rule -> [Sample]
    TopTokens  the n most likely next tokens after a context, with their logits      -> [(id, logit)]
    Score      probabilities of given token ids after prefix + each suffix          -> array
    Embed      sentence embeddings of texts                                          -> array

plus cache retention per answer (`retain` / `release`), which a backend without a cache of its
own may ignore. The scheduler runs a round as one `run(kind)` per kind in `KINDS` order, so a
local engine can batch every answer's work of a kind into one forward, and a remote one can
keep requests in flight concurrently and report them as they finish (`wait` blocks until one
does). Implementations: `rain_llm.engine.hf.HFBackend` (transformers, in process) and the
sentence embedder (`rain_llm.values.embedder.EmbedderBackend`).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from rain_llm.runtime.accounting import Receipt

PREFILL, SAMPLE, SCORE, EMBED = "prefill", "sample", "score", "embed"
KINDS = (PREFILL, SAMPLE, SCORE, EMBED)  # a round's order: an answer may go through several in one round


@dataclass(frozen=True)
class TextStop:
    """Stop a row once its text ends with one of `chars` or contains one of `markers`; the text is
    decoded after `lookbehind` (the tokens before the row), so word boundaries read right."""

    chars: str = ""
    markers: tuple[str, ...] = ()
    lookbehind: tuple[int, ...] = ()


@dataclass(frozen=True)
class Row:
    """How one row of a batched decode samples and when it stops (besides a stop token)."""

    max_tokens: int
    temperature: float = 1.0
    top_k: int = 0  # 0: the whole vocabulary
    greedy: bool = False
    stop: TextStop | None = None


@dataclass
class Sample:
    """One decoded row: its tokens and their log-probability under the row's sampling rule."""

    tokens: list[int]
    logprob: float


@dataclass(eq=False)
class ModelRequest:
    """What every request carries: the answer that asked (`owner`) and the phase it books."""

    owner: Hashable
    phase: str

    kind = ""


@dataclass(eq=False)
class Prefill(ModelRequest):
    contexts: list[list[int]] = field(default_factory=list)

    kind = PREFILL


@dataclass(eq=False)
class SampleRows(ModelRequest):
    """Rows after `context`; row r draws its step-s token with `uniforms[r, s]` (inverse CDF), so a
    row gives the same tokens alone or in any batch. None: the backend draws them."""

    context: list[int] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    uniforms: np.ndarray | None = None

    kind = SAMPLE


@dataclass(eq=False)
class TopTokens(ModelRequest):
    """The n most likely next tokens after `context`, most likely first (ties: lower id first), with
    their logits (any per-context constant may be added: a softmax over any subset is exact)."""

    context: list[int] = field(default_factory=list)
    n: int = 1

    kind = SAMPLE


@dataclass(eq=False)
class Score(ModelRequest):
    """Probabilities of `option_ids` after prefix + each suffix: an array (suffixes, options)."""

    prefix: list[int] = field(default_factory=list)
    suffixes: list[list[int]] = field(default_factory=list)
    option_ids: tuple[int, ...] = ()

    kind = SCORE


@dataclass(eq=False)
class Embed(ModelRequest):
    texts: list[str] = field(default_factory=list)

    kind = EMBED


@dataclass
class Completion:
    request: ModelRequest
    result: Any
    receipt: Receipt


def asked(request: ModelRequest, result: Any) -> list[Sequence[int]]:
    """The token sequences whose logits a request needed: what it adds to the least work."""
    if isinstance(request, Prefill):
        return list(request.contexts)
    if isinstance(request, SampleRows):
        return [request.context] + [request.context + s.tokens[:-1] for s in result]
    if isinstance(request, TopTokens):
        return [request.context]
    if isinstance(request, Score):
        return [request.prefix + suffix for suffix in request.suffixes]
    return []


class Backend(Protocol):
    """A model behind lists of requests. See the module docstring."""

    name: str  # which engine ran: stats say so
    context_window: int

    def submit(self, requests: Sequence[ModelRequest]) -> None:
        """Queue requests (a remote backend sends them at once)."""

    def run(self, kind: str, *, whole: bool = False) -> list[Completion]:
        """Do this round's work of one kind; the requests (of any kind) completed meanwhile.
        whole=True: finish every queued request of the kind first (whole-iteration lockstep)."""

    def busy(self) -> bool:
        """Whether requests are queued or in flight."""

    def wait(self, timeout: float) -> None:
        """Block until a request completes or `timeout` passes (a local backend returns at once)."""

    def cancel(self, owner: Hashable) -> None:
        """Drop an answer's queued and running requests."""

    def retain(self, owner: Hashable, prefixes: Sequence[Sequence[int]], *, exact: bool = False,
               prune: bool = True) -> None:
        """What `owner` keeps cached from now on (replacing what it kept before); anything no live
        owner keeps may be freed (not yet with prune=False). exact=True keeps the prefixes
        themselves, not what extends them. A `Prefill` keeps its contexts for its owner."""

    def release(self, owner: Hashable) -> None:
        """`owner` is done: what only it kept may go at the next `retain`."""

    def scope(self, *, reuse_cache: bool | None = None) -> Backend:
        """The same model with a cache of its own (a judge must not touch the searches' cache);
        reuse_cache=False: one that reuses nothing across requests (to measure what reuse saves)."""


def run_requests(backend: Backend, requests: Sequence[ModelRequest], compute: Any = None) -> list[Any]:
    """Results of a few requests answered together, in order: for work outside a search (judges,
    self-evaluation checks; `compute`, a `Compute`, is charged their receipts). Answers go
    through the scheduler."""
    backend.submit(requests)
    results: dict[int, Any] = {}
    while len(results) < len(requests):
        done = [c for kind in KINDS for c in backend.run(kind, whole=True)]
        for completion in done:
            results[id(completion.request)] = completion.result
            if compute is not None:
                compute.charge(completion.receipt)
                compute.asked(asked(completion.request, completion.result))
        if not done:
            if not backend.busy():
                raise RuntimeError("backend bug: requests lost")
            backend.wait(1.0)
    return [results[id(r)] for r in requests]
