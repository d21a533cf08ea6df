"""The server under concurrent load: exact rows per caller with batching, and a SIGTERM that loses nothing."""

from __future__ import annotations

import asyncio
import signal

import grpc
import numpy as np
import pytest
from conftest import cpu_outputs, infer_request, metric_samples, outputs_of

from serving._proto import grpc_service_pb2 as pb
from serving._proto import grpc_service_pb2_grpc as pb_grpc
from serving.client.launch import ServerProcess

CLIENTS = 64


def client_inputs(seed: int) -> list[np.ndarray]:
    """64 distinct requests of 1 to 7 rows."""
    rng = np.random.default_rng(seed)
    return [rng.uniform(-2, 2, size=(1 + i % 7, 2)).astype(np.float32) for i in range(CLIENTS)]


async def one_call_per_client(address: str, inputs: list[np.ndarray]) -> list[pb.ModelInferResponse]:
    channels = [grpc.aio.insecure_channel(address) for _ in inputs]
    try:
        stubs = [pb_grpc.GRPCInferenceServiceStub(channel) for channel in channels]
        calls = [
            stub.ModelInfer(infer_request(x, request_id=f"c{i}"), timeout=60)
            for i, (stub, x) in enumerate(zip(stubs, inputs, strict=True))
        ]
        return await asyncio.gather(*calls)
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))


def test_64_concurrent_clients_each_get_exactly_their_rows_from_shared_batches(server_factory, model_repository):
    # A queue delay long enough that concurrent requests meet in the queue on a busy 2-core machine.
    handle = server_factory(max_batch_size=64, max_queue_delay_us=50_000)
    inputs = client_inputs(seed=5)
    responses = asyncio.run(one_call_per_client(handle.address, inputs))

    for i, (x, response) in enumerate(zip(inputs, responses, strict=True)):
        assert response.id == f"c{i}"
        expected = cpu_outputs(model_repository / "xor" / "1" / "model.onnx", x)["logits"]
        np.testing.assert_array_equal(outputs_of(response)["logits"], expected)

    samples = {
        (sample.name, sample.labels.get("le", "")): sample.value
        for sample in metric_samples(handle.running.metrics_address)
        if sample.labels.get("model") == "xor"
    }
    assert samples[("xorserve_batch_size_rows_sum", "")] == sum(len(x) for x in inputs)
    batches = samples[("xorserve_batch_size_requests_count", "")]
    single_request_batches = samples[("xorserve_batch_size_requests_bucket", "1.0")]
    assert single_request_batches < batches, "no batch combined two or more requests"
    assert batches < CLIENTS


async def load_until_refused(address: str, inputs: list[np.ndarray], on_progress) -> list[tuple[int, object]]:
    """Each client sends its request again and again until the server refuses it; returns (client, outcome)."""
    outcomes: list[tuple[int, object]] = []

    async def client(index: int, x: np.ndarray) -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            while True:
                try:
                    response = await stub.ModelInfer(infer_request(x, request_id=f"c{index}"), timeout=60)
                except grpc.aio.AioRpcError as exc:
                    outcomes.append((index, exc))
                    return
                outcomes.append((index, response))
                on_progress(len(outcomes))

    await asyncio.gather(*(client(i, x) for i, x in enumerate(inputs)))
    return outcomes


@pytest.mark.slow
def test_sigterm_under_64_client_load_loses_no_request_and_exits_0(model_repository):
    inputs = client_inputs(seed=9)
    expected = [cpu_outputs(model_repository / "xor" / "1" / "model.onnx", x)["logits"] for x in inputs]
    server = ServerProcess.start(model_repository, ["--max-queue-delay-us", "2000", "--grace-s", "20"])
    try:
        signalled: list[int] = []

        def signal_after_some_answers(answered: int) -> None:
            if answered >= 4 * CLIENTS and not signalled:
                signalled.append(answered)
                server.process.send_signal(signal.SIGTERM)

        outcomes = asyncio.run(load_until_refused(server.url, inputs, signal_after_some_answers))
        exit_code = server.process.wait(60)
    finally:
        server.stop()

    assert signalled, "the load ended before the server was signalled"
    assert exit_code == 0, "\n".join(server.output)
    answered = [(i, o) for i, o in outcomes if isinstance(o, pb.ModelInferResponse)]
    refused = [o for _, o in outcomes if not isinstance(o, pb.ModelInferResponse)]
    assert len(answered) >= 4 * CLIENTS
    for index, response in answered:
        np.testing.assert_array_equal(outputs_of(response)["logits"], expected[index])
    # Every request not answered was refused before it ran: by the draining server, or because the
    # server had stopped listening. None was cut off in flight (CANCELLED, INTERNAL, reset, ...).
    assert len(refused) == CLIENTS
    for error in refused:
        assert error.code() == grpc.StatusCode.UNAVAILABLE, (error.code(), error.details())
        assert "shutting down" in error.details() or "connect" in error.details().lower(), error.details()
