"""Batches that always join: only requests whose non-batch dimensions agree share a batch, and a batch that
fails as a whole is run again in parts, so that only a request that fails on its own gets an error.

Unit tests drive the Batcher with a stand-in session; the end-to-end tests serve models with a dynamic
non-batch dimension (`features` FP32 [-1, -1]) built here with onnx.helper.
"""

from __future__ import annotations

import asyncio
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from conftest import metric_samples, outputs_of
from onnx import TensorProto, helper

from serving._proto import grpc_service_pb2 as pb
from serving._proto import grpc_service_pb2_grpc as pb_grpc
from serving.server.batching import Batcher, BatchPolicy

CLIENTS = 16
REQUESTS = 208  # 13 per client
WIDTHS = (3, 4, 5, 6)
QUEUE_DELAY_US = 2000  # long enough for batches to form under CLIENTS concurrent clients


# -- the Batcher with a stand-in session -------------------------------------------------------------


class SumSession:
    """Stands in for an ONNX Runtime session of `features` [-1, -1] -> `total` [-1, 1], the sum of each row.

    Like ONNX Runtime, it cannot run a batch whose inputs were not concatenated (np.concatenate fails first)
    and fails a whole run when any row holds a negative value (the culprit). `too_many_rows` makes runs of
    more rows fail too (a batch too large for the device). While `gate` is cleared, `run` blocks after
    setting `entered`, so a test can hold the instance busy. Records the feeds of every run, failed or not.
    """

    def __init__(self, too_many_rows: int | None = None) -> None:
        self.runs: list[dict[str, np.ndarray]] = []
        self.too_many_rows = too_many_rows
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def run(self, output_names, feeds):
        self.entered.set()
        self.gate.wait()
        self.runs.append({name: x.copy() for name, x in feeds.items()})
        x = feeds["features"]
        if (x < 0).any():
            raise RuntimeError("negative feature")
        if self.too_many_rows is not None and len(x) >= self.too_many_rows:
            raise RuntimeError("batch too large")
        total = x.sum(axis=1, keepdims=True)
        if "scale" in feeds:
            total = total * feeds["scale"].sum(axis=1, keepdims=True)
        return [total]

    def widths(self) -> list[int]:
        return [run["features"].shape[1] for run in self.runs]

    def sizes(self) -> list[int]:
        return [len(run["features"]) for run in self.runs]


def features(rows: int, width: int, start: float = 0.0) -> dict[str, np.ndarray]:
    return {"features": np.arange(rows * width, dtype=np.float32).reshape(rows, width) + start}


def batcher(session: SumSession, inputs=("features",), inline_rows: int = 0, **policy) -> Batcher:
    return Batcher("m/1", [session], list(inputs), ["total"], BatchPolicy(**policy), inline_rows=inline_rows)


def submit(b: Batcher, inputs: dict[str, np.ndarray]) -> asyncio.Task:
    """`b.run` as a task: it starts on the loop's next turn, as the requests of one turn of gRPC do."""
    return asyncio.ensure_future(b.run(inputs, len(inputs["features"])))


def expected_total(inputs: dict[str, np.ndarray]) -> np.ndarray:
    total = inputs["features"].sum(axis=1, keepdims=True)
    if "scale" in inputs:
        total = total * inputs["scale"].sum(axis=1, keepdims=True)
    return total


async def queued_behind_a_busy_instance(b: Batcher, session: SumSession, requests: list[dict[str, np.ndarray]]):
    """Holds the instance busy with a first request, queues `requests` behind it, then lets everything run;
    the outcomes of `requests` (outputs or exceptions) in order."""
    b.start()
    session.gate.clear()
    first = submit(b, features(1, 2, 1000))
    await asyncio.to_thread(session.entered.wait, 10)
    queued = [submit(b, x) for x in requests]
    await asyncio.sleep(0)  # let them queue
    session.gate.set()
    outcomes = await asyncio.gather(first, *queued, return_exceptions=True)
    await b.close()
    return outcomes[1:]


def test_queued_requests_of_different_widths_run_in_batches_of_one_width_each_in_arrival_order():
    requests = [
        features(rows, width, 10 * i)
        for i, (rows, width) in enumerate([(1, 3), (2, 4), (1, 3), (3, 5), (2, 4), (1, 3)])
    ]

    async def scenario():
        session = SumSession()
        return session, await queued_behind_a_busy_instance(batcher(session, max_batch_size=64), session, requests)

    session, outcomes = asyncio.run(scenario())
    assert session.widths() == [2, 3, 4, 5]  # the busy first request, then one batch per width, oldest first
    assert session.sizes() == [1, 3, 4, 3]  # requests of the same width still share a batch
    for x, (total,) in zip(requests, outcomes, strict=True):
        np.testing.assert_array_equal(total, expected_total(x))


