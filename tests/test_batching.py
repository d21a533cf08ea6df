"""The dynamic batcher: batch closing, exact split-back, oversize requests, deadlines, back-pressure, draining."""

from __future__ import annotations

import asyncio
import sys
import threading

import numpy as np
import pytest

from serving.server.batching import READY_QUEUE_PYTHONS, Batcher, BatchPolicy, ready_queue
from serving.server.errors import DeadlineExceededError, UnavailableError


class RecordingSession:
    """Stands in for an ONNX Runtime session: output = input * 2 + 1; records each batch's row count.

    While `gate` is cleared, `run` blocks (after setting `entered`), so a test can hold an instance busy.
    """

    def __init__(self) -> None:
        self.batches: list[np.ndarray] = []
        self.threads: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def run(self, output_names, feeds):
        self.entered.set()
        self.gate.wait()
        x = feeds["input"]
        self.batches.append(x.copy())
        self.threads.append(threading.current_thread().name)
        return [x * 2 + 1]


def request(rows: int, start: float) -> dict[str, np.ndarray]:
    return {"input": (np.arange(rows * 2, dtype=np.float32).reshape(rows, 2) + start)}


def batcher(session: RecordingSession, inline_rows: int = 0, **policy) -> Batcher:
    return Batcher("m/1", [session], ["input"], ["output"], BatchPolicy(**policy), inline_rows=inline_rows)


async def wait_entered(session: RecordingSession) -> None:
    await asyncio.to_thread(session.entered.wait, 10)


def submit(b: Batcher, inputs, rows: int, deadline: float | None = None) -> asyncio.Task:
    """`b.run` as a task: it starts on the loop's next turn, as the requests of one turn of gRPC do."""
    return asyncio.ensure_future(b.run(inputs, rows, deadline))


async def next_turn() -> None:
    """Lets the tasks created so far start (and queue their requests)."""
    await asyncio.sleep(0)


def run_at_once(b: Batcher, inputs, rows: int):
    """b.run's outputs when it completes without waiting for anything; None when it had to wait."""
    coroutine = b.run(inputs, rows)
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    return None


def test_each_caller_gets_exactly_its_own_rows_from_a_shared_batch():
    async def scenario():
        session = RecordingSession()
        b = batcher(session, max_batch_size=64)
        b.start()
        session.gate.clear()
        first = submit(b, request(1, 1000), 1)
        await wait_entered(session)  # the instance is busy: the next requests queue up together
        inputs = [request(rows, 100 * i) for i, rows in enumerate([1, 3, 7, 2, 5])]
        futures = [submit(b, x, len(x["input"])) for x in inputs]
        session.gate.set()
        results = await asyncio.gather(first, *futures)
        await b.drain()
        await b.close()
        return session, inputs, results[1:]

    session, inputs, results = asyncio.run(scenario())
    assert [len(batch) for batch in session.batches] == [1, 18]
    for x, (output,) in zip(inputs, results, strict=True):
        np.testing.assert_array_equal(output, x["input"] * 2 + 1)


def test_a_batch_closes_at_max_batch_size_rows_without_splitting_requests():
    async def scenario():
        session = RecordingSession()
        b = batcher(session, max_batch_size=8)
        b.start()
        session.gate.clear()
        first = submit(b, request(1, 0), 1)
        await wait_entered(session)
        futures = [submit(b, request(3, i), 3) for i in range(5)]  # 15 rows: batches of 6, 6, 3
        session.gate.set()
        await asyncio.gather(first, *futures)
        await b.close()
        return session

    session = asyncio.run(scenario())
    assert [len(batch) for batch in session.batches] == [1, 6, 6, 3]


def test_a_request_larger_than_max_batch_size_runs_alone():
    async def scenario():
        session = RecordingSession()
        b = batcher(session, max_batch_size=4)
        b.start()
        session.gate.clear()
        first = submit(b, request(1, 0), 1)
        await wait_entered(session)
        small, big, after = submit(b, request(2, 1), 2), submit(b, request(9, 2), 9), submit(b, request(1, 3), 1)
        session.gate.set()
        results = await asyncio.gather(first, small, big, after)
        await b.close()
        return session, results

    session, results = asyncio.run(scenario())
    assert [len(batch) for batch in session.batches] == [1, 2, 9, 1]
    np.testing.assert_array_equal(results[2][0], request(9, 2)["input"] * 2 + 1)


