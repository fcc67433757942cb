"""The one scheduler: any number of answers, RAIN or not, joining and leaving between rounds.

Every answer is a generator of call lists (`runtime.answers`). The scheduler submits each list to
the backends it names, and runs rounds: one `run(kind)` per backend for each kind in `KINDS`
order (prefill, sample, score, embed), so every answer's work of a kind shares a forward, and an
answer can move through several kinds in one round (its decode finishes, its evaluation is scored,
its embeddings computed, its next expansion queued). When all results of an answer's list are in,
its generator gets them and yields the next list, or finishes. Receipts are charged to the
answer that asked, with the least work its requests needed. One prompt is a batch of one:
`Rain.generate` runs this loop too.

schedule "token": a round decodes one token of every row in flight and returns each request when
its own rows are done; "round": a round finishes every queued request of a kind before the next
kind (whole-iteration lockstep, kept for comparison). Both give the same answers.
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from rain_llm.errors import RainError
from rain_llm.runtime.answers import Answer, Call, Generation
from rain_llm.runtime.backend import KINDS, Backend, Completion, asked

SCHEDULES = ("token", "round")
TEMPLATES = ("rain-llm", "templates")  # the owner of the kept template constants on every backend


class Templates:
    """The evaluation templates' constant parts (instructions, examples): kept cached on their
    backends across answers and batches, for as long as the `Rain` lives."""

    def __init__(self) -> None:
        self.kept: dict[int, tuple[Backend, list[list[int]]]] = {}

    def keep(self, backend: Backend, constant: list[int]) -> bool:
        """Keep `constant` cached on `backend`; whether an earlier answer already had it computed."""
        _, constants = self.kept.setdefault(id(backend), (backend, []))
        if constant in constants:
            return getattr(backend, "reuse_cache", True)
        constants.append(constant)
        backend.retain(TEMPLATES, constants, exact=True, prune=False)
        return False

    def free(self, backends: list[Backend]) -> None:
        """Drop what no live answer keeps on these backends (the constants stay)."""
        for backend in backends:
            backend.retain(TEMPLATES, self.kept.get(id(backend), (backend, []))[1], exact=True)


@dataclass
class _Waiting:
    """An answer's current call list: results as they come, in the list's order."""

    results: list[Any]
    left: int


class Scheduler:
    def __init__(self, templates: Templates, schedule: str = "token"):
        if schedule not in SCHEDULES:
            raise RainError(f"schedule must be 'token' or 'round', not {schedule!r}")
        self.templates = templates
        self.whole = schedule == "round"
        self.answers: dict[Hashable, Answer] = {}
        self.waiting: dict[Hashable, _Waiting] = {}
        self.slots: dict[int, tuple[Hashable, int]] = {}  # id(request) -> (answer, place in its list)
        self.backends: dict[int, Backend] = {}
        self.done: dict[Hashable, Generation] = {}  # finished without a round (returned by the next step)

    def __len__(self) -> int:
        return len(self.answers) + len(self.done)

    def __contains__(self, key: Hashable) -> bool:
        return key in self.answers or key in self.done

    def add(self, answer: Answer) -> None:
        """Start an answer: its first calls are queued for the next round."""
        if answer.key in self:
            raise RainError(f"answer {answer.key!r} is already in the batch")
        self.answers[answer.key] = answer
        answer.join(self.templates)
        for backend in answer.backends():
            self.backends[id(backend)] = backend
        if (generation := self._advance(answer.key, None)) is not None:  # no model call needed
            self.done[answer.key] = generation

    def step(self) -> dict[Hashable, Generation]:
        """One round; the answers that finished. Each answer's `seconds_shared` gets an even share
        of the round's wall time; `peak`, the most answers in flight beside it."""
        finished, self.done = self.done, {}
        running = list(self.answers.values())
        for answer in running:
            answer.peak = max(answer.peak, len(running))
        start = time.perf_counter()
        progressed = False
        for kind in KINDS:
            for backend in list(self.backends.values()):
                for completion in backend.run(kind, whole=self.whole):
                    progressed = True
                    self._deliver(completion, finished)
        if not progressed:  # nothing came back: a remote backend may still be working
            for backend in self.backends.values():
                if backend.busy():
                    backend.wait(0.05)
                    break
        elapsed = time.perf_counter() - start
        for answer in running:
            answer.share += elapsed / len(running)
        if finished:
            self.templates.free(list(self.backends.values()))
        return finished

    def run(self) -> dict[Hashable, Generation]:
        """Step until every answer is done."""
        out: dict[Hashable, Generation] = {}
        while self:
            out.update(self.step())
        return out

    def stop(self, key: Hashable) -> Generation | None:
        """End an answer now with what it has committed (a RAIN search never revises a commit;
        vanilla keeps what it decoded; best-of-n has committed nothing until it finishes)."""
        answer = self.answers.get(key)
        if answer is None:
            return self.done.pop(key, None)
        outcome = answer.partial()
        self.cancel(key)
        return answer.generation(outcome)

    def cancel(self, key: Hashable) -> None:
        """Drop an answer that is no longer wanted: its requests stop and its cache may go."""
        self.done.pop(key, None)
        answer = self.answers.pop(key, None)
        if answer is None:
            return
        self.waiting.pop(key, None)
        for request_id in [i for i, (owner, _) in self.slots.items() if owner == key]:
            del self.slots[request_id]
        for backend in self.backends.values():
            backend.cancel(key)
        answer.steps.close()
        self._release(answer)
        self.templates.free(list(self.backends.values()))

    # ------------------------------------------------------------------ plumbing
    def _deliver(self, completion: Completion, finished: dict[Hashable, Generation]) -> None:
        key, place = self.slots.pop(id(completion.request))
        answer = self.answers[key]
        answer.compute.charge(completion.receipt)
        answer.compute.asked(asked(completion.request, completion.result))
        waiting = self.waiting[key]
        waiting.results[place] = completion.result
        waiting.left -= 1
        if waiting.left == 0:
            del self.waiting[key]
            if (generation := self._advance(key, waiting.results)) is not None:
                finished[key] = generation

    def _advance(self, key: Hashable, reply: Any) -> Generation | None:
        """Send the answer its results; queue its next calls, or finish it."""
        answer = self.answers[key]
        while True:
            try:
                calls: list[Call] = answer.steps.send(reply)
            except StopIteration as stop:
                del self.answers[key]
                self._release(answer)
                return answer.generation(stop.value)
            if calls:
                break
            reply = []
        self.waiting[key] = _Waiting([None] * len(calls), len(calls))
        by_backend: dict[int, list] = {}
        for place, (backend, request) in enumerate(calls):
            self.slots[id(request)] = (key, place)
            self.backends.setdefault(id(backend), backend)
            by_backend.setdefault(id(backend), [backend, []])[1].append(request)
        for backend, requests in by_backend.values():
            backend.submit(requests)
        return None

    def _release(self, answer: Answer) -> None:
        for backend in answer.backends():
            backend.release(answer.key)
