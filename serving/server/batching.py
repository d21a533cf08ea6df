"""Dynamic batching for one model version: a bounded queue and one thread (and session) per instance.

Requests wait in a queue. A batch closes when it holds `max_batch_size` rows (a batch run on the event
loop, see below: its inline size) or when its oldest request has waited `max_queue_delay_us`,
whichever comes first, and an instance is free to run it; while every instance is busy, requests
keep accumulating, so batches grow with the load. A batch's
inputs are concatenated along axis 0, run once by an instance's ONNX Runtime session in that
instance's thread (ONNX Runtime releases the GIL), and the outputs are split back so that each caller
gets exactly its own rows. A request larger than `max_batch_size` runs alone. A request whose deadline
passed while it was queued is failed with DEADLINE_EXCEEDED and never run. A full queue refuses new
requests (UNAVAILABLE). With batching disabled each request is its own batch.

Only requests whose inputs agree in every dimension but the first share a batch: a model may have
dynamic dimensions besides the batch axis, and requests that differ in one cannot be concatenated. A
batch takes the oldest request and those behind it of the same shapes; the others keep their places in
the queue for a batch of their own. Only inputs declared with such a dynamic dimension are compared (a
tuple slice and comparison per request, see `_varying_inputs`); where every dimension after the first
is fixed, the decoder has made all requests agree already and batches form as they always did. The
queue's rows of every shape count when a batch is closed early for being full, so under a mix of
shapes and a queue delay, batches can close before they fill.

A batch that fails as a whole does not fail its requests: it runs again in halves, and a half that
fails in halves again, down to single requests (`_Apart`), so that each request gets the outcome it
would have had on its own (one failing request among n costs about 2 log2(n) more runs). Only a
request that fails alone is answered with an error: its own.

Batches are formed on the event loop when something changes (a request arrives, an instance frees
up, the oldest request's delay runs out): no task or timer per request, at most one timer at a time.

Inline execution (a model so small that a batch runs faster than a hand-over to a thread) with batching
on and no queue delay coalesces while the event loop is busy: a request is held while the loop has
other callbacks ready to run (other requests are on their way through gRPC), and what was held runs as
one batch as soon as the loop has nothing else ready, the batch is full, or the oldest request has
waited COALESCE_MAX_S. On a loaded single core an ONNX Runtime call costs 20 to 50 us of the event loop
(10 times its cost in a warm loop), so one call per batch instead of one per request is what lets the
server keep up with the gRPC ceiling (docs/benchmarks.md). A request that finds the loop idle (a lone
client) runs at once: it never waits for company that is not coming.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np

from serving.server.errors import DeadlineExceededError, UnavailableError
from serving.server.metrics import ModelMetrics

log = logging.getLogger(__name__)

# How long coalescing may hold a request while the event loop stays busy (see the module docstring).
COALESCE_MAX_S = 0.002


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int = 64
    max_queue_delay_us: int = 0
    max_queue_size: int = 1024
    enabled: bool = True

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_queue_delay_us < 0:
            raise ValueError(f"max_queue_delay_us must be >= 0, got {self.max_queue_delay_us}")
        if self.max_queue_size < 1:
            raise ValueError(f"max_queue_size must be >= 1, got {self.max_queue_size}")


class _Request:
    __slots__ = ("inputs", "rows", "deadline", "enqueued", "future")

    def __init__(self, inputs, rows, deadline, enqueued, future):
        self.inputs: dict[str, np.ndarray] = inputs
        self.rows: int = rows
        self.deadline: float | None = deadline
        self.enqueued: float = enqueued
        self.future: asyncio.Future = future


class _Apart:
    """The outcome of a batch that failed as a whole and was run again in parts (see the module docstring).

    `answers[i]` is what the batch's request i gets: its own rows of every output, or the exception of its
    run alone. `runs` holds (requests, rows, seconds) of each rerun, for the batch metrics.
    """

    __slots__ = ("answers", "runs")

    def __init__(self) -> None:
        self.answers: list[list[np.ndarray] | BaseException] = []
        self.runs: list[tuple[int, int, float]] = []


def _varying_inputs(sessions: Sequence, input_names: Sequence[str]) -> tuple[str, ...]:
    """The inputs whose dimensions after the first may differ between requests: those the session declares
    (ONNX Runtime's `get_inputs()`) with such a dimension not a fixed number, and every input of a session
    that declares nothing. Requests agree on the fixed dimensions already: the decoder refuses any other."""
    get_inputs = getattr(sessions[0], "get_inputs", None) if sessions else None
    if get_inputs is None:
        return tuple(input_names)
    declared = {arg.name: arg.shape for arg in get_inputs()}

    def fixed(shape) -> bool:
        return bool(shape) and all(isinstance(d, int) and d >= 0 for d in shape[1:])

    return tuple(name for name in input_names if not fixed(declared.get(name)))


def _shapes_of(names: tuple[str, ...]) -> Callable[[dict[str, np.ndarray]], tuple] | None:
    """What a batch compares between its requests: the dimensions after the first of the inputs `names`
    (`_varying_inputs`); None when there is nothing to compare."""
    if not names:
        return None
    if len(names) == 1:
        (name,) = names

        def shape(inputs: dict[str, np.ndarray]) -> tuple:
            return inputs[name].shape[1:]

        return shape

    def shapes(inputs: dict[str, np.ndarray]) -> tuple:
        return tuple([inputs[name].shape[1:] for name in names])

    return shapes


def _own_rows(batch: list[_Request], outputs: list[np.ndarray]) -> list[list[np.ndarray]]:
    """Each request's own rows of every output of a batch that ran."""
    answers = []
    start = 0
    for request in batch:
        end = start + request.rows
        answers.append([output[start:end] for output in outputs])
        start = end
    return answers


# asyncio keeps the callbacks ready to run in `loop._ready`, a private deque. Coalescing reads its length
# only on the Python versions it was tested with (a pin that stops at the next minor); elsewhere, or if the
# attribute is not a deque, it falls back to public behaviour: nothing is held (see Coalescer).
# tests/test_batching.py fails the day the attribute changes on a tested version.
READY_QUEUE_PYTHONS = ((3, 11),)


def ready_queue(loop: asyncio.AbstractEventLoop) -> deque | None:
    """The loop's queue of ready callbacks where it may be read (see READY_QUEUE_PYTHONS), else None."""
    if sys.version_info[:2] not in READY_QUEUE_PYTHONS:
        return None
    ready = getattr(loop, "_ready", None)
    return ready if type(ready) is deque else None


class Coalescer:
    """Holds the coalescing batchers of one event loop until the loop has nothing else ready to run.

    One scheduled callback serves every batcher, so that batchers of different models never take each
    other's end-of-turn callbacks for work still to come. Whether more work is on its way is read from
    the loop's ready queue (`ready_queue`). Without it, nothing is held: a request runs at once unless
    others are queued ahead of it (bench/coalesce_fallback.py measured this public fallback at 0.8-0.9x the
    ready queue's throughput, a little better than guessing from the arrivals of each turn).
    """

    def __init__(self) -> None:
        self._waiting: list[Batcher] = []
        self._handle: asyncio.Handle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: deque | tuple = ()  # empty, so never busy, where the ready queue is not read

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        ready = ready_queue(loop)
        self._ready = () if ready is None else ready

    def hold(self, batcher: Batcher) -> None:
        """Called by `batcher` with a request held: its batch runs once the loop is idle (or full, or old)."""
        if batcher not in self._waiting:
            self._waiting.append(batcher)
        if self._handle is None:
            self._handle = self._loop.call_soon(self._end_turn)

    def busy(self) -> bool:
        """True when the loop has other callbacks ready: another request may be on its way."""
        return bool(self._ready)

    def cancel(self, batcher: Batcher) -> None:
        if batcher in self._waiting:
            self._waiting.remove(batcher)

    def _end_turn(self) -> None:
        self._handle = None
        busy = bool(self._ready)
        now = self._loop.time()
        waiting, self._waiting = self._waiting, []
        for batcher in waiting:
            if busy and batcher.keep_holding(now):
                self._waiting.append(batcher)
            else:
                batcher.release()
        if self._waiting:
            self._handle = self._loop.call_soon(self._end_turn)


class Batcher:
    """Batches requests for `sessions` (one per instance); `await run(...)` gives a request's outputs.

    Each session must provide ONNX Runtime's `run(output_names, feeds) -> list[np.ndarray]`.
    Use from one event loop: `start()`, `run()`, then `drain()` and `close()`.

    `inline_rows > 0` runs batches of up to that many rows on the event loop itself, with the first
    session: for a model so small that such a batch runs faster than a hand-over to a thread and back
    (40 to 75 us of CPU on a 2-core machine), that is cheaper and loses no concurrency worth having.
    Batches formed there hold at most `min(inline_rows, max_batch_size)` rows; a request larger than
    `inline_rows` runs in the instance threads, batched with the requests queued behind it up to
    `max_batch_size` rows (alone when batching is off).
    """

    def __init__(
        self,
        name: str,
        sessions: Sequence,
        input_names: Sequence[str],
        output_names: Sequence[str],
        policy: BatchPolicy,
        metrics: ModelMetrics | None = None,
        inline_rows: int = 0,
        coalescer: Coalescer | None = None,
    ) -> None:
        self.name = name
        self._inline_rows = inline_rows
        self._sessions = list(sessions)
        self._input_names = tuple(input_names)
        # What must agree between the requests of a batch: the inputs' dimensions after the first.
        self._shapes = _shapes_of(_varying_inputs(self._sessions, self._input_names))
        self._output_names = list(output_names)
        self._policy = policy
        self._max_rows = policy.max_batch_size if policy.enabled else 1
        self._max_inline_rows = min(inline_rows, self._max_rows)  # the largest batch run on the loop
        self._delay = policy.max_queue_delay_us / 1e6 if policy.enabled else 0.0
        self._metrics = metrics
        self._pending: deque[_Request] = deque()
        self._pending_rows = 0
        self._pending_large = 0  # queued requests too large for the event loop
        self._running = 0
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._drained: asyncio.Event | None = None
        self._idle: list[int] = []
        self._inboxes: list[queue.SimpleQueue] = []
        self._threads: list[threading.Thread] = []
        # Per-turn coalescing of inline batches (see the module docstring).
        self._coalesce = policy.enabled and not self._delay and inline_rows > 0
        self._coalescer = coalescer or Coalescer()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._coalescer.bind(self._loop)
        self._drained = asyncio.Event()
        for index, session in enumerate(self._sessions):
            inbox: queue.SimpleQueue = queue.SimpleQueue()
            thread = threading.Thread(
                target=self._work, args=(index, session, inbox), name=f"batch-{self.name}-{index}", daemon=True
            )
            thread.start()
            self._inboxes.append(inbox)
            self._threads.append(thread)
            self._idle.append(index)
        if self._metrics is not None:
            self._metrics.track_queue_depth(lambda: len(self._pending))

    async def run(self, inputs: dict[str, np.ndarray], rows: int, deadline: float | None = None) -> list[np.ndarray]:
        """The outputs (in output order) of one request of `rows` rows, run alone or batched with others.

        `deadline` is on the event loop's clock (`loop.time()`). Runs at once on the event loop when that is
        what queueing would do anyway (inline execution, no queue delay, nothing queued ahead, and nothing
        else about to arrive this turn of the loop); otherwise queues the request and waits for its batch.
        Raises UnavailableError when the queue is full or the batcher is closing, DeadlineExceededError
        when the deadline passes while queued, and what the session raises."""
        if not (
            rows > self._inline_rows
            or self._pending
            or self._delay
            or self._closing
            or (self._coalesce and rows < self._max_inline_rows and self._coalescer.busy())
        ):
            return self._run_now(inputs, rows)
        return await self._submit(inputs, rows, deadline)

    def answers_soon(self, rows: int) -> bool:
        """True when a request of `rows` rows run now is answered within this turn of the loop or the next
        few (inline, no queue delay, no request for the instance threads queued ahead of it): a stream
        awaits such a request in line, which costs less than a task."""
        return rows <= self._inline_rows and not self._delay and not self._pending_large

    def _run_now(self, inputs: dict[str, np.ndarray], rows: int) -> list[np.ndarray]:
        """Runs one request on the event loop, without the future and queue entry of `_submit`."""
        metrics = self._metrics
        start = time.perf_counter()
        try:
            outputs = self._sessions[0].run(self._output_names, inputs)
        except Exception:
            if metrics is not None:
                metrics.ran_alone(rows, 0.0)  # as `_complete` records a failed batch
            raise
        if metrics is not None:
            metrics.ran_alone(rows, time.perf_counter() - start)
        return outputs

    def _submit(self, inputs: dict[str, np.ndarray], rows: int, deadline: float | None) -> asyncio.Future:
        """Queues one request; the future resolves to its outputs (see `run`)."""
        if self._closing:
            raise UnavailableError(f"model '{self.name}' is shutting down and takes no new requests")
        if len(self._pending) >= self._policy.max_queue_size:
            raise UnavailableError(
                f"model '{self.name}' queue is full ({len(self._pending)} requests waiting, "
                f"--max-queue-size {self._policy.max_queue_size}); retry later"
            )
        loop = self._loop
        future = loop.create_future()
        self._pending.append(_Request(inputs, rows, deadline, loop.time(), future))
        self._pending_rows += rows
        if rows > self._inline_rows:
            self._pending_large += 1
        if self._coalesce and rows <= self._inline_rows:
            self._coalescer.hold(self)
        elif self._idle or self._inline_rows:
            self._dispatch()
        return future

    def keep_holding(self, now: float) -> bool:
        """For the Coalescer: whether the held requests may wait for company (room left, the oldest young enough)."""
        pending = self._pending
        return (
            bool(pending)
            and not self._closing
            and self._pending_rows < self._max_inline_rows
            and now - pending[0].enqueued < COALESCE_MAX_S
        )

    def release(self) -> None:
        """For the Coalescer: run what is held."""
        self._dispatch()

    def _dispatch(self) -> None:
        """Runs or hands out batches while the next batch may close and something can run it."""
        loop = self._loop
        pending = self._pending
        while pending:
            in_thread = pending[0].rows > self._inline_rows
            if in_thread and not self._idle:
                break  # an instance frees up in _finish, which dispatches again
            max_rows = self._max_rows if in_thread else self._max_inline_rows
            if self._delay and not self._closing and self._pending_rows < max_rows:
                close_at = pending[0].enqueued + self._delay
                if loop.time() < close_at:
                    if self._timer is None:
                        self._timer = loop.call_at(close_at, self._on_timer)
                    return
            batch = self._take(loop.time(), max_rows, in_thread)
            if not batch:
                continue
            if in_thread:
                self._running += 1
                self._inboxes[self._idle.pop()].put(batch)
            else:
                self._run_inline(batch)
        self._check_drained()

    def _run_inline(self, batch: list[_Request]) -> None:
        outputs, error, elapsed = None, None, 0.0
        session = self._sessions[0]
        try:
            feeds = self._feeds(batch)
            start = time.perf_counter()
            outputs = session.run(self._output_names, feeds)
            elapsed = time.perf_counter() - start
        except Exception as exc:  # reported to each caller, or to the one it belongs to (`_apart`)
            error = exc
            if len(batch) > 1:
                outputs, error = self._apart(session, batch), None
        self._complete(batch, outputs, error, elapsed)

    def _feeds(self, batch: list[_Request]) -> dict[str, np.ndarray]:
        if len(batch) == 1:
            return batch[0].inputs
        return {name: np.concatenate([r.inputs[name] for r in batch]) for name in self._input_names}

    def _apart(self, session, batch: list[_Request]) -> _Apart:
        """Runs a batch that failed as a whole again in halves, down to single requests where a half fails
        too, so that each request gets its own outcome (see the module docstring). Runs where the batch ran
        (an instance thread or the event loop) and touches no future: the loop answers from the result."""
        apart = _Apart()
        self._run_halves(session, batch, apart)
        return apart

    def _run_halves(self, session, batch: list[_Request], apart: _Apart) -> None:
        half = len(batch) // 2
        for part in (batch[:half], batch[half:]):
            start = time.perf_counter()
            try:
                outputs = session.run(self._output_names, self._feeds(part))
            except Exception as exc:
                apart.runs.append((len(part), sum(r.rows for r in part), 0.0))  # as a failed batch counts
                if len(part) == 1:
                    apart.answers.append(exc)
                else:
                    self._run_halves(session, part, apart)
                continue
            apart.runs.append((len(part), sum(r.rows for r in part), time.perf_counter() - start))
            apart.answers.extend(_own_rows(part, outputs) if len(part) > 1 else [outputs])

    def _on_timer(self) -> None:
        self._timer = None
        self._dispatch()

    def _take(self, now: float, max_rows: int, in_thread: bool) -> list[_Request]:
        """Pops the next batch: whole requests of the oldest one's shapes up to `max_rows` rows (one request
        alone if it is bigger); requests of other shapes stay queued, in order. A batch for the event loop
        (`in_thread` False) stops before a request too large to run there, which can come first once a
        cancelled or expired head is dropped: `_dispatch` places it."""
        batch: list[_Request] = []
        rows = 0
        shape_of = self._shapes  # None: the requests of this model always agree
        shapes = None  # the batch's, read once a second request is considered
        other: list[_Request] | None = None  # requests of other shapes passed over, put back in order at the end
        pending = self._pending
        queue_seconds = self._metrics.queue_seconds if self._metrics is not None else None
        while pending:
            request = pending[0]
            if batch:
                if shape_of is not None:
                    if shapes is None:
                        shapes = shape_of(batch[0].inputs)
                    if shape_of(request.inputs) != shapes:
                        if other is None:
                            other = []
                        other.append(pending.popleft())
                        continue
                if rows + request.rows > max_rows:
                    break
            if not in_thread and request.rows > self._inline_rows:
                break
            pending.popleft()
            self._pending_rows -= request.rows
            if request.rows > self._inline_rows:
                self._pending_large -= 1
            if request.future.done():  # cancelled by its caller while queued
                continue
            if request.deadline is not None and request.deadline <= now:
                request.future.set_exception(
                    DeadlineExceededError(
                        f"deadline passed after {now - request.enqueued:.6f} s in model '{self.name}' queue; "
                        "the request was not run"
                    )
                )
                continue
            if queue_seconds is not None:
                queue_seconds.observe(now - request.enqueued)
            batch.append(request)
            rows += request.rows
            if rows >= max_rows:
                break
        if other is not None:
            pending.extendleft(reversed(other))
        if self._timer is not None:  # the timer belonged to the batch just closed
            self._timer.cancel()
            self._timer = None
        return batch

    def _work(self, index: int, session, inbox: queue.SimpleQueue) -> None:
        """An instance's thread: runs batches on its session, hands results back to the loop."""
        output_names = self._output_names
        while (batch := inbox.get()) is not None:
            outputs, error, elapsed = None, None, 0.0
            try:
                feeds = self._feeds(batch)
                start = time.perf_counter()
                outputs = session.run(output_names, feeds)
                elapsed = time.perf_counter() - start
            except Exception as exc:  # reported to each caller, or to its own (`_apart`); the thread keeps serving
                error = exc
                if len(batch) > 1:
                    outputs, error = self._apart(session, batch), None
            try:
                self._loop.call_soon_threadsafe(self._finish, index, batch, outputs, error, elapsed)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                return
            # Drop this thread's references now: held until the next batch, a large request's inputs and
            # outputs would stay in memory for as long as the server is idle.
            batch = feeds = outputs = error = None

    def _finish(self, index: int, batch: list[_Request], outputs, error: BaseException | None, elapsed: float) -> None:
        """Back on the loop after an instance thread ran a batch."""
        self._idle.append(index)
        self._running -= 1
        self._complete(batch, outputs, error, elapsed)
        self._dispatch()

    def _complete(self, batch: list[_Request], outputs, error: BaseException | None, elapsed: float) -> None:
        """Answers each request of a batch that ran: its own rows of every output, or the error; after a
        batch that failed as a whole (`outputs` an `_Apart`), each request's own outcome."""
        if self._metrics is not None:
            self._metrics.batch(len(batch), sum(r.rows for r in batch), elapsed)
        if error is not None:
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(error)
        elif len(batch) == 1:
            if not batch[0].future.done():
                batch[0].future.set_result(outputs)
        elif type(outputs) is _Apart:
            self._answer_apart(batch, outputs)
        else:
            start = 0
            for request in batch:
                end = start + request.rows
                if not request.future.done():
                    request.future.set_result([output[start:end] for output in outputs])
                start = end

    def _answer_apart(self, batch: list[_Request], apart: _Apart) -> None:
        if self._metrics is not None:
            for requests, rows, seconds in apart.runs:
                self._metrics.batch(requests, rows, seconds)
        for request, answer in zip(batch, apart.answers, strict=True):
            if request.future.done():
                continue
            if isinstance(answer, BaseException):
                request.future.set_exception(answer)
            else:
                request.future.set_result(answer)

    def _check_drained(self) -> None:
        if self._closing and not self._pending and not self._running:
            self._drained.set()

    def drain(self) -> Awaitable[bool]:
        """Refuses new requests from now on; the result completes when every queued and running one is answered.

        Queued requests no longer wait for their batch to fill.
        """
        self._closing = True
        self._dispatch()
        return self._drained.wait()

    async def close(self) -> None:
        """Fails what is still queued (UNAVAILABLE) and stops the instance threads."""
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._coalescer.cancel(self)
        while self._pending:
            request = self._pending.popleft()
            if not request.future.done():
                request.future.set_exception(UnavailableError(f"model '{self.name}' shut down before running it"))
        self._pending_rows = 0
        self._pending_large = 0
        for inbox in self._inboxes:
            inbox.put(None)
        # Threads are daemons: one stuck in a long run does not keep the process alive.
        for thread in self._threads:
            await asyncio.to_thread(thread.join, 5.0)