def test_the_queue_delay_closes_a_batch_that_never_fills():
    async def scenario():
        session = RecordingSession()
        b = batcher(session, max_batch_size=1000, max_queue_delay_us=2000)
        b.start()
        (output,) = await asyncio.wait_for(submit(b, request(2, 0), 2), 10)
        await b.close()
        return output

    np.testing.assert_array_equal(asyncio.run(scenario()), request(2, 0)["input"] * 2 + 1)


def test_with_batching_disabled_every_request_runs_alone():
    async def scenario():
        session = RecordingSession()
        b = batcher(session, max_batch_size=64, enabled=False)
        b.start()
        session.gate.clear()
        first = submit(b, request(1, 0), 1)
        await wait_entered(session)
        futures = [submit(b, request(2, i), 2) for i in range(3)]
        session.gate.set()
        await asyncio.gather(first, *futures)
        await b.close()
        return session

    assert [len(batch) for batch in asyncio.run(scenario()).batches] == [1, 2, 2, 2]


def test_a_request_whose_deadline_passed_in_the_queue_fails_without_running():
    async def scenario():
        session = RecordingSession()
        b = batcher(session, max_batch_size=64)
        b.start()
        session.gate.clear()
        first = submit(b, request(1, 0), 1)
        await wait_entered(session)
        loop = asyncio.get_running_loop()
        expired = submit(b, request(5, 7), 5, deadline=loop.time())  # due now: past by the time it is taken
        alive = submit(b, request(2, 9), 2, deadline=loop.time() + 3600)
        session.gate.set()
        outcomes = await asyncio.gather(first, expired, alive, return_exceptions=True)
        await b.close()
        return session, outcomes

    session, (_, expired, alive) = asyncio.run(scenario())
    assert isinstance(expired, DeadlineExceededError)
    assert "not run" in str(expired)
    assert [len(batch) for batch in session.batches] == [1, 2]
    np.testing.assert_array_equal(alive[0], request(2, 9)["input"] * 2 + 1)


def test_a_full_queue_refuses_new_requests_as_unavailable():
    async def scenario():
        session = RecordingSession()
        b = batcher(session, max_batch_size=64, max_queue_size=2)
        b.start()
        session.gate.clear()
        first = submit(b, request(1, 0), 1)
        await wait_entered(session)
        queued = [submit(b, request(1, i), 1) for i in range(2)]
        await next_turn()
        with pytest.raises(UnavailableError, match="queue is full"):
            await b.run(request(1, 5), 1)
        session.gate.set()
        await asyncio.gather(first, *queued)
        await b.close()

    asyncio.run(scenario())


def test_drain_answers_queued_requests_and_refuses_new_ones():
    async def scenario():
        session = RecordingSession()
        b = batcher(session, max_batch_size=2)
        b.start()
        session.gate.clear()
        first = submit(b, request(1, 0), 1)
        await wait_entered(session)
        queued = [submit(b, request(2, i), 2) for i in range(3)]
        await next_turn()
        drained = b.drain()
        with pytest.raises(UnavailableError, match="shutting down"):
            await b.run(request(1, 9), 1)
        session.gate.set()
        await drained
        results = await asyncio.gather(first, *queued)
        await b.close()
        return results

    results = asyncio.run(scenario())
    assert len(results) == 4


def test_a_failing_run_fails_only_that_batch_and_the_instance_keeps_serving():
    class FailsOnNegative(RecordingSession):
        def run(self, output_names, feeds):
            if (feeds["input"] < 0).any():
                raise RuntimeError("boom")
            return super().run(output_names, feeds)

    async def scenario():
        session = FailsOnNegative()
        b = batcher(session, max_batch_size=64)
        b.start()
        with pytest.raises(RuntimeError, match="boom"):
            await submit(b, {"input": -np.ones((1, 2), np.float32)}, 1)
        (output,) = await submit(b, request(1, 0), 1)
        await b.close()
        return output

    np.testing.assert_array_equal(asyncio.run(scenario()), request(1, 0)["input"] * 2 + 1)


