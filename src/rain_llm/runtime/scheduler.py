"""The one scheduler: it decides, backends execute.

Every job (an answer: RAIN, vanilla or best-of-n; or a few requests outside any answer) is a
generator of call lists. The scheduler queues each list's requests, and each step it decides, per
backend and kind in `KINDS` order (prefill, sample, score, embed), which queued requests start, and
hands them to the backend as one `Batch` to execute. So every answer's work of a kind shares a
forward, and an answer can move through several kinds in one step (its decode finishes, its
evaluation is scored, its embeddings computed, its next expansion queued). When all results of a
job's list are in, its generator gets them and yields the next list, or finishes. Receipts are
charged to the answer that asked, with the least work its requests needed. One prompt is a batch
of one: `Rain.generate` runs this loop too.

Policy, all here:
  admission  every queued request of a kind starts at that kind's turn in the step (decode rows
             join the backend's running decode between forwards);
  scoring    on a backend whose step is its batch (a local engine), an evaluation waits for company,
             so that one scoring forward serves several answers: until half the searching answers
             wait, or one has waited `VALUE_WAIT` steps, or no search decodes any more; a backend
             that batches whatever is in flight (a server) gets it at once;
  waiting    when a step moved nothing and requests run on a remote backend, it waits for one;
  failure    a request that fails fails its answer alone (`Failure`): the answer's other requests
             are dropped and every other answer goes on as if it had never come.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from rain_llm.errors import EngineError, RainError
from rain_llm.runtime.accounting import Compute
from rain_llm.runtime.backend import (
    KINDS,
    SAMPLE,
    SCORE,
    Backend,
    Batch,
    Call,
    Completion,
    ModelRequest,
    Status,
    asked,
)

Steps = Generator[list[Call], list[Any], Any]
TEMPLATES = ("rain-llm", "templates")  # the owner of the kept template constants on every backend
PLAIN_PHASES = ("generate",)  # rows of answers that do not search: evaluations need not wait for them
T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class Templates:
    """The evaluation templates' constant parts (instructions, examples): kept cached on their
    backends across answers and batches, for as long as the `Rain` lives."""

    def __init__(self) -> None:
        self.kept: dict[int, tuple[Backend, list[list[int]]]] = {}

    def keep(self, backend: Backend, constant: list[int]) -> bool:
        """Keep `constant` cached on `backend`; whether an earlier answer already had it computed."""
        _, constants = self.kept.setdefault(id(backend), (backend, []))
        if constant in constants:
            return backend.reuse_cache
        constants.append(constant)
        backend.retain(TEMPLATES, constants, exact=True, prune=False)
        return False

    def free(self, backends: Sequence[Backend]) -> None:
        """Drop what no live answer keeps on these backends (the constants stay)."""
        for backend in backends:
            backend.retain(TEMPLATES, self.kept.get(id(backend), (backend, []))[1], exact=True)


class Job(Protocol[T_co]):
    """What the scheduler runs: a generator of call lists, the compute it is charged, and what it
    becomes when it finishes (`finish`) or is stopped early (`stop`)."""

    key: Hashable
    steps: Steps
    compute: Compute

    def join(self, templates: Templates) -> None: ...

    def backends(self) -> list[Backend]:
        """The backends it may keep cache entries on (released when it ends)."""
        ...

    def note_step(self, in_flight: int, seconds: float) -> None:
        """A step ran with `in_flight` jobs, itself included, and took `seconds`."""
        ...

    def finish(self, outcome: Any) -> T_co: ...

    def stop(self) -> T_co: ...


@dataclass
class Failure:
    """A job that failed, alone: `error` says why in one line (an `EngineError`'s status says
    whose fault: 400 invalid for the engine, 503 engine unreachable, 504 its timeout; 500 a bug)."""

    key: Hashable
    error: Exception

    @property
    def status(self) -> int:
        return self.error.status if isinstance(self.error, RainError) else 500

    @property
    def message(self) -> str:
        if isinstance(self.error, RainError):
            return str(self.error)
        return f"internal error: {type(self.error).__name__}: {self.error}"


@dataclass(eq=False)
class _Queued:
    """A request of a job's current call list: where its result goes, and on which backend."""

    request: ModelRequest
    backend: Backend
    key: Hashable
    place: int
    waited: int = 0  # steps a scoring request has waited for company


@dataclass
class _Calls:
    """A job's current call list: results as they come, in the list's order."""

    results: list[Any]
    left: int


