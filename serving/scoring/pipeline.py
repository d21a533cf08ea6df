"""The scoring pipeline: read -> validate -> score (up to N chunks in flight) -> write, in input order.

Three kinds of thread overlap, each mostly outside the GIL: a reader thread parses and validates
chunks ahead (Arrow), a pool of `concurrency` threads scores them (ONNX Runtime or gRPC) and builds
their output rows, and the calling thread hands those to the writer in input order. At most
`concurrency + PREFETCH + 1` chunks are between reading and writing at once, whatever the file's
size (`Summary.max_rows_held` reports the most rows); what a writer buffers is its own bound.
The calling thread only ever waits on locks (a queue, a future, a join), which a signal interrupts: a
SIGINT or SIGTERM stops the pipeline within about a chunk's work (`serving.scoring.interrupts`).
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from serving.scoring import interrupts
from serving.scoring.readers import Chunk
from serving.scoring.validate import Features, features

PREFETCH = 2  # validated chunks waiting for a scoring slot
# The columns scoring adds. Never null, and declared so: Parquet then writes no definition levels.
PROBABILITY = pa.field("probability", pa.float32(), nullable=False)
LABEL = pa.field("label", pa.int64(), nullable=False)


@dataclass
class Summary:
    rows_read: int = 0
    rows_scored: int = 0
    rows_rejected: int = 0
    max_rows_held: int = 0
    seconds: float = 0.0  # the pipeline's; `xorserve score` reports up to the files being in place


@dataclass
class Prepared:
    chunk: Chunk
    features: Features
    kept: pa.Table  # the chunk's rows that will be scored, in the output's column types


class _Held:
    """Rows between being read and being written, and the most there ever were."""

    def __init__(self):
        self._lock = threading.Lock()
        self.now = self.most = 0

    def add(self, rows: int) -> None:
        with self._lock:
            self.now += rows
            self.most = max(self.most, self.now)

    def remove(self, rows: int) -> None:
        with self._lock:
            self.now -= rows


class _Prefetch:
    """Runs an iterator in a thread, at most `depth` items ahead of the consumer."""

    _DONE = object()

    def __init__(self, items: Iterator, depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(items,), name="score-reader", daemon=True)
        self._thread.start()

    def _run(self, items: Iterator) -> None:
        try:
            for item in items:
                self._queue.put(item)
                if self._stop.is_set():
                    return
            self._queue.put(self._DONE)
        except BaseException as exc:  # handed to the consumer, which raises it
            self._queue.put(exc)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    def __iter__(self) -> Iterator:
        while True:
            item = self._queue.get()
            if item is self._DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        # Emptying the queue once is enough: the producer puts at most one more item, then sees the stop.
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join()


def prepare_chunk(chunk: Chunk, feature_names: list[str], typed_features: bool) -> Prepared:
    """Validates a chunk: its feature matrix, its rejects (naming the chunk's file) and the rows to keep."""
    found = features(chunk.table, feature_names, chunk.rows)
    for reject in found.rejects:
        reject.file = chunk.file
    kept = chunk.table
    if typed_features:
        for name, values in found.parsed.items():
            kept = kept.set_column(kept.schema.get_field_index(name), name, values)
    if found.ok is not None:
        kept = kept.filter(pa.array(found.ok))
    return Prepared(chunk, found, kept)


def scored_rows(prepared: Prepared, score: Callable[[np.ndarray], np.ndarray]) -> pa.Table:
    """The chunk's output rows; runs in the pool, so that the writing thread only writes."""
    x = prepared.features.x
    probabilities = score(x) if len(x) else np.empty(0, np.float32)
    labels = (probabilities >= 0.5).astype(np.int64)
    table = prepared.kept.append_column(PROBABILITY, pa.array(probabilities))  # zero-copy
    return table.append_column(LABEL, pa.array(labels))


def score_chunks(
    chunks: Iterator[Chunk],
    score: Callable[[np.ndarray], np.ndarray],
    write: Callable[[pa.Table], None],
    write_rejects: Callable[[list], None],
    *,
    feature_names: list[str],
    typed_features: bool,
    concurrency: int,
    progress: Callable[[int], None] | None = None,
) -> Summary:
    """Score every chunk through `score` (called from `concurrency` threads) and write the results in order.

    `typed_features`: write text feature columns as the float64 values they were parsed to (for a
    typed output such as Parquet from CSV); otherwise the input's values pass through unchanged.
    """
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    summary = Summary()
    held = _Held()
    started = time.perf_counter()

    def prepare(chunk: Chunk) -> Prepared:
        held.add(chunk.rows_read)
        return prepare_chunk(chunk, feature_names, typed_features)

    def finish(prepared: Prepared, future: Future) -> None:
        interrupts.check()  # a signal that could only be noted (see interrupts) stops the run at the next chunk
        table = future.result()
        write(table)
        rejects = prepared.chunk.malformed + prepared.features.rejects
        if rejects:
            write_rejects(sorted(rejects, key=lambda r: r.row))
        summary.rows_read += prepared.chunk.rows_read
        summary.rows_scored += table.num_rows
        summary.rows_rejected += len(rejects)
        held.remove(prepared.chunk.rows_read)
        if progress is not None:
            progress(prepared.chunk.rows_read)

    reader = _Prefetch((prepare(chunk) for chunk in chunks), depth=PREFETCH)
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="score")
    pending: collections.deque[tuple[Prepared, Future]] = collections.deque()
    try:
        for prepared in reader:
            pending.append((prepared, pool.submit(scored_rows, prepared, score)))
            if len(pending) >= concurrency:
                finish(*pending.popleft())
        while pending:
            finish(*pending.popleft())
    finally:
        with interrupts.deferred():  # a signal now (SIGINT, SIGTERM) waits until both threads are told to stop
            reader.close()
            # Do not wait for requests still in flight: closing the back-end cancels them.
            pool.shutdown(wait=False, cancel_futures=True)
    if summary.rows_read != summary.rows_scored + summary.rows_rejected:
        raise AssertionError(f"rows unaccounted for: {summary}")
    summary.max_rows_held = held.most
    summary.seconds = time.perf_counter() - started
    return summary
