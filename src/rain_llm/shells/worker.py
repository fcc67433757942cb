"""The model worker of `rain serve`: one thread that owns the model and runs a continuous batch.

Requests that passed their checks wait in line; between two rounds of the batch (`ContinuousBatch`)
waiting answers join, up to `max_batch` in flight, and finished ones leave. After each round the
worker tends every answer in flight: a client that left has its answer cancelled, one past its
deadline gets what it committed, one whose committed text holds a stop string is stopped there, and
streams get the text committed since the last round. Each request's events go back to its handler
on the event loop through `Pending.emit`: ("start",), ("delta", text), ("done", generation, finish
reason, text), ("error", RequestError).

The batch is driven by `ContinuousBatch.drain`, as `rain eval --batch` and `rain bench` drive theirs:
`_arrivals` hands it the waiting answers (None when there are none for now), and after every round
the worker finishes what ended (`_finish`: a generation, or the `Failure` of that answer alone, with
its status) and tends the rest (`_tend`: stop, cancel, partial_text).
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from rain_llm.errors import RainError
from rain_llm.runtime.scheduler import Failure
from rain_llm.shells.protocol import Job, RequestError, cut_at_stop, finish_reason, first_stop, sendable

if TYPE_CHECKING:
    from rain_llm.api import ContinuousBatch, Generation
    from rain_llm.runtime.answers import Answer
    from rain_llm.shells.server import RainServer


@dataclass(eq=False)  # hashed by identity: a pending request is its own key in the batch
class Pending:
    """A request handed to the worker: its checked job, its prepared answer, and where its events go
    (`emit` puts them, from any thread, on `events`, read by the request's handler)."""

    job: Job
    emit: Callable[[tuple], None]
    events: asyncio.Queue
    deadline: float
    answer: Answer | None = None
    cancelled: bool = False  # its client went away
    sent: str = ""  # streamed text so far

    def send(self, text: str | None) -> None:
        """Stream what `text` adds to what was sent (nothing if it does not extend it)."""
        if self.job.stream and text is not None and text.startswith(self.sent) and len(text) > len(self.sent):
            self.emit(("delta", text[len(self.sent):]))
            self.sent = text


class WaitingLine:
    """Requests waiting for a place in the batch, first come first served. One whose client leaves
    is taken out at once (`withdraw`): it holds no place in the line, and no answer is computed."""

    def __init__(self) -> None:
        self._line: deque[Pending] = deque()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._line)

    def put(self, pending: Pending) -> None:
        with self._lock:
            self._line.append(pending)

    def take(self) -> Pending | None:
        with self._lock:
            return self._line.popleft() if self._line else None

    def withdraw(self, pending: Pending) -> bool:
        """Take `pending` out of the line; False if it is not there (admitted already)."""
        with self._lock:
            try:
                self._line.remove(pending)
            except ValueError:
                return False
            return True

    def drain(self) -> list[Pending]:
        with self._lock:
            out, self._line = list(self._line), deque()
            return out


class RecentTimes:
    """How long recent answers took, from arrival to the last byte: what a refused client is told
    to wait (Retry-After). The last `size` answers only, so a slow past does not outlive itself."""

    def __init__(self, size: int = 16, before_any: int = 5):
        self.times: deque[float] = deque(maxlen=size)
        self.before_any = before_any

    def add(self, seconds: float) -> None:
        self.times.append(seconds)

    def retry_after(self) -> int:
        """The mean of the recent answer times in whole seconds, at least 1 (`before_any` if none yet)."""
        times = list(self.times)
        return max(1, math.ceil(sum(times) / len(times))) if times else self.before_any


