"""The backend interface: what the scheduler hands a model to execute. Token ids in, numbers out.

The scheduler decides (`runtime/scheduler.py`): which requests start in a step, how long a scoring
request waits for company, what fails when a request fails. A backend only executes: each step the
scheduler calls `execute(Batch(kind, start))` once per kind, and the backend runs that kind's work
over the requests started now and those still running, and hands back a `Completion` for every
request that finished, each with its result (or the `EngineError` that failed it alone) and its
`Receipt`. Five kinds of request:

    Prefill    cache contexts (prompts, evaluation prompts) before they are used   -> None
    SampleRows decode rows after a context, each with its own sampling and stop rule -> [Sample]
    TopTokens  the n most likely next tokens after a context, with their logits      -> [(id, logit)]
    Score      probabilities of given token ids after prefix + each suffix          -> array
    Embed      sentence embeddings of texts                                          -> array

plus cache retention per answer (`retain` / `release`), which a backend without a cache of its
own ignores. A local engine runs a kind's work in `execute` (one decode forward for every row in
flight, one scoring batch); a remote one sends what starts and returns what has come back, waiting
up to `Batch.wait` seconds for something when the scheduler has nothing else to do.
Implementations: `rain_llm.engine.hf.HFBackend` (transformers, in process),
`rain_llm.engine.vllm.VLLMBackend` (vLLM servers) and the sentence embedder
(`rain_llm.values.embedder.EmbedderBackend`).
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np

from rain_llm.config import RainConfig
from rain_llm.errors import EngineError
from rain_llm.runtime.accounting import Receipt

PREFILL, SAMPLE, SCORE, EMBED = "prefill", "sample", "score", "embed"
KINDS = (PREFILL, SAMPLE, SCORE, EMBED)  # a step's order: an answer may go through several in one step

_REQUEST_IDS = itertools.count()


class Status(enum.Enum):
    """Where a request is: queued by the scheduler, running on its backend, or over."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"


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
    """What every request carries: the answer that asked (`owner`), the phase it books, its id,
    its status (the scheduler's) and its receipt (filled by the backend that runs it)."""

    owner: Hashable
    phase: str
    id: int = field(default_factory=lambda: next(_REQUEST_IDS), init=False)
    status: Status = field(default=Status.WAITING, init=False)
    receipt: Receipt = field(init=False)

    kind: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.receipt = Receipt(self.phase)


@dataclass(eq=False)
class Prefill(ModelRequest):
    contexts: list[list[int]] = field(default_factory=list)

    kind: ClassVar[str] = PREFILL


@dataclass(eq=False)
class SampleRows(ModelRequest):
    """Rows after `context`; row r draws its step-s token with `uniforms[r, s]` (inverse CDF), so a
    row gives the same tokens alone or in any batch. None: the backend draws them."""

    context: list[int] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    uniforms: np.ndarray | None = None

    kind: ClassVar[str] = SAMPLE


@dataclass(eq=False)
class TopTokens(ModelRequest):
    """The n most likely next tokens after `context`, most likely first (ties: lower id first), with
    their logits (any per-context constant may be added: a softmax over any subset is exact)."""

    context: list[int] = field(default_factory=list)
    n: int = 1

    kind: ClassVar[str] = SAMPLE


@dataclass(eq=False)
class Score(ModelRequest):
    """Probabilities of `option_ids` after prefix + each suffix: an array (suffixes, options)."""

    prefix: list[int] = field(default_factory=list)
    suffixes: list[list[int]] = field(default_factory=list)
    option_ids: tuple[int, ...] = ()

    kind: ClassVar[str] = SCORE


@dataclass(eq=False)
class Embed(ModelRequest):
    texts: list[str] = field(default_factory=list)

    kind: ClassVar[str] = EMBED


@dataclass
class Completion:
    """A request that is over: its result, or the error that failed it (and it alone)."""

    request: ModelRequest
    result: Any = None
    error: EngineError | None = None


@dataclass
class Batch:
    """One step's work of one kind on one backend: the requests the scheduler starts now (the
    backend keeps running those it started before), and how long a remote backend may wait for a
    completion (the scheduler sets it only when nothing else can move)."""

    kind: str
    start: list[ModelRequest] = field(default_factory=list)
    wait: float = 0.0


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
    """A model that executes batches of requests. See the module docstring."""

    @property
    def name(self) -> str:
        """Which engine ran: stats say so."""
        ...

    @property
    def context_window(self) -> int: ...

    @property
    def reuse_cache(self) -> bool:
        """Whether work is kept and reused across requests."""
        ...

    @property
    def batches_in_flight(self) -> bool:
        """True: the engine batches whatever is in flight by itself (a server with continuous
        batching), so requests should reach it at once; False: a step's batch is what runs
        together, so a scoring request may wait for company."""
        ...

    def execute(self, batch: Batch) -> list[Completion]:
        """Start `batch.start`, run this step's work of `batch.kind`; every request (of any kind)
        that finished meanwhile."""
        ...

    def cancel(self, requests: Sequence[ModelRequest]) -> None:
        """Drop requests that run no longer (their answer left): no completion comes for them."""
        ...

    def decoded(self, request: SampleRows) -> list[int] | None:
        """The tokens a running request's first row has decoded so far, where the engine can tell
        (streaming a vanilla answer); None where it cannot."""
        ...

    def refusal(self, cfg: RainConfig) -> str | None:
        """Why this engine would refuse an answer with these settings (one line naming the setting
        and what would allow it), or None: checked before an answer starts."""
        ...

    def health(self) -> str | None:
        """None while the engine answers; else why not, in one line."""
        ...

    def retain(self, owner: Hashable, prefixes: Sequence[Sequence[int]], *, exact: bool = False,
               prune: bool = True) -> None:
        """What `owner` keeps cached from now on (replacing what it kept before); anything no live
        owner keeps may be freed (not yet with prune=False). exact=True keeps the prefixes
        themselves, not what extends them. A `Prefill` keeps its contexts for its owner."""
        ...

    def release(self, owner: Hashable) -> None:
        """`owner` is done: what only it kept may go at the next `retain`."""
        ...

    def scope(self, *, reuse_cache: bool | None = None) -> Backend:
        """The same model with a cache of its own (a judge must not touch the searches' cache);
        reuse_cache=False: one that reuses nothing across requests (to measure what reuse saves)."""
        ...


Call = tuple[Backend, ModelRequest]  # a request and the backend that should run it
