"""The scheduler alone, on a scripted fake backend: what starts when, joining and leaving,
cancellation, and a failing request that fails its job alone. No model, no clock."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from rain_llm.errors import EngineError, EngineRefused, EngineUnavailable
from rain_llm.runtime.accounting import Compute
from rain_llm.runtime.backend import (
    PREFILL,
    SAMPLE,
    SCORE,
    Batch,
    Completion,
    ModelRequest,
    Prefill,
    Row,
    Sample,
    SampleRows,
    Score,
)
from rain_llm.runtime.scheduler import Failure, Scheduler, Templates, run_requests


class FakeBackend:
    """Completes a `SampleRows` after as many SAMPLE executions as its longest row has tokens (a
    decode step per execution), everything else in the execution that starts it. `fail` maps a
    request's phase to the error its requests complete with. Every execution is logged."""

    reuse_cache = True

    def __init__(self, name: str = "fake", batches_in_flight: bool = False, fail: dict[str, Exception] | None = None):
        self.name = name
        self.context_window = 1000
        self.batches_in_flight = batches_in_flight
        self.fail = fail or {}
        self.log: list[tuple[str, list[str], float]] = []  # (kind, phases started, wait)
        self.decoding: dict[int, tuple[ModelRequest, int]] = {}  # request id -> (request, steps left)
        self.cancelled: list[str] = []
        self.raise_on: str | None = None  # a kind whose execution raises (a bug in the backend)

    def execute(self, batch: Batch) -> list[Completion]:
        self.log.append((batch.kind, [r.phase for r in batch.start], batch.wait))
        if batch.kind == self.raise_on:
            raise RuntimeError("boom")
        done = []
        for request in batch.start:
            if request.phase in self.fail:
                done.append(Completion(request, error=self.fail[request.phase]))  # type: ignore[arg-type]
            elif isinstance(request, SampleRows):
                self.decoding[request.id] = (request, max(r.max_tokens for r in request.rows))
            else:
                done.append(Completion(request, result=f"{request.phase} done"))
        if batch.kind == SAMPLE:
            for rid, (request, left) in list(self.decoding.items()):
                request.receipt.add((0, len(self.log)), 1)
                if left == 1:
                    del self.decoding[rid]
                    done.append(Completion(request, result=[Sample([9], 0.0)] * len(request.rows)))  # type: ignore[attr-defined]
                else:
                    self.decoding[rid] = (request, left - 1)
        return done

    def cancel(self, requests: Sequence[ModelRequest]) -> None:
        for request in requests:
            self.cancelled.append(request.phase)
            self.decoding.pop(request.id, None)

    def refusal(self, cfg: Any) -> str | None:
        return None

    def decoded(self, request: Any) -> list[int] | None:
        return None

    def health(self) -> str | None:
        return None

    def retain(self, owner: Any, prefixes: Any, *, exact: bool = False, prune: bool = True) -> None:
        pass

    def release(self, owner: Any) -> None:
        pass

    def scope(self, *, reuse_cache: bool | None = None) -> FakeBackend:
        return self


class ScriptJob:
    """A job from a script: a generator function of (job) that yields call lists; what it returns
    is the job's result. `events` records what it received, in order."""

    def __init__(self, key: str, backend: FakeBackend, script: Any):
        self.key = key
        self.backend = backend
        self.compute = Compute()
        self.events: list[Any] = []
        self.steps = script(self)
        self.stopped = False

    def join(self, templates: Templates) -> None:
        pass

    def backends(self) -> list[Any]:
        return [self.backend]

    def note_step(self, in_flight: int, seconds: float) -> None:
        pass

    def finish(self, outcome: Any) -> Any:
        return outcome

    def stop(self) -> Any:
        return "stopped"


def decode(owner: str, phase: str, tokens: int) -> SampleRows:
    return SampleRows(owner, phase, [1, 2, 3], [Row(tokens)])


def score(owner: str) -> Score:
    return Score(owner, "evaluate", [1, 2], [[3]], (4, 5))


def searcher(decode_tokens: int, rounds: int = 1):
    """A RAIN-like job: a prefill, then rounds of one decode and one scoring request."""
    def script(job: ScriptJob):
        b = job.backend
        job.events.append((yield [(b, Prefill(job.key, "prefill", [[1, 2, 3]]))]))
        for _ in range(rounds):
            job.events.append((yield [(b, decode(job.key, "expand", decode_tokens))]))
            job.events.append((yield [(b, score(job.key))]))
        return f"{job.key} answered"
    return script


def run_steps(scheduler: Scheduler, limit: int = 100) -> dict[str, tuple[int, Any]]:
    """Step to the end (bounded): each job's result and the step it ended in."""
    out = {}
    for step in range(1, limit + 1):
        for key, result in scheduler.step().items():
            out[key] = (step, result)
        if not scheduler:
            return out
    raise AssertionError(f"not done after {limit} steps")