class Scheduler(Generic[T]):
    VALUE_WAIT = 4  # steps an evaluation may wait for company (one forward serves all waiting)
    VALUE_SHARE = 0.5  # ... unless this share of the searching answers is waiting
    REMOTE_WAIT = 0.05  # seconds to wait for a remote backend when a step moved nothing

    def __init__(self, templates: Templates):
        self.templates = templates
        self.jobs: dict[Hashable, Job[T]] = {}
        self.calls: dict[Hashable, _Calls] = {}
        self.requests: dict[int, _Queued] = {}  # waiting and running, by request id
        self.backends: dict[int, Backend] = {}
        self.done: dict[Hashable, T | Failure] = {}  # finished outside a step (returned by the next one)
        self.ended: dict[int, Backend] = {}  # backends where an ended job kept cache: freed after the step

    def __len__(self) -> int:
        return len(self.jobs) + len(self.done)

    def __contains__(self, key: Hashable) -> bool:
        return key in self.jobs or key in self.done

    def add(self, job: Job[T]) -> None:
        """Start a job: its first calls are queued for the next step."""
        if job.key in self:
            raise RainError(f"answer {job.key!r} is already in the batch")
        self.jobs[job.key] = job
        job.join(self.templates)
        for backend in job.backends():
            self.backends[id(backend)] = backend
        self._advance(job.key, None, self.done)

    def step(self) -> dict[Hashable, T | Failure]:
        """One step; the jobs that ended in it (their result, or their `Failure`). Each job is told
        the step's wall time and how many jobs ran in it."""
        finished, self.done = self.done, {}
        running = list(self.jobs.values())
        start = time.perf_counter()
        moved = False
        for kind in KINDS:
            for backend in list(self.backends.values()):
                start_now = self._admit(backend, kind)
                if start_now or self._running_on(backend, kind):
                    moved |= self._execute(backend, Batch(kind, start_now), finished)
        if not moved:  # nothing came back: a remote backend may still be working
            remote = [b for b in self.backends.values() if b.batches_in_flight and self._running_on(b)]
            if remote:
                self._execute(remote[0], Batch("", [], wait=self.REMOTE_WAIT), finished)
            elif self.requests and not any(self._running_on(b) for b in self.backends.values()):
                raise RuntimeError(f"scheduler bug: {len(self.requests)} requests queued, none can start")
        elapsed = time.perf_counter() - start
        for job in running:
            job.note_step(len(running), elapsed)
        self._free()
        return finished

    def run(self) -> dict[Hashable, T | Failure]:
        """Step until every job is done."""
        out: dict[Hashable, T | Failure] = {}
        while self:
            out.update(self.step())
        return out

    def stop(self, key: Hashable) -> T | Failure | None:
        """End a job now with what it has (a RAIN answer: what it committed, which it never revises;
        vanilla: what it decoded; best-of-n: nothing before it finishes); None if it is not here."""
        job = self.jobs.get(key)
        if job is None:
            return self.done.pop(key, None)
        result = job.stop()
        self.cancel(key)
        return result

    def cancel(self, key: Hashable) -> None:
        """Drop a job that is no longer wanted: its requests stop and its cache may go."""
        self.done.pop(key, None)
        if key in self.jobs:
            self._drop(key)
            self._free()

    # ------------------------------------------------------------------ policy
    def _admit(self, backend: Backend, kind: str) -> list[ModelRequest]:
        """The queued requests of `kind` on `backend` that start now."""
        queued = [q for q in self.requests.values()
                  if q.backend is backend and q.request.kind == kind and q.request.status is Status.WAITING]
        if kind == SCORE and queued and not backend.batches_in_flight:
            for q in queued:
                q.waited += 1
            if not self._scoring_due(backend, queued):
                return []
        for q in queued:
            q.request.status = Status.RUNNING
        return [q.request for q in queued]

    def _scoring_due(self, backend: Backend, queued: list[_Queued]) -> bool:
        waiting = {q.key for q in queued}
        decoding = {q.key for q in self.requests.values()
                    if q.backend is backend and q.request.kind == SAMPLE and q.request.phase not in PLAIN_PHASES}
        searching = waiting | decoding
        return (not decoding or len(waiting) >= self.VALUE_SHARE * len(searching)
                or max(q.waited for q in queued) >= self.VALUE_WAIT)

    def _running_on(self, backend: Backend, kind: str | None = None) -> bool:
        return any(q.backend is backend and q.request.status is Status.RUNNING
                   and (kind is None or q.request.kind == kind) for q in self.requests.values())

    # ------------------------------------------------------------------ plumbing
    def _execute(self, backend: Backend, batch: Batch, finished: dict[Hashable, T | Failure]) -> bool:
        """Run a batch; deliver what completed. A backend that raises (a bug in it) fails the jobs
        whose requests it was running, and no other."""
        try:
            completions = backend.execute(batch)
        except Exception as err:  # noqa: BLE001 - contained: its jobs fail, the others go on
            error = err if isinstance(err, RainError) else EngineError(
                f"the {backend.name} engine failed: {type(err).__name__}: {err}")
            hit = {q.key for q in self.requests.values() if q.backend is backend and q.request.status is Status.RUNNING}
            for key in hit:
                self._fail(key, error, finished)
            return bool(hit)
        for completion in completions:
            self._deliver(completion, finished)
        return bool(completions)

    def _deliver(self, completion: Completion, finished: dict[Hashable, T | Failure]) -> None:
        request = completion.request
        queued = self.requests.pop(request.id, None)
        if queued is None or queued.key not in self.jobs:
            return  # its job has left meanwhile
        job = self.jobs[queued.key]
        job.compute.charge(request.receipt)
        if completion.error is not None:
            request.status = Status.FAILED
            self._fail(queued.key, completion.error, finished)
            return
        request.status = Status.FINISHED
        job.compute.asked(asked(request, completion.result))
        calls = self.calls[queued.key]
        calls.results[queued.place] = completion.result
        calls.left -= 1
        if calls.left == 0:
            del self.calls[queued.key]
            self._advance(queued.key, calls.results, finished)

    def _advance(self, key: Hashable, reply: list[Any] | None, finished: dict[Hashable, T | Failure]) -> None:
        """Send the job its results; queue its next calls, or finish it. A job whose own code
        raises (a value function, a bad setting found late) fails alone."""
        job = self.jobs[key]
        while True:
            try:
                calls: list[Call] = job.steps.send(reply)  # type: ignore[arg-type]  # None starts it
            except StopIteration as stop:
                del self.jobs[key]
                self._release(job)
                finished[key] = job.finish(stop.value)
                return
            except Exception as err:  # noqa: BLE001 - contained: this job fails, the others go on
                self._fail(key, err, finished)
                return
            if calls:
                break
            reply = []
        self.calls[key] = _Calls([None] * len(calls), len(calls))
        for place, (backend, request) in enumerate(calls):
            request.status = Status.WAITING
            self.requests[request.id] = _Queued(request, backend, key, place)
            self.backends.setdefault(id(backend), backend)

    def _fail(self, key: Hashable, error: Exception, finished: dict[Hashable, T | Failure]) -> None:
        if key in self.jobs:
            self._drop(key)
        finished[key] = Failure(key, error)

    def _drop(self, key: Hashable) -> None:
        """Forget a job: its queued requests go, its running ones are cancelled on their backends."""
        job = self.jobs.pop(key)
        self.calls.pop(key, None)
        mine = [q for q in self.requests.values() if q.key == key]
        running: dict[int, list[ModelRequest]] = {}
        for q in mine:
            del self.requests[q.request.id]
            if q.request.status is Status.RUNNING:
                running.setdefault(id(q.backend), []).append(q.request)
            q.request.status = Status.CANCELLED
        for backend_id, requests in running.items():
            self.backends[backend_id].cancel(requests)
        job.steps.close()
        self._release(job)

    def _release(self, job: Job[T]) -> None:
        for backend in job.backends():
            backend.release(job.key)
            self.ended[id(backend)] = backend

    def _free(self) -> None:
        """What only ended jobs kept may go (the template constants stay)."""
        if self.ended:
            self.templates.free(list(self.ended.values()))
            self.ended = {}


