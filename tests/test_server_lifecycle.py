"""Start-up, readiness, draining and deadlines: a broken model, --device cuda without CUDA, SIGTERM
semantics over the wire, the READY line, and a serve path free of torch."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
from conftest import cpu_outputs, infer_request, outputs_of
from grpc_health.v1 import health_pb2, health_pb2_grpc

import serving.server.repository
from serving._proto import grpc_service_pb2 as pb
from serving._proto import grpc_service_pb2_grpc as pb_grpc
from serving.client.launch import ServerProcess
from serving.devices import CUDA
from serving.runtime import open_session

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def rows(n: int) -> np.ndarray:
    return np.arange(2 * n, dtype=np.float32).reshape(n, 2) / 10


class GatedSession:
    """An ONNX Runtime session whose `run` the test can hold (gate cleared) and whose batches it records."""

    def __init__(self, session) -> None:
        self._session = session
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.batch_rows: list[int] = []

    def run(self, output_names, feeds):
        self.entered.set()
        self.gate.wait(60)
        self.batch_rows.append(len(feeds["input"]))
        return self._session.run(output_names, feeds)

    def __getattr__(self, name):
        return getattr(self._session, name)


@pytest.fixture
def gated(monkeypatch, server_factory):
    """A server whose only model instance runs through a GatedSession: (server, session)."""
    sessions: list[GatedSession] = []

    def open_gated(path, settings=None):
        sessions.append(GatedSession(open_session(path, settings)))
        return sessions[-1]

    monkeypatch.setattr(serving.server.repository, "open_session", open_gated)
    handle = server_factory(device="cpu", max_queue_delay_us=0, inline_max_us=0)  # held runs need threads
    (session,) = sessions
    session.batch_rows.clear()  # forget the warm-up
    return handle, session


def hold(stub, session: GatedSession, x: np.ndarray) -> grpc.Future:
    """Sends x and returns once its batch is running and held at the gate."""
    session.gate.clear()
    session.entered.clear()
    held = stub.ModelInfer.future(infer_request(x))
    assert session.entered.wait(30)
    return held


def test_a_model_that_fails_to_load_leaves_the_server_up_and_not_ready(server_factory, model_builder, tmp_path, caplog):
    model_builder(tmp_path / "xor" / "1" / "model.onnx", seed=1)
    (tmp_path / "broken" / "1").mkdir(parents=True)
    (tmp_path / "broken" / "1" / "model.onnx").write_bytes(b"this is not an ONNX model")
    with caplog.at_level(logging.ERROR):
        handle = server_factory(model_repository=tmp_path)
    assert not handle.running.ready
    assert any("event=model_load_failed model=broken version=1" in r.getMessage() for r in caplog.records)
    with grpc.insecure_channel(handle.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(pb.ServerLiveRequest()).live
        assert not stub.ServerReady(pb.ServerReadyRequest()).ready
        assert stub.ModelReady(pb.ModelReadyRequest(name="xor")).ready
        assert not stub.ModelReady(pb.ModelReadyRequest(name="broken")).ready
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(infer_request(rows(1), model="broken"))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(service="")).status == NOT_SERVING
        # Per model: the one that failed to load is known, and NOT_SERVING (not NOT_FOUND).
        assert health.Check(health_pb2.HealthCheckRequest(service="broken")).status == NOT_SERVING
        assert health.Check(health_pb2.HealthCheckRequest(service="xor")).status == SERVING
        with pytest.raises(grpc.RpcError) as unknown:
            health.Check(health_pb2.HealthCheckRequest(service="nope"))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


def test_without_strict_readiness_a_failed_model_leaves_the_server_ready(server_factory, model_builder, tmp_path):
    model_builder(tmp_path / "xor" / "1" / "model.onnx", seed=1)
    (tmp_path / "broken" / "1").mkdir(parents=True)
    (tmp_path / "broken" / "1" / "model.onnx").write_bytes(b"this is not an ONNX model")
    handle = server_factory(model_repository=tmp_path, strict_readiness=False)
    assert handle.running.ready
    with grpc.insecure_channel(handle.address) as channel:
        assert pb_grpc.GRPCInferenceServiceStub(channel).ServerReady(pb.ServerReadyRequest()).ready
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(service="")).status == SERVING
        assert health.Check(health_pb2.HealthCheckRequest(service="broken")).status == NOT_SERVING


def test_serve_with_device_cuda_and_no_cuda_fails_start_up_loudly(serve_without_cuda):
    done = serve_without_cuda()
    assert done.returncode == 2
    assert "READY" not in done.stdout
    assert "--device cuda" in done.stderr
    assert "event=startup_failed" in done.stderr


def test_serve_prints_one_ready_line_and_exits_0_on_sigterm(model_repository):
    server = ServerProcess.start(model_repository)
    code = server.stop()
    ready = [line for line in server.output if line.startswith("READY ")]
    assert len(ready) == 1
    assert ready[0] == f"READY grpc={server.url} metrics={server.metrics_url} startup_s={ready[0].rsplit('=', 1)[1]}"
    assert server.startup_s > 0
    assert code == 0


def test_the_serve_path_never_imports_torch():
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import serving.cli.main, serving.cli.serve, serving.server"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "serving.server" in imported
    assert not {name for name in imported if name == "torch" or name.startswith("torch.")}


def test_draining_serves_what_came_first_refuses_later_requests_and_finishes_in_flight_work(gated):
    handle, session = gated
    with grpc.insecure_channel(handle.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        in_flight = hold(stub, session, rows(4))
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
        assert next(watch).status == SERVING
        signalled = time.monotonic()
        stopping = asyncio.run_coroutine_threadsafe(handle.running.stop(30, catch_up_s=1.0), handle.loop)
        assert next(watch).status == NOT_SERVING
        assert health.Check(health_pb2.HealthCheckRequest(service="xor")).status == NOT_SERVING
        assert not stub.ServerReady(pb.ServerReadyRequest()).ready
        # Within the catch-up period a request is still taken (it queues behind the held one)...
        caught_up = stub.ModelInfer.future(infer_request(rows(3)))
        assert time.monotonic() - signalled < 0.5
        # ...after it, a new one is refused: held until the server stops taking calls, or by the transport.
        time.sleep(max(0.0, signalled + 1.2 - time.monotonic()))
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(infer_request(rows(2)))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert list(watch) == []  # the Watch stream ended (OK) once the server drained
        session.gate.set()
        response = in_flight.result(30)
        assert list(caught_up.result(30).outputs[0].shape) == [3, 1]
    stopping.result(60)
    assert list(response.outputs[0].shape) == [4, 1]
    assert session.batch_rows == [4, 3]


def test_while_refusing_a_new_request_is_held_until_released_then_told_unavailable(server_factory):
    handle = server_factory()
    with grpc.insecure_channel(handle.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stub.ModelInfer(infer_request(rows(1)))  # connected
        handle.loop.call_soon_threadsafe(handle.running.plane.refuse)
        time.sleep(0.05)
        held = stub.ModelInfer.future(infer_request(rows(1)))
        short = stub.ModelInfer.future(infer_request(rows(1)), timeout=0.3)
        with pytest.raises(grpc.RpcError) as refused_early:
            short.result(10)  # told before its deadline, not DEADLINE_EXCEEDED
        time.sleep(0.3)
        assert not held.done()
        handle.loop.call_soon_threadsafe(handle.running.plane.release)
        with pytest.raises(grpc.RpcError) as refused:
            held.result(10)
    for caught in (refused, refused_early):
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in caught.value.details()


def test_a_request_whose_deadline_passes_in_the_queue_is_not_run(gated):
    handle, session = gated
    with grpc.insecure_channel(handle.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        held = hold(stub, session, rows(4))
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(infer_request(rows(5)), timeout=0.2)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        session.gate.set()
        held.result(30)
        stub.ModelInfer(infer_request(rows(3)))  # queued behind the expired one
    assert session.batch_rows == [4, 3]


@pytest.mark.gpu
def test_device_cuda_runs_the_model_on_the_cuda_provider(server_factory, model_repository, cuda_works):
    if not cuda_works:
        pytest.skip("needs an NVIDIA GPU with CUDA-capable onnxruntime-gpu")
    handle = server_factory(device="cuda")
    with grpc.insecure_channel(handle.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        metadata = stub.ModelMetadata(pb.ModelMetadataRequest(name="xor"))
        server_metadata = stub.ServerMetadata(pb.ServerMetadataRequest())
        response = stub.ModelInfer(infer_request(rows(4)))
    assert metadata.parameters["providers"].string_param.split(",")[0] == CUDA
    assert CUDA in server_metadata.parameters["providers"].string_param.split(",")
    served = handle.running.plane.resolve("xor")
    assert all(session.get_providers()[0] == CUDA for session in served.loaded.sessions)
    expected = cpu_outputs(model_repository / "xor" / "1" / "model.onnx", rows(4))["logits"]
    np.testing.assert_allclose(outputs_of(response)["logits"], expected, atol=1e-5)


def test_the_inline_budget_defaults_by_the_cores_the_server_may_use(monkeypatch):
    import os

    from serving.cli import serve
    from serving.cli.flags import Parser, UsageError
    from serving.server import app

    parser = Parser(prog="xorserve serve")
    serve.add_arguments(parser)
    monkeypatch.delenv("XORSERVE_INLINE_MAX_US", raising=False)
    assert serve.config_from_args(parser.parse_args(["--model-repository", "m"])).inline_max_us is None
    assert (
        serve.config_from_args(parser.parse_args(["--model-repository", "m", "--inline-max-us", "0"])).inline_max_us
        == 0
    )
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})
    assert app.default_inline_max_us() == 500  # one core: a thread would run nothing in parallel
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert app.default_inline_max_us() == 50
    monkeypatch.setenv("XORSERVE_INLINE_MAX_US", "-1")  # read when the flags are declared
    with pytest.raises(UsageError, match="XORSERVE_INLINE_MAX_US='-1': must be at least 0"):
        serve.add_arguments(Parser(prog="xorserve serve"))