def test_requests_share_a_batch_only_when_every_input_agrees_beyond_the_batch_axis():
    def request(width: int, scale_width: int, start: float) -> dict[str, np.ndarray]:
        return {**features(1, width, start), "scale": np.ones((1, scale_width), np.float32)}

    requests = [request(3, 1, 0), request(3, 2, 10), request(3, 1, 20), request(4, 1, 30)]

    async def scenario():
        session = SumSession()
        b = batcher(session, inputs=("features", "scale"), max_batch_size=64)
        return session, await queued_behind_a_busy_instance(b, session, requests)

    session, outcomes = asyncio.run(scenario())
    assert session.sizes() == [1, 2, 1, 1]
    for x, (total,) in zip(requests, outcomes, strict=True):
        np.testing.assert_array_equal(total, expected_total(x))


def test_a_batch_of_one_width_still_closes_at_max_batch_size_rows_with_others_queued_between():
    requests = [features(2, 3 + i % 2, i) for i in range(8)]  # widths 3, 4, 3, 4...: 8 rows of each

    async def scenario():
        session = SumSession()
        return session, await queued_behind_a_busy_instance(batcher(session, max_batch_size=4), session, requests)

    session, outcomes = asyncio.run(scenario())
    assert list(zip(session.sizes(), session.widths(), strict=True))[1:] == [(4, 3), (4, 4), (4, 3), (4, 4)]
    for x, (total,) in zip(requests, outcomes, strict=True):
        np.testing.assert_array_equal(total, expected_total(x))


def test_inline_requests_held_in_one_busy_turn_are_grouped_by_width():
    requests = [features(1, width, 10 * i) for i, width in enumerate([3, 4, 3, 4, 3])]

    async def scenario():
        session = SumSession()
        b = batcher(session, inline_rows=64, max_batch_size=64)
        b.start()
        outcomes = await asyncio.gather(*[submit(b, x) for x in requests])  # no await between: one busy turn
        await b.close()
        return session, outcomes

    session, outcomes = asyncio.run(scenario())
    assert list(zip(session.sizes(), session.widths(), strict=True)) == [(3, 3), (2, 4)]
    for x, (total,) in zip(requests, outcomes, strict=True):
        np.testing.assert_array_equal(total, expected_total(x))


@pytest.mark.parametrize("inline_rows", [0, 64], ids=["instance_thread", "event_loop"])
def test_a_failed_batch_is_run_again_in_halves_and_only_the_culprit_gets_an_error(inline_rows):
    requests = [features(1, 3, 10 * i) for i in range(8)]
    requests[5] = {"features": -np.ones((1, 3), np.float32)}  # fails any run it is part of

    async def scenario():
        session = SumSession()
        b = batcher(session, inline_rows=inline_rows, max_batch_size=64, max_queue_delay_us=1000)
        b.start()
        outcomes = await asyncio.gather(*[submit(b, x) for x in requests], return_exceptions=True)
        await b.close()
        return session, outcomes

    session, outcomes = asyncio.run(scenario())
    # The joint run, its halves, and the halves of each failing half down to the culprit alone.
    assert session.sizes() == [8, 4, 4, 2, 1, 1, 2]
    assert isinstance(outcomes[5], RuntimeError) and "negative feature" in str(outcomes[5])
    for i, (x, outcome) in enumerate(zip(requests, outcomes, strict=True)):
        if i != 5:
            np.testing.assert_array_equal(outcome[0], expected_total(x))


def test_requests_that_fail_only_together_all_succeed_and_culprits_fail_each_with_their_own_error():
    requests = [features(1, 3, 10 * i) for i in range(6)]
    requests[0] = {"features": -np.ones((1, 3), np.float32)}
    requests[4] = {"features": -2 * np.ones((1, 3), np.float32)}

    async def scenario():
        session = SumSession(too_many_rows=4)  # runs of 4 rows or more fail whatever they hold
        return session, await queued_behind_a_busy_instance(batcher(session, max_batch_size=64), session, requests)

    session, outcomes = asyncio.run(scenario())
    assert [i for i, outcome in enumerate(outcomes) if isinstance(outcome, BaseException)] == [0, 4]
    assert outcomes[0] is not outcomes[4]  # each culprit's own run's error
    for i in (1, 2, 3, 5):
        np.testing.assert_array_equal(outcomes[i][0], expected_total(requests[i]))


# -- end to end --------------------------------------------------------------------------------------


def build_models(root: Path) -> Path:
    """`widths`: `features` FP32 [-1, -1] -> `total` FP32 [-1, 1], each row's sum. `picker`: the same plus
    `index` INT64 [-1, 1] -> `picked` FP32 [-1, 1], each row's feature at its index (GatherElements fails
    the whole run for an index out of range)."""
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    features_info = helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", "n"])
    total_info = helper.make_tensor_value_info("total", TensorProto.FLOAT, ["batch", 1])
    total = helper.make_node("ReduceSum", ["features", "axes"], ["total"], keepdims=1)
    graphs = {
        "widths": helper.make_graph([total], "widths", [features_info], [total_info], initializer=[axes]),
        "picker": helper.make_graph(
            [total, helper.make_node("GatherElements", ["features", "index"], ["picked"], axis=1)],
            "picker",
            [features_info, helper.make_tensor_value_info("index", TensorProto.INT64, ["batch", 1])],
            [total_info, helper.make_tensor_value_info("picked", TensorProto.FLOAT, ["batch", 1])],
            initializer=[axes],
        ),
    }
    for name, graph in graphs.items():
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
        onnx.checker.check_model(model)
        path = root / name / "1" / "model.onnx"
        path.parent.mkdir(parents=True)
        onnx.save(model, path)
    return root