# ---------------------------------------------------------------------------------------------- requests alone
class _Requests:
    """A few requests outside any answer, as a job: they are sent together, their results are
    what it finishes with."""

    def __init__(self, backend: Backend, requests: Sequence[ModelRequest], compute: Compute | None):
        self.key: Hashable = ("rain-llm", "requests", id(self))
        self.compute = compute if compute is not None else Compute()
        self.backend = backend
        self.steps: Steps = self._steps(list(requests))

    def _steps(self, requests: list[ModelRequest]) -> Steps:
        results = yield [(self.backend, request) for request in requests]
        return results

    def join(self, templates: Templates) -> None:
        """Nothing to keep cached."""

    def backends(self) -> list[Backend]:
        """None: it keeps nothing cached of its own, and frees nothing when it ends."""
        return []

    def note_step(self, in_flight: int, seconds: float) -> None:
        """Nothing to record."""

    def finish(self, outcome: Any) -> list[Any]:
        return list(outcome)

    def stop(self) -> list[Any]:
        return []


def run_requests(backend: Backend, requests: Sequence[ModelRequest], compute: Compute | None = None,
                 templates: Templates | None = None) -> list[Any]:
    """Results of a few requests answered together, in order, by a one-job scheduler run: work
    outside a search (judges, checks of an evaluator). `compute` is charged their receipts. A
    request that fails raises its error."""
    scheduler: Scheduler[list[Any]] = Scheduler(templates or Templates())
    job = _Requests(backend, requests, compute)
    scheduler.add(job)
    result = scheduler.run()[job.key]
    if isinstance(result, Failure):
        if isinstance(result.error, RainError):
            raise result.error
        raise RuntimeError(result.message) from result.error
    return result