def test_one_step_runs_the_kinds_in_order_and_a_job_moves_through_several():
    backend = FakeBackend()
    scheduler: Scheduler[Any] = Scheduler(Templates())
    job = ScriptJob("a", backend, searcher(decode_tokens=1))
    scheduler.add(job)
    done = run_steps(scheduler)
    # step 1: prefill, then (the prefill done) its one-token decode starts and finishes in the same
    # step, then its evaluation is scored in the same step too (nothing else decodes)
    assert backend.log[:3] == [(PREFILL, ["prefill"], 0.0), (SAMPLE, ["expand"], 0.0), (SCORE, ["evaluate"], 0.0)]
    assert done == {"a": (1, "a answered")}
    assert job.events == [["prefill done"], [[Sample([9], 0.0)]], ["evaluate done"]]


def test_a_job_joining_later_runs_beside_the_others_and_each_leaves_when_done():
    backend = FakeBackend()
    scheduler: Scheduler[Any] = Scheduler(Templates())
    scheduler.add(ScriptJob("long", backend, searcher(decode_tokens=6)))
    first = scheduler.step()
    scheduler.add(ScriptJob("short", backend, searcher(decode_tokens=1)))
    done = run_steps(scheduler)
    assert first == {} and set(done) == {"long", "short"}
    assert done["short"][0] < done["long"][0]  # it did not wait for the long decode
    assert done["long"][1] == "long answered" and done["short"][1] == "short answered"


def test_an_evaluation_waits_for_company_while_another_search_decodes():
    """On a backend whose step is its batch, a lone evaluation waits (up to VALUE_WAIT steps) while
    most searches decode; then it is scored. A server backend gets it at once."""
    for in_flight in (False, True):
        backend = FakeBackend(batches_in_flight=in_flight)
        scheduler: Scheduler[Any] = Scheduler(Templates())
        scheduler.add(ScriptJob("quick", backend, searcher(decode_tokens=1)))
        for i in range(3):  # one waiting of four searching: under VALUE_SHARE
            scheduler.add(ScriptJob(f"slow{i}", backend, searcher(decode_tokens=20)))
        done = run_steps(scheduler)
        scored = [i for i, (kind, phases, _) in enumerate(backend.log) if kind == SCORE and phases]
        sample_steps_before = sum(1 for kind, _, _ in backend.log[:scored[0]] if kind == SAMPLE)
        if in_flight:
            assert sample_steps_before == 1 and done["quick"][0] == 1
        else:  # its decode's step, then the slow searches' decode steps, until it has waited VALUE_WAIT
            assert sample_steps_before == Scheduler.VALUE_WAIT
            assert done["quick"][0] == Scheduler.VALUE_WAIT


def test_a_remote_backend_is_waited_for_only_when_nothing_moved():
    class Remote(FakeBackend):
        def execute(self, batch: Batch) -> list[Completion]:
            self.log.append((batch.kind, [r.phase for r in batch.start], batch.wait))
            self.decoding.update({r.id: (r, 0) for r in batch.start})
            if batch.wait == 0:
                return []
            done = [Completion(r, result=[Sample([9], 0.0)] if isinstance(r, SampleRows) else "late")
                    for r, _ in self.decoding.values()]
            self.decoding.clear()
            return done

    backend = Remote(batches_in_flight=True)
    scheduler: Scheduler[Any] = Scheduler(Templates())
    job = ScriptJob("a", backend, searcher(decode_tokens=3))
    scheduler.add(job)
    run_steps(scheduler)
    waits = [w for _, _, w in backend.log if w > 0]
    assert waits and all(w == Scheduler.REMOTE_WAIT for w in waits)
    assert len(waits) == 3  # one per call list (prefill, decode, score), each answered only then
    assert job.events == [["late"], [[Sample([9], 0.0)]], ["late"]]


def test_a_failing_request_fails_its_job_alone():
    backend = FakeBackend(fail={"bad": EngineRefused("more logprobs than the server allows")})
    scheduler: Scheduler[Any] = Scheduler(Templates())

    def bad(job: ScriptJob):
        yield [(job.backend, decode(job.key, "expand", 2)), (job.backend, score(job.key))]
        yield [(job.backend, SampleRows(job.key, "bad", [1], [Row(1)]))]
        raise AssertionError("never reached")

    scheduler.add(ScriptJob("good", backend, searcher(decode_tokens=5, rounds=2)))
    scheduler.add(ScriptJob("bad", backend, bad))
    done = run_steps(scheduler)
    failure = done["bad"][1]
    assert isinstance(failure, Failure) and failure.status == 400 and "logprobs" in failure.message
    assert done["good"][1] == "good answered"
    alone = Scheduler(Templates())
    alone.add(ScriptJob("good", FakeBackend(), searcher(decode_tokens=5, rounds=2)))
    assert run_steps(alone)["good"] == done["good"]  # as if the failing job had never come