@pytest.fixture(scope="module")
def shapes_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_models(tmp_path_factory.mktemp("shapes-repository"))


def tensor(name: str, x: np.ndarray) -> tuple[pb.ModelInferRequest.InferInputTensor, bytes]:
    datatype = {np.float32: "FP32", np.int64: "INT64"}[x.dtype.type]
    return pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=list(x.shape)), x.tobytes()


def infer(model: str, outputs: tuple[str, ...] = (), **inputs: np.ndarray) -> pb.ModelInferRequest:
    tensors, raws = zip(*(tensor(name, x) for name, x in inputs.items()), strict=True)
    wanted = [pb.ModelInferRequest.InferRequestedOutputTensor(name=name) for name in outputs]
    return pb.ModelInferRequest(model_name=model, inputs=tensors, raw_input_contents=raws, outputs=wanted)


def batch_requests(address: str, model: str) -> dict[str, float]:
    """The model's histogram of requests per batch: 'count', 'sum' and its buckets by `le`."""
    found = {}
    for sample in metric_samples(address):
        if sample.name.startswith("xorserve_batch_size_requests") and sample.labels.get("model") == model:
            found[sample.labels.get("le") or sample.name.rsplit("_", 1)[1]] = sample.value
    return found


def test_concurrent_clients_of_mixed_widths_all_get_their_own_right_answers(server_factory, shapes_repository):
    handle = server_factory(model_repository=shapes_repository, max_queue_delay_us=QUEUE_DELAY_US)
    rng = random.Random(0)
    plan = [(rng.randint(1, 3), rng.choice(WIDTHS)) for _ in range(REQUESTS)]

    def client(first: int) -> list[tuple[np.ndarray, object]]:
        answers = []
        with grpc.insecure_channel(handle.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for i in range(first, REQUESTS, CLIENTS):
                rows, width = plan[i]
                x = np.arange(rows * width, dtype=np.float32).reshape(rows, width) + i  # integers: exact sums
                try:
                    answers.append((x, outputs_of(stub.ModelInfer(infer("widths", features=x), timeout=60))))
                except grpc.RpcError as error:
                    answers.append((x, error.code()))
        return answers

    with ThreadPoolExecutor(CLIENTS) as pool:
        answers = [answer for answers in pool.map(client, range(CLIENTS)) for answer in answers]

    assert len(answers) == REQUESTS
    failed = [outcome for _, outcome in answers if not isinstance(outcome, dict)]
    assert failed == []
    for x, outcome in answers:
        np.testing.assert_array_equal(outcome["total"], x.sum(axis=1, keepdims=True))
    histogram = batch_requests(handle.running.metrics_address, "widths")
    assert histogram["sum"] > histogram["count"]  # some batches held more than one request: batching is on


def test_a_request_that_fails_a_joint_batch_fails_alone_with_its_own_status_and_the_others_are_answered(
    server_factory, shapes_repository
):
    # A queue delay long enough that every request below, sent at once, joins one batch.
    handle = server_factory(model_repository=shapes_repository, max_queue_delay_us=300_000)
    good = [np.arange(4, dtype=np.float32).reshape(1, 4) + 10 * i for i in range(7)]
    culprit = np.arange(4, dtype=np.float32).reshape(1, 4)
    bad_index = np.array([[9]], dtype=np.int64)  # out of range for 4 features
    with grpc.insecure_channel(handle.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as alone:
            stub.ModelInfer(infer("picker", features=culprit, index=bad_index), timeout=60)
        calls = [
            # Half of them ask for one output only: what a request asks for does not keep it from a batch.
            stub.ModelInfer.future(
                infer("picker", ("total",) if i % 2 else (), features=x, index=np.array([[i % 4]], np.int64)),
                timeout=60,
            )
            for i, x in enumerate(good)
        ]
        culprit_call = stub.ModelInfer.future(infer("picker", features=culprit, index=bad_index), timeout=60)
        calls.insert(3, culprit_call)
        outcomes = [call.exception() or call.result() for call in calls]

    assert isinstance(outcomes[3], grpc.RpcError)
    assert outcomes[3].code() == alone.value.code()  # the culprit's own status, as when it ran alone
    answers = [outputs_of(outcome) for i, outcome in enumerate(outcomes) if i != 3]
    for i, (x, got) in enumerate(zip(good, answers, strict=True)):
        np.testing.assert_array_equal(got["total"], x.sum(axis=1, keepdims=True))
        if i % 2:
            assert set(got) == {"total"}
        else:
            np.testing.assert_array_equal(got["picked"], x[:, [i % 4]])
    histogram = batch_requests(handle.running.metrics_address, "picker")
    assert histogram["8.0"] - histogram["4.0"] >= 1  # the joint run of all 8 that failed, before its halves