def test_inline_mode_runs_batches_on_the_event_loop_and_oversized_requests_in_a_thread():
    async def scenario():
        session = RecordingSession()
        b = batcher(session, inline_rows=8, max_batch_size=8, max_queue_delay_us=1_000_000)
        b.start()
        small = [request(rows, 10 * rows) for rows in (3, 5)]  # 8 rows: the batch closes full, at once
        futures = [submit(b, x, len(x["input"])) for x in small]
        big = request(9, 0)
        results = await asyncio.gather(*futures, submit(b, big, 9))
        await b.close()
        return session, small + [big], results

    session, inputs, results = asyncio.run(scenario())
    assert [len(batch) for batch in session.batches] == [8, 9]
    assert session.threads[0] == threading.main_thread().name
    assert session.threads[1] != threading.main_thread().name
    for x, (output,) in zip(inputs, results, strict=True):
        np.testing.assert_array_equal(output, x["input"] * 2 + 1)


def test_inline_requests_submitted_while_the_loop_is_busy_run_as_one_batch():
    async def scenario():
        session = RecordingSession()
        b = batcher(session, inline_rows=64, max_batch_size=64)
        b.start()
        inputs = [request(rows, 100 * rows) for rows in (1, 4, 2, 3)]
        futures = [submit(b, x, len(x["input"])) for x in inputs]  # no await between: one busy turn
        results = await asyncio.gather(*futures)
        await b.close()
        return session, inputs, results

    session, inputs, results = asyncio.run(scenario())
    assert [len(batch) for batch in session.batches] == [10]
    for x, (output,) in zip(inputs, results, strict=True):
        np.testing.assert_array_equal(output, x["input"] * 2 + 1)


def test_a_lone_inline_request_runs_at_once_when_the_loop_is_idle():
    async def scenario():
        session = RecordingSession()
        b = batcher(session, inline_rows=64, max_batch_size=64)
        b.start()
        x = request(2, 0)
        outputs = run_at_once(b, x, 2)
        await b.close()
        return session, x, outputs

    session, x, outputs = asyncio.run(scenario())
    assert outputs is not None
    np.testing.assert_array_equal(outputs[0], x["input"] * 2 + 1)
    assert [len(batch) for batch in session.batches] == [2]


def test_a_held_request_still_runs_while_the_loop_never_goes_idle():
    async def scenario():
        session = RecordingSession()
        b = batcher(session, inline_rows=64, max_batch_size=64)
        b.start()
        loop = asyncio.get_running_loop()
        stop = False

        def spin() -> None:  # keeps a callback ready on every turn of the loop
            if not stop:
                loop.call_soon(spin)

        spin()
        assert run_at_once(b, request(1, 0), 1) is None  # the loop is busy: the request is held instead
        (output,) = await asyncio.wait_for(b.run(request(1, 0), 1), 10)
        stop = True
        await b.close()
        return output

    np.testing.assert_array_equal(asyncio.run(scenario()), request(1, 0)["input"] * 2 + 1)


def test_with_batching_disabled_inline_requests_still_run_one_by_one():
    async def scenario():
        session = RecordingSession()
        b = batcher(session, inline_rows=64, max_batch_size=64, enabled=False)
        b.start()
        futures = [submit(b, request(rows, rows), rows) for rows in (1, 2, 3)]
        await asyncio.gather(*futures)
        await b.close()
        return session

    assert [len(batch) for batch in asyncio.run(scenario()).batches] == [1, 2, 3]


def test_batches_on_the_event_loop_hold_at_most_inline_rows_and_larger_requests_run_in_a_thread():
    async def scenario():
        session = RecordingSession()
        b = batcher(session, inline_rows=4, max_batch_size=64)
        b.start()
        small = [request(rows, 100 * i) for i, rows in enumerate((1, 2, 3, 2))]
        futures = [submit(b, x, len(x["input"])) for x in small]  # one busy turn: all held together
        results = await asyncio.gather(*futures)
        big = request(6, 7)  # more rows than run on the loop: an instance thread runs it
        results.append(await submit(b, big, 6))
        await b.close()
        return session, small + [big], results

    session, inputs, results = asyncio.run(scenario())
    assert [len(batch) for batch in session.batches] == [3, 3, 2, 6]
    main = threading.main_thread().name
    assert session.threads[:3] == [main] * 3 and session.threads[3] != main
    for x, (output,) in zip(inputs, results, strict=True):
        np.testing.assert_array_equal(output, x["input"] * 2 + 1)