class Worker(threading.Thread):
    """Owns the model: runs a continuous batch that waiting answers join between rounds. When
    idle, the first request waits `batch_window` for others to start with it. `give_up_at(when)`:
    the server is shutting down; answers not done by then get 503. `admitting()` says whether
    waiting answers may join now (always; a subclass may pause admission)."""

    def __init__(self, server: RainServer):
        super().__init__(name="rain-worker", daemon=True)
        self.server = server
        self.waiting = WaitingLine()
        self.in_flight: set[Pending] = set()
        self.recent = RecentTimes()
        self.stopping = threading.Event()
        self.wake = threading.Event()
        self.shutdown_deadline: float | None = None  # shutting down: when the answers still here are given up

    def admitting(self) -> bool:
        return True

    def submit(self, pending: Pending) -> None:
        self.waiting.put(pending)
        self.server.metrics.queued.set(len(self.waiting))
        self.wake.set()

    def withdraw(self, pending: Pending) -> bool:
        """Take a request whose client left out of the line (False: it is in the batch already)."""
        removed = self.waiting.withdraw(pending)
        self.server.metrics.queued.set(len(self.waiting))
        return removed

    def give_up_at(self, when: float) -> None:
        self.shutdown_deadline = when if self.shutdown_deadline is None else min(self.shutdown_deadline, when)
        self.wake.set()

    def stop(self) -> None:
        """End the loop: whatever is still here is given up now."""
        self.give_up_at(time.monotonic())
        self.stopping.set()
        self.wake.set()

    def run(self) -> None:
        server = self.server
        try:
            if server.rain is None and server.loader is not None:
                server.rain = server.loader()
            server.adopt_engine_limits()
            server.ready.set()
        except Exception as err:  # the model could not load: say why on /health and in the log
            server.failed = f"{type(err).__name__}: {err}" if not isinstance(err, RainError) else str(err)
            server.say(f"rain: error: {server.failed}")
            server.ready.set()
            return
        rain = server.rain
        if rain is None:
            raise RuntimeError("rain serve bug: no model and no loader")
        while True:
            batch = rain.continuous_batch()
            try:
                for step in batch.drain(self._arrivals(batch), server.max_batch):
                    for key in step.started:
                        pending = cast(Pending, key)  # the batch's keys are the pending requests
                        self.in_flight.add(pending)
                        pending.emit(("start",))
                    for key, outcome in step.finished.items():
                        self._finish(cast(Pending, key), outcome, None)
                    self._tend(batch)
                    if self.shutdown_deadline is not None and time.monotonic() >= self.shutdown_deadline:
                        self._give_up(batch)
                    server.metrics.queued.set(len(self.waiting))
                    server.metrics.in_flight.set(len(self.in_flight))
                return
            except Exception as err:  # a bug: its requests get one line, the server log the traceback
                traceback.print_exc(file=server.log)
                for pending in self.in_flight:
                    pending.emit(("error", RequestError(500, f"internal error: {type(err).__name__}: {err}",
                                                        "server_error")))
                self.in_flight.clear()

    def _arrivals(self, batch: ContinuousBatch) -> Iterator[Answer | None]:
        """The waiting answers, as `drain` asks for them: None when none may join now (the batch
        steps on); blocks while the server is idle; ends when the server stops."""
        server = self.server
        while not (self.stopping.is_set() and not self.waiting):
            if self.shutdown_deadline is not None and time.monotonic() >= self.shutdown_deadline:
                self._give_up(batch)
            if not batch and (not self.waiting or not self.admitting()):
                self.wake.wait(0.5)  # idle: nothing to compute until a request comes
                self.wake.clear()
                continue
            if not self.admitting():
                yield None
                continue
            if not batch and server.batch_window:
                time.sleep(server.batch_window)  # idle: let others start with the first request
            while (pending := self.waiting.take()) is not None:
                if not pending.cancelled and pending.answer is not None:
                    yield pending.answer  # its key is `pending`
            server.metrics.queued.set(len(self.waiting))
            yield None

    def _tend(self, batch: ContinuousBatch) -> None:
        """After a round, each answer in flight: cancelled if its client left, stopped at its
        deadline or at a stop string in its committed text, else streamed what it committed."""
        now = time.monotonic()
        for pending in list(self.in_flight):
            stops = pending.job.stops
            if pending.cancelled:  # its client went away: stop computing
                batch.cancel(pending)
                self.in_flight.discard(pending)
                self.server.say(f"rain: {pending.job.id} cancelled: the client went away")
            elif now >= pending.deadline:  # the deadline: the best committed answer, as it stands
                self._finish(pending, batch.stop(pending), "timeout")
            elif stops or pending.job.stream:
                text = batch.partial_text(pending)
                if text is not None and first_stop(text, stops) is not None:
                    self._finish(pending, batch.stop(pending), "stop")  # no need to search past it
                elif text is not None:
                    pending.send(sendable(text, stops))

    def _give_up(self, batch: ContinuousBatch) -> None:
        """The server is shutting down and its grace period is over: every answer still here gets
        503 (streams: an error event, then [DONE])."""
        grace = self.server.grace
        for pending in list(self.in_flight):
            batch.cancel(pending)
            self.in_flight.discard(pending)
            self._fail_shutting_down(pending, f"the server is shutting down: the answer did not finish within "
                                              f"the grace period of {grace:g} s (rain serve --grace)")
        for pending in self.waiting.drain():
            self._fail_shutting_down(pending, "the server is shutting down: the answer did not start within the "
                                              f"grace period of {grace:g} s (rain serve --grace)")
        self.server.metrics.queued.set(0)
        self.server.metrics.in_flight.set(len(self.in_flight))

    def _fail_shutting_down(self, pending: Pending, message: str) -> None:
        self.server.say(f"rain: {pending.job.id} cancelled: the server is shutting down")
        pending.emit(("error", RequestError(503, message, "server_error")))

    def _finish(self, pending: Pending, generation: Generation | Failure | None, reason: str | None) -> None:
        """An answer is done: its text cut at its first stop string, its figures counted, its end sent
        (or, if it failed alone, its error with its status)."""
        started = pending in self.in_flight
        self.in_flight.discard(pending)
        if generation is None:
            return
        if isinstance(generation, Failure):
            self.server.say(f"rain: {pending.job.id} failed: {generation.message}")
            kind = "invalid_request_error" if generation.status < 500 else "server_error"
            param = pending.job.prompt_param if generation.status == 400 and not started else None  # refused at once
            pending.emit(("error", RequestError(generation.status, generation.message, kind, param=param)))
            return
        server, job = self.server, pending.job
        stop_ids = server.rain.codec.stop_ids if server.rain is not None else frozenset()
        text, stopped = cut_at_stop(generation.text, job.stops)
        finish = "stop" if stopped else reason or finish_reason(generation.token_ids, stop_ids, job.cfg.max_new_tokens)
        compute = generation.stats.compute.total()
        server.metrics.answers.labels(generation.method, finish).inc()
        server.metrics.answer_tokens.inc(len(generation.token_ids))
        server.metrics.processed_tokens.inc(compute.tokens)
        server.metrics.forward_passes.inc(compute.forward_passes)
        self.recent.add(time.monotonic() - job.arrived)
        how = ", stopped at its deadline" if reason == "timeout" else ", stopped at a stop string" if stopped else ""
        server.say(f"rain: {job.id} answered ({generation.method}, {len(generation.token_ids)} tokens, "
                   f"{generation.stats.seconds:.2f} s, alongside up to {generation.stats.batch - 1} others{how})")
        server.record({"id": job.id, "object": job.kind, "method": generation.method, "finish_reason": finish,
                       "prompt": job.prompt, "text": text, "completion_tokens": len(generation.token_ids),
                       "seconds": round(generation.stats.seconds, 3)})
        pending.send(text)
        pending.emit(("done", generation, finish, text))


class HoldingWorker(Worker):
    """The worker with admission that can be paused (`hold` / `release`): requests sent while held
    queue or are refused and none starts, so they start together, or the queue bound alone decides
    who is answered (the server's tests and benchmarks/serve_load.py)."""

    def __init__(self, server: RainServer):
        super().__init__(server)
        self.open = threading.Event()
        self.open.set()

    def admitting(self) -> bool:
        return self.open.is_set()

    def hold(self) -> None:
        self.open.clear()

    def release(self) -> None:
        self.open.set()
        self.wake.set()
