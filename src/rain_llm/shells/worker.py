"""The model worker of `rain serve`: one thread that owns the model and runs a continuous batch.

Requests that passed their checks wait in line; between two rounds of the batch (`ContinuousBatch`)
waiting answers join, up to `max_batch` in flight, and finished ones leave. Each request's events
(start, text deltas, done, error) go back to its handler on the event loop through `Pending.emit`.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rain_llm.errors import RainError
from rain_llm.shells.protocol import ChatJob, RequestError

if TYPE_CHECKING:
    from rain_llm.shells.server import RainServer


@dataclass(eq=False)  # hashed by identity: a pending request is its own key in the batch
class Pending:
    """A request handed to the worker: its checked job, its prepared answer, and where its events go
    (("start",), ("delta", text), ("done", generation, finish reason), ("error", RequestError)):
    `emit` puts them, from any thread, on `events`, read by the request's handler."""

    job: ChatJob
    emit: Callable[[tuple], None]
    events: asyncio.Queue
    deadline: float
    answer: Any = None
    cancelled: bool = False
    sent: str = ""  # streamed text so far

    def send(self, text: str | None) -> None:
        """Stream what `text` adds to what was sent (nothing if it does not extend it)."""
        if self.job.stream and text is not None and text.startswith(self.sent) and len(text) > len(self.sent):
            self.emit(("delta", text[len(self.sent):]))
            self.sent = text


class Worker(threading.Thread):
    """Owns the model: runs a continuous batch that waiting answers join between rounds. When
    idle, the first request waits `batch_window` for others to start with it. `hold()` keeps
    waiting requests out of the batch until `release()` (admission paused: a drain, a test)."""

    def __init__(self, server: RainServer):
        super().__init__(name="rain-worker", daemon=True)
        self.server = server
        self.waiting: queue.Queue[Pending] = queue.Queue()
        self.in_flight: set[Pending] = set()
        self.stopping = threading.Event()
        self.wake = threading.Event()
        self.admitting = threading.Event()
        self.admitting.set()

    def hold(self) -> None:
        self.admitting.clear()

    def release(self) -> None:
        self.admitting.set()
        self.wake.set()

    def submit(self, pending: Pending) -> None:
        self.waiting.put(pending)
        self.server.metrics.queued.set(self.waiting.qsize())
        self.wake.set()

    def stop(self) -> None:
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
            print(f"rain: error: {server.failed}", file=server.log, flush=True)
            server.ready.set()
            return
        batch = server.rain.continuous_batch()
        while not (self.stopping.is_set() and not batch):
            if self.admitting.is_set():
                if not batch and not self.waiting.empty() and server.batch_window:
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
            now = time.monotonic()
            for pending in list(self.in_flight):
                if pending.cancelled:  # its client went away: stop computing
                    batch.cancel(pending)
                    self.in_flight.discard(pending)
                    print(f"rain: {pending.job.id} cancelled: the client went away", file=server.log, flush=True)
                elif now >= pending.deadline:  # the deadline: the best committed answer, as it stands
                    self._finish(pending, batch.stop(pending), "timeout")
                elif pending.job.stream:
                    pending.send(batch.partial_text(pending))
            server.metrics.in_flight.set(len(self.in_flight))
        for pending in self._drain():
            pending.emit(("error", RequestError(503, "the server is shutting down", "server_error")))

    def _join(self, batch: Any) -> None:
        """Waiting answers join, up to max_batch in flight; each is checked alone, so a bad one
        fails by itself."""
        server = self.server
        room = server.max_batch - len(self.in_flight)
        while room > 0:
            try:
                pending = self.waiting.get_nowait()
            except queue.Empty:
                break
            if pending.cancelled:
                continue
            try:
                batch.add_answer(pending.answer)
            except RainError as err:
                pending.emit(("error", RequestError(400, str(err))))
                continue
            except Exception as err:  # a bug: this request fails, the server goes on
                traceback.print_exc(file=server.log)
                pending.emit(("error", RequestError(500, f"internal error: {type(err).__name__}: {err}",
                                                    "server_error")))
                continue
            self.in_flight.add(pending)
            pending.emit(("start",))
            room -= 1
        server.metrics.queued.set(self.waiting.qsize())
        server.metrics.in_flight.set(len(self.in_flight))

    def _finish(self, pending: Pending, generation: Any, reason: str | None) -> None:
        self.in_flight.discard(pending)
        if generation is None:
            return
        server = self.server
        finish = reason or _finish_reason(generation, pending.job, server.rain.codec.stop_ids)
        compute = generation.stats.compute.total()
        server.metrics.answers.labels(generation.method, finish).inc()
        server.metrics.answer_tokens.inc(len(generation.token_ids))
        server.metrics.processed_tokens.inc(compute.tokens)
        server.metrics.forward_passes.inc(compute.forward_passes)
        print(f"rain: {pending.job.id} answered ({generation.method}, {len(generation.token_ids)} tokens, "
              f"{generation.stats.seconds:.2f} s, alongside up to {generation.stats.batch - 1} others"
              f"{', stopped at its deadline' if reason == 'timeout' else ''})", file=server.log, flush=True)
        pending.send(generation.text)
        pending.emit(("done", generation, finish))

    def _drain(self) -> list[Pending]:
        out = []
        while True:
            try:
                out.append(self.waiting.get_nowait())
            except queue.Empty:
                return out


def _finish_reason(generation: Any, job: ChatJob, stop_ids: frozenset[int]) -> str:
    from rain_llm.shells.protocol import finish_reason

    return finish_reason(generation.token_ids, stop_ids, job.cfg.max_new_tokens)