def test_a_failure_drops_the_jobs_other_requests_on_their_backends():
    backend = FakeBackend(fail={"bad": EngineUnavailable("the server went away")})

    def two(job: ScriptJob):
        yield [(job.backend, decode(job.key, "expand", 10)), (job.backend, SampleRows(job.key, "bad", [1], [Row(9)]))]

    scheduler: Scheduler[Any] = Scheduler(Templates())
    scheduler.add(ScriptJob("x", backend, two))
    done = run_steps(scheduler)
    assert done["x"][1].status == 503 and backend.cancelled == ["expand"] and not backend.decoding


def test_a_backend_that_raises_fails_the_jobs_running_on_it_and_no_other():
    broken, fine = FakeBackend("broken"), FakeBackend("fine")
    broken.raise_on = SCORE
    scheduler: Scheduler[Any] = Scheduler(Templates())
    scheduler.add(ScriptJob("on-broken", broken, searcher(decode_tokens=1)))
    scheduler.add(ScriptJob("on-fine", fine, searcher(decode_tokens=1)))
    done = run_steps(scheduler)
    failure = done["on-broken"][1]
    assert isinstance(failure, Failure) and failure.status == 500 and "RuntimeError: boom" in failure.message
    assert isinstance(failure.error, EngineError)
    assert done["on-fine"][1] == "on-fine answered"


def test_a_job_whose_own_code_raises_fails_alone():
    backend = FakeBackend()

    def crashing(job: ScriptJob):
        yield [(job.backend, decode(job.key, "expand", 1))]
        raise ValueError("a value function broke")

    scheduler: Scheduler[Any] = Scheduler(Templates())
    scheduler.add(ScriptJob("crash", backend, crashing))
    scheduler.add(ScriptJob("ok", backend, searcher(decode_tokens=2)))
    done = run_steps(scheduler)
    assert done["crash"][1].status == 500 and "ValueError: a value function broke" in done["crash"][1].message
    assert done["ok"][1] == "ok answered"


def test_cancel_and_stop_end_a_job_between_steps():
    backend = FakeBackend()
    scheduler: Scheduler[Any] = Scheduler(Templates())
    scheduler.add(ScriptJob("a", backend, searcher(decode_tokens=50)))
    scheduler.add(ScriptJob("b", backend, searcher(decode_tokens=50)))
    scheduler.add(ScriptJob("c", backend, searcher(decode_tokens=2)))
    scheduler.step()
    scheduler.step()
    scheduler.cancel("a")
    assert "a" not in scheduler and backend.cancelled == ["expand"]
    assert scheduler.stop("b") == "stopped" and "b" not in scheduler
    assert scheduler.stop("nobody") is None
    done = run_steps(scheduler)
    assert set(done) == {"c"} and not backend.decoding


def test_a_key_can_be_in_flight_once():
    scheduler: Scheduler[Any] = Scheduler(Templates())
    scheduler.add(ScriptJob("a", FakeBackend(), searcher(decode_tokens=3)))
    with pytest.raises(Exception, match="already in the batch"):
        scheduler.add(ScriptJob("a", FakeBackend(), searcher(decode_tokens=3)))


def test_requests_alone_run_as_a_one_job_scheduler_and_raise_their_error():
    backend = FakeBackend(fail={"judge": EngineRefused("prompt too long")})
    compute = Compute()
    results = run_requests(backend, [decode("j", "generate", 3), score("j")], compute)
    assert results == [[Sample([9], 0.0)], "evaluate done"]
    assert compute.phases["generate"].forward_passes == 3
    with pytest.raises(EngineRefused, match="prompt too long"):
        run_requests(backend, [Score("j", "judge", [1], [[2]], (3,))])


def test_each_job_is_told_every_step_it_took_part_in():
    """What an answer's `seconds_shared` and `batch` are made of: each step it ran in, with how
    many jobs ran in it (a job that joins later is told of fewer steps)."""
    backend = FakeBackend()
    told: dict[str, list[int]] = {"first": [], "later": []}

    class Told(ScriptJob):
        def note_step(self, in_flight: int, seconds: float) -> None:
            assert seconds >= 0
            told[self.key].append(in_flight)

    scheduler: Scheduler[Any] = Scheduler(Templates())
    scheduler.add(Told("first", backend, searcher(decode_tokens=4)))
    scheduler.step()
    scheduler.add(Told("later", backend, searcher(decode_tokens=1)))
    done = run_steps(scheduler)
    assert told["first"] == [1] + [2] * (len(told["later"])) + [1] * (done["first"][0] - done["later"][0])
    assert len(told["later"]) == done["later"][0]
