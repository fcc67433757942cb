"""`HFBackend`: the transformers engine behind the backend interface (`rain_llm.runtime.backend`).

It decides how requests share forwards:
  prefill  every queued context in one `encode_many` (a few forwards where lengths differ a lot);
  sample   rows of every `SampleRows` / `TopTokens` request in one `DecodeStream`: a round is one
           forward, and a request returns as soon as its own rows are done (`whole`: a round
           decodes until every row is done: whole-iteration lockstep, kept for comparison);
  score    evaluation prompts wait for company so that one scoring batch serves several answers:
           until half the searching answers wait, or one has waited `VALUE_WAIT` rounds, or no
           search decodes any more (`whole`: no waiting).
Each request's receipt holds its rows' share of the forwards it took part in and an even share
of the time of the calls that served it.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Sequence
from typing import Any

from rain_llm.engine.hf.engine import HFEngine, top_tokens
from rain_llm.engine.hf.stream import DecodeStream
from rain_llm.runtime.accounting import Receipt
from rain_llm.runtime.backend import (
    PREFILL,
    SAMPLE,
    SCORE,
    Completion,
    ModelRequest,
    Prefill,
    Row,
    SampleRows,
    Score,
    TopTokens,
)

PLAIN_PHASES = ("generate",)  # rows of answers that do not search: evaluations need not wait for them


class HFBackend:
    VALUE_WAIT = 4  # rounds an evaluation may wait for company (one forward serves all waiting)
    VALUE_SHARE = 0.5  # ... unless this share of the searching answers is waiting

    def __init__(self, engine: HFEngine, name: str = "model"):
        self.engine = engine
        self.name = name
        self.context_window = engine.context_window
        self.stream = DecodeStream(engine)
        self.receipts: dict[int, Receipt] = {}  # id(request) -> its receipt, while in flight
        self.owners: dict[int, ModelRequest] = {}  # id(request) -> request, while in flight
        self.prefills: list[Prefill] = []
        self.scores: list[Score] = []
        self.waited: dict[int, int] = {}  # rounds each queued evaluation has waited

    def scope(self, *, reuse_cache: bool | None = None) -> HFBackend:
        """The same model with a cache of its own (judges; answers that must not reuse the cache)."""
        return HFBackend(self.engine.scope(reuse_cache=reuse_cache), self.name)

    @property
    def reuse_cache(self) -> bool:
        return self.engine.reuse_cache

    # ------------------------------------------------------------------ the interface
    def submit(self, requests: Sequence[ModelRequest]) -> None:
        for request in requests:
            receipt = Receipt(request.phase, self.name)
            self.receipts[id(request)] = receipt
            self.owners[id(request)] = request
            if isinstance(request, Prefill):  # kept for its owner until the owner retains otherwise
                self.engine.claim(request.owner, request.contexts)
                self.prefills.append(request)
            elif isinstance(request, SampleRows):
                self.stream.join(request, request.context, request.rows, request.uniforms, receipt)
            elif isinstance(request, TopTokens):  # one greedy token: the context's logits come with it
                self.stream.join(request, request.context, [Row(1, 1.0, 0, greedy=True)], None, receipt,
                                 want_logits=True)
            elif isinstance(request, Score):
                self.scores.append(request)
            else:
                raise TypeError(f"{type(request).__name__} is not a request for a language model")

    def run(self, kind: str, *, whole: bool = False) -> list[Completion]:
        start = time.perf_counter()
        self.engine.touched = set()
        if kind == PREFILL:
            done = self._prefill()
        elif kind == SAMPLE:
            done = self._sample(whole)
        elif kind == SCORE:
            done = self._score(whole)
        else:
            return []
        self._share_time(time.perf_counter() - start, done)
        return done

    def busy(self) -> bool:
        return bool(self.receipts)

    def wait(self, timeout: float) -> None:
        """Nothing runs in the background here: work happens in `run`."""

    def cancel(self, owner: Hashable) -> None:
        for request in [r for r in self.owners.values() if r.owner == owner]:
            self.stream.cancel(request)
            self._forget(request)
        self.prefills = [r for r in self.prefills if id(r) in self.receipts]
        self.scores = [r for r in self.scores if id(r) in self.receipts]

    def partial(self, owner: Hashable) -> list[int] | None:
        """The tokens decoded so far by `owner`'s plain decoding (one "generate" row: a vanilla
        answer), or None where it has none in flight."""
        for request in self.owners.values():
            if request.owner == owner and isinstance(request, SampleRows) and request.phase in PLAIN_PHASES \
                    and len(request.rows) == 1:
                decoding = self.stream.requests.get(request)
                return list(decoding.tokens[0]) if decoding is not None else []
        return None

    def retain(self, owner: Hashable, prefixes: Sequence[Sequence[int]], *, exact: bool = False,
               prune: bool = True) -> None:
        if prune:
            self.engine.retain(owner, prefixes, exact=exact)
        else:
            self.engine.claim(owner, prefixes, exact=exact)

    def release(self, owner: Hashable) -> None:
        self.engine.release(owner)

    # ------------------------------------------------------------------ kinds
    def _prefill(self) -> list[Completion]:
        requests, self.prefills = self.prefills, []
        if requests and self.engine.reuse_cache:
            contexts = [(context, self.receipts[id(r)]) for r in requests for context in r.contexts]
            self.engine.encode_many([c for c, _ in contexts], [r for _, r in contexts])
        return [self._complete(r, None) for r in requests]

    def _sample(self, whole: bool) -> list[Completion]:
        done: list[Completion] = []
        while self.stream:
            for request, decoded in self.stream.step().items():
                if isinstance(request, TopTokens):
                    done.append(self._complete(request, top_tokens(decoded.first_logits, request.n)))
                else:
                    done.append(self._complete(request, decoded.samples()))
            if not whole:
                break
        return done

    def _score(self, whole: bool) -> list[Completion]:
        if not self.scores:
            return []
        for request in self.scores:
            self.waited[id(request)] = self.waited.get(id(request), 0) + 1
        if not whole and not self._scoring_due():
            return []
        requests, self.scores = self.scores, []
        for request in requests:
            del self.waited[id(request)]
        unique: dict[tuple, int] = {}  # one answer's same evaluation twice in a round: scored once
        batch: list[Score] = []
        keys = [(r.owner, tuple(r.prefix), tuple(map(tuple, r.suffixes)), tuple(r.option_ids)) for r in requests]
        for request, key in zip(requests, keys):
            if key not in unique:
                unique[key] = len(batch)
                batch.append(request)
        probs = self.engine.score_many(batch, [self.receipts[id(r)] for r in batch])
        return [self._complete(r, probs[unique[key]]) for r, key in zip(requests, keys)]

    def _scoring_due(self) -> bool:
        waiting = {r.owner for r in self.scores}
        decoding = {r.owner for r in self.stream.requests if r.phase not in PLAIN_PHASES}  # keyed by request
        searching = waiting | decoding
        return (not decoding or len(waiting) >= self.VALUE_SHARE * len(searching)
                or max(self.waited[id(r)] for r in self.scores) >= self.VALUE_WAIT)

    # ------------------------------------------------------------------ bookkeeping
    def _complete(self, request: ModelRequest, result: Any) -> Completion:
        receipt = self.receipts[id(request)]
        self._forget(request)
        return Completion(request, result, receipt)

    def _forget(self, request: ModelRequest) -> None:
        self.receipts.pop(id(request), None)
        self.owners.pop(id(request), None)
        self.waited.pop(id(request), None)

    def _share_time(self, seconds: float, done: list[Completion]) -> None:
        """The call's time, split evenly among the requests it served (charged or completed)."""
        served = {id(r): r for r in self.engine.touched} | {id(c.receipt): c.receipt for c in done}
        for receipt in served.values():
            receipt.seconds += seconds / len(served)
