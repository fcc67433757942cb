"""`HFBackend`: the transformers engine behind the backend interface (`rain_llm.runtime.backend`).

It executes what the scheduler starts, and decides nothing about when:
  prefill  the batch's contexts in one `encode_many` (a few forwards where lengths differ a lot);
  sample   the batch's `SampleRows` / `TopTokens` rows join the running `DecodeStream`, then one
           forward for every row in flight; a request completes as soon as its own rows are done;
  score    the batch's evaluation prompts in one scoring batch.
Each request's receipt holds its rows' share of the forwards it took part in and an even share of
the time of the calls that served it. A request the engine cannot run (an empty context, one
longer than the model's window) fails alone, before anything runs.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Sequence
from typing import cast

import numpy as np

from rain_llm.config import RainConfig
from rain_llm.engine.hf.engine import HFEngine, top_tokens
from rain_llm.engine.hf.stream import DecodeStream
from rain_llm.errors import EngineError, EngineRefused
from rain_llm.runtime.backend import (
    PREFILL,
    SAMPLE,
    SCORE,
    Batch,
    Completion,
    ModelRequest,
    Prefill,
    Row,
    SampleRows,
    Score,
    TopTokens,
)


class HFBackend:
    batches_in_flight = False  # a step's batch is what runs together

    def __init__(self, engine: HFEngine, name: str = "model"):
        self.engine = engine
        self.name = name
        self.context_window = engine.context_window
        self.stream = DecodeStream(engine)

    def scope(self, *, reuse_cache: bool | None = None) -> HFBackend:
        """The same model with a cache of its own (judges; answers that must not reuse the cache)."""
        return HFBackend(self.engine.scope(reuse_cache=reuse_cache), self.name)

    @property
    def reuse_cache(self) -> bool:
        return self.engine.reuse_cache

    # ------------------------------------------------------------------ the interface
    def execute(self, batch: Batch) -> list[Completion]:
        start = time.perf_counter()
        self.engine.touched = set()
        refused = {r.id: error for r in batch.start if (error := self._refusal(r)) is not None}
        done = [Completion(r, error=refused[r.id]) for r in batch.start if r.id in refused]
        requests = [r for r in batch.start if r.id not in refused]
        if batch.kind == PREFILL:
            done += self._prefill(requests)
        elif batch.kind == SAMPLE:
            done += self._sample(requests)
        elif batch.kind == SCORE:
            done += self._score(requests)
        self._share_time(time.perf_counter() - start, done)
        return done

    def cancel(self, requests: Sequence[ModelRequest]) -> None:
        for request in requests:
            self.stream.cancel(request)

    def refusal(self, cfg: RainConfig) -> str | None:
        """Nothing a setting can ask is beyond this engine (prompt lengths are checked per answer)."""
        return None

    def health(self) -> str | None:
        """In this process: it answers while the process does."""
        return None

    def decoded(self, request: SampleRows) -> list[int] | None:
        decoding = self.stream.requests.get(request)
        return list(decoding.tokens[0]) if decoding is not None else []

    def retain(self, owner: Hashable, prefixes: Sequence[Sequence[int]], *, exact: bool = False,
               prune: bool = True) -> None:
        if prune:
            self.engine.retain(owner, prefixes, exact=exact)
        else:
            self.engine.claim(owner, prefixes, exact=exact)

    def release(self, owner: Hashable) -> None:
        self.engine.release(owner)

    # ------------------------------------------------------------------ kinds
    def _refusal(self, request: ModelRequest) -> EngineError | None:
        """Why the engine cannot run `request` (it then fails alone), or None."""
        request.receipt.model = self.name
        if isinstance(request, Prefill):
            sequences = request.contexts
        elif isinstance(request, SampleRows | TopTokens):
            sequences = [request.context]
        elif isinstance(request, Score):
            if not request.prefix or not request.suffixes or not all(request.suffixes):
                return EngineRefused("evaluation prompt and its suffixes must not be empty")
            sequences = [request.prefix + s for s in request.suffixes]
        else:
            return EngineRefused(f"{type(request).__name__} is not a request for a language model")
        if not sequences or any(len(s) == 0 for s in sequences):
            return EngineRefused("empty context: nothing to condition on")
        longest = max(len(s) for s in sequences)
        if longest > self.context_window:
            return EngineRefused(f"a {request.phase} request of {longest} tokens exceeds the model's context window "
                                 f"of {self.context_window}")
        return None

    def _prefill(self, requests: list[ModelRequest]) -> list[Completion]:
        prefills = [r for r in requests if isinstance(r, Prefill)]
        for request in prefills:  # kept for its owner until the owner retains otherwise
            self.engine.claim(request.owner, request.contexts)
        if prefills and self.engine.reuse_cache:
            contexts = [(context, r.receipt) for r in prefills for context in r.contexts]
            self.engine.encode_many([c for c, _ in contexts], [r for _, r in contexts])
        return [Completion(r, None) for r in prefills]

    def _sample(self, requests: list[ModelRequest]) -> list[Completion]:
        for request in requests:
            if isinstance(request, SampleRows):
                self.stream.join(request, request.context, request.rows, request.uniforms, request.receipt)
            elif isinstance(request, TopTokens):  # one greedy token: the context's logits come with it
                self.stream.join(request, request.context, [Row(1, 1.0, 0, greedy=True)], None, request.receipt,
                                 want_logits=True)
        if not self.stream:
            return []
        done = []
        for key, decoded in self.stream.step().items():
            request = cast(ModelRequest, key)  # the stream is keyed by the requests themselves
            if isinstance(request, TopTokens):
                assert decoded.first_logits is not None
                done.append(Completion(request, top_tokens(decoded.first_logits, request.n)))
            else:
                done.append(Completion(request, decoded.samples()))
        return done

    def _score(self, requests: list[ModelRequest]) -> list[Completion]:
        scores = [r for r in requests if isinstance(r, Score)]
        if not scores:
            return []
        unique: dict[tuple[Hashable, tuple[int, ...], tuple[tuple[int, ...], ...], tuple[int, ...]], int] = {}
        batch: list[Score] = []  # one answer's same evaluation twice in a step: scored once
        keys = [(r.owner, tuple(r.prefix), tuple(map(tuple, r.suffixes)), tuple(r.option_ids)) for r in scores]
        for request, key in zip(scores, keys):
            if key not in unique:
                unique[key] = len(batch)
                batch.append(request)
        probs: list[np.ndarray] = self.engine.score_many(batch, [r.receipt for r in batch])
        return [Completion(r, probs[unique[key]]) for r, key in zip(scores, keys)]

    # ------------------------------------------------------------------ bookkeeping
    def _share_time(self, seconds: float, done: list[Completion]) -> None:
        """The call's time, split evenly among the requests it served (charged or completed)."""
        served = {id(r): r for r in self.engine.touched} | {id(c.request.receipt): c.request.receipt for c in done}
        for receipt in served.values():
            receipt.seconds += seconds / len(served)