@pytest.mark.parametrize(
    ("budget_us", "expected"),
    [(0, (0, 0.0)), (1000, (64, 64e-6)), (10, (8, 8e-6)), (8, (8, 8e-6)), (0.5, (0, 1e-6))],
)
def test_rows_within_halves_the_largest_batch_until_it_runs_within_the_budget(monkeypatch, budget_us, expected):
    from serving.server import repository

    tried = []

    def run_seconds(loaded, rows):  # a model that takes 1 us per row
        tried.append(rows)
        return rows * 1e-6

    monkeypatch.setattr(repository, "run_seconds", run_seconds)
    assert repository.rows_within(None, 64, budget_us * 1e-6) == expected
    assert tried == [64, 32, 16, 8, 4, 2, 1][: len(tried)]


@pytest.mark.parametrize("how", ["cancelled", "expired"])
def test_a_large_request_behind_a_dropped_small_one_still_runs_in_a_thread(how):
    async def scenario():
        session = RecordingSession()
        b = batcher(session, inline_rows=4, max_batch_size=8)
        b.start()
        loop = asyncio.get_running_loop()
        session.gate.clear()
        first = submit(b, request(8, 0), 8)  # the only instance is busy with it
        await wait_entered(session)
        second = submit(b, request(8, 100), 8)
        small = submit(b, request(1, 200), 1, deadline=loop.time() + 0.01 if how == "expired" else None)
        large = submit(b, request(8, 300), 8)  # too large for the event loop
        await next_turn()
        assert not b.answers_soon(1)  # a small request now would wait for the thread: not held in line
        if how == "cancelled":
            small.cancel()
        else:
            await asyncio.sleep(0.05)
        session.gate.set()
        await asyncio.gather(first, second, large)
        await b.close()
        return session

    session = asyncio.run(scenario())
    (where,) = [thread for batch, thread in zip(session.batches, session.threads, strict=True) if batch[0, 0] == 300]
    assert where != threading.main_thread().name
    assert sorted(len(batch) for batch in session.batches) == [8, 8, 8]


def test_the_ready_queue_is_read_only_where_it_was_tested_and_is_a_deque_that_call_soon_fills():
    # The private name this module reads (asyncio's `loop._ready`): fails the day a tested Python changes it.
    async def scenario():
        loop = asyncio.get_running_loop()
        ready = ready_queue(loop)
        if sys.version_info[:2] not in READY_QUEUE_PYTHONS:
            assert ready is None
            return
        assert ready is not None
        before = len(ready)
        handle = loop.call_soon(lambda: None)
        assert len(ready) == before + 1
        handle.cancel()

    asyncio.run(scenario())


@pytest.fixture
def without_ready_queue(monkeypatch):
    """Coalescing as on a Python whose ready queue it does not read: public behaviour only."""
    monkeypatch.setattr("serving.server.batching.ready_queue", lambda loop: None)


def test_without_the_ready_queue_nothing_is_held_and_each_request_gets_its_own_rows(without_ready_queue):
    async def scenario():
        session = RecordingSession()
        b = batcher(session, inline_rows=64, max_batch_size=64)
        b.start()
        inputs = [request(rows, 100 * rows) for rows in (1, 4, 2, 3)]
        results = await asyncio.gather(*[submit(b, x, len(x["input"])) for x in inputs])
        lone = await asyncio.wait_for(b.run(request(1, 7), 1), 10)
        await b.close()
        return session, inputs, results, lone

    session, inputs, results, lone = asyncio.run(scenario())
    assert [len(batch) for batch in session.batches] == [1, 4, 2, 3, 1]  # each ran at once, as it came
    for x, (output,) in zip(inputs, results, strict=True):
        np.testing.assert_array_equal(output, x["input"] * 2 + 1)
    np.testing.assert_array_equal(lone[0], request(1, 7)["input"] * 2 + 1)
