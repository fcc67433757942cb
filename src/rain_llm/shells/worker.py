"""The model worker of `rain serve`: one thread that owns the model and runs a continuous batch.

Requests that passed their checks wait in line; between two rounds of the batch (`ContinuousBatch`)
waiting answers join, up to `max_batch` in flight, and finished ones leave. After each round the
worker tends every answer in flight: a client that left has its answer cancelled, one past its
deadline gets what it committed, one whose committed text holds a stop string is stopped there, and
streams get the text committed since the last round. Each request's events go back to its handler
on the event loop through `Pending.emit`: ("start",), ("delta", text), ("done", generation, finish
reason, text), ("error", RequestError).

The batch's calls are all here, in `run`, `_join`, `_tend` and `_give_up`: add_answer, step, stop,
cancel and partial_text.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rain_llm.errors import RainError
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
    idle, the first request waits `batch_window` for others to start with it. `hold()` keeps
    waiting requests out of the batch until `release()` (admission paused: a drain, a test).
    `give_up_at(when)`: the server is shutting down; answers not done by then get 503."""

    def __init__(self, server: RainServer):
        super().__init__(name="rain-worker", daemon=True)
        self.server = server
        self.waiting = WaitingLine()
        self.in_flight: set[Pending] = set()
        self.recent = RecentTimes()
        self.stopping = threading.Event()
        self.wake = threading.Event()
        self.admitting = threading.Event()
        self.admitting.set()
        self.shutdown_deadline: float | None = None  # shutting down: when the answers still here are given up

    def hold(self) -> None:
        self.admitting.clear()

    def release(self) -> None:
        self.admitting.set()
        self.wake.set()

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
            if server.rain is None:
                server.rain = server.loader()
            server.ready.set()
        except Exception as err:  # the model could not load: say why on /health and in the log
            server.failed = f"{type(err).__name__}: {err}" if not isinstance(err, RainError) else str(err)
            server.say(f"rain: error: {server.failed}")
            server.ready.set()
            return
        batch = server.rain.continuous_batch()
        while not (self.stopping.is_set() and not batch and not self.waiting):
            if self.shutdown_deadline is not None and time.monotonic() >= self.shutdown_deadline:
                self._give_up(batch)
            if self.admitting.is_set():
                if not batch and self.waiting and server.batch_window:
                    time.sleep(server.batch_window)  # idle: let others start with the first request
                self._join(batch)
            if not batch:
                self.wake.wait(0.5)
                self.wake.clear()
                continue
            try:
                finished = batch.step()
            except Exception as err:  # a bug: its requests get one line, the server log the traceback
                traceback.print_exc(file=server.log)
                for pending in self.in_flight:
                    pending.emit(("error", RequestError(500, f"internal error: {type(err).__name__}: {err}",
                                                        "server_error")))
                self.in_flight.clear()
                batch = server.rain.continuous_batch()
                continue
            for pending, generation in finished.items():
                self._finish(pending, generation, None)
            self._tend(batch)
            server.metrics.in_flight.set(len(self.in_flight))

    def _join(self, batch: ContinuousBatch) -> None:
        """Waiting answers join, up to max_batch in flight; each is checked alone, so a bad one
        fails by itself."""
        server = self.server
        while len(self.in_flight) < server.max_batch and (pending := self.waiting.take()) is not None:
            if pending.cancelled:
                continue
            try:
                batch.add_answer(pending.answer)
            except RainError as err:
                pending.emit(("error", RequestError(400, str(err), param=pending.job.prompt_param)))
                continue
            except Exception as err:  # a bug: this request fails, the server goes on
                traceback.print_exc(file=server.log)
                pending.emit(("error", RequestError(500, f"internal error: {type(err).__name__}: {err}",
                                                    "server_error")))
                continue
            self.in_flight.add(pending)
            pending.emit(("start",))
        server.metrics.queued.set(len(self.waiting))
        server.metrics.in_flight.set(len(self.in_flight))

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

    def _finish(self, pending: Pending, generation: Generation | None, reason: str | None) -> None:
        """An answer is done: its text cut at its first stop string, its figures counted, its end sent."""
        self.in_flight.discard(pending)
        if generation is None:
            return
        server, job = self.server, pending.job
        text, stopped = cut_at_stop(generation.text, job.stops)
        finish = "stop" if stopped else reason or finish_reason(generation.token_ids, server.rain.codec.stop_ids,
                                                                 job.cfg.max_new_tokens)
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

