"""`xorserve serve --workers N`: worker processes sharing one port, metrics summed by the parent,
SIGTERM draining every worker, and what happens when a worker fails or dies."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import cpu_outputs, infer_request, metric_samples, outputs_of
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from serving._proto import grpc_service_pb2 as pb
from serving._proto import grpc_service_pb2_grpc as pb_grpc
from serving.cli.main import command_parser
from serving.client.launch import ServerProcess

WORKERS = ["--workers", "2"]
# Channels in one process share their TCP connections unless told not to; each of these has its own,
# so that the kernel can hand it to either worker.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


def inputs(count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(-2, 2, size=(1 + i % 5, 2)).astype(np.float32) for i in range(count)]


def samples_named(server: ServerProcess, name: str) -> list:
    return [sample for sample in metric_samples(server.metrics_url) if sample.name == name]


def poll(condition: Callable[[], bool], timeout_s: float = 20.0) -> bool:
    """Checks `condition` until it holds or timeout_s passes (workers flush their metrics every 0.1 s)."""
    give_up = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > give_up:
            return False
        time.sleep(0.05)
    return True


def logged(server: ServerProcess, pattern: str) -> re.Match | None:
    return next((m for line in list(server.output) if (m := re.search(pattern, line))), None)


def worker_pids(server: ServerProcess) -> dict[int, int]:
    found = (re.search(r"event=worker_started worker=(\d+) pid=(\d+)", line) for line in list(server.output))
    return {int(m[1]): int(m[2]) for m in found if m}


def answer_on_own_connections(address: str, xs: list[np.ndarray]) -> list[pb.ModelInferResponse]:
    channels = [grpc.insecure_channel(address, options=OWN_CONNECTION) for _ in xs]
    try:
        return [
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(infer_request(x, request_id=f"r{i}"), timeout=30)
            for i, (channel, x) in enumerate(zip(channels, xs, strict=True))
        ]
    finally:
        for channel in channels:
            channel.close()


@pytest.fixture(scope="module")
def expected(model_repository: Path) -> Callable[[np.ndarray], np.ndarray]:
    return lambda x: cpu_outputs(model_repository / "xor" / "1" / "model.onnx", x)["logits"]


@pytest.fixture(scope="module")
def shared_workers(model_repository: Path) -> Iterator[ServerProcess]:
    server = ServerProcess.start(model_repository, WORKERS)
    yield server
    server.stop()


@pytest.fixture
def two_workers(model_repository: Path) -> Iterator[ServerProcess]:
    server = ServerProcess.start(model_repository, WORKERS)
    yield server
    server.stop()


def test_requests_on_many_connections_are_each_answered_with_their_own_rows(shared_workers, expected):
    xs = inputs(32, seed=3)
    responses = answer_on_own_connections(shared_workers.url, xs)
    for i, (x, response) in enumerate(zip(xs, responses, strict=True)):
        assert response.id == f"r{i}"
        np.testing.assert_array_equal(outputs_of(response)["logits"], expected(x))


def test_both_workers_answer_requests(shared_workers):
    pids = set(worker_pids(shared_workers).values())
    answer_on_own_connections(shared_workers.url, inputs(32, seed=4))

    def answered_by_pid() -> dict[int, float]:
        samples = samples_named(shared_workers, "xorserve_worker_inference_success")
        return {int(s.labels["pid"]): s.value for s in samples if s.value > 0}

    assert poll(lambda: len(answered_by_pid()) == 2), answered_by_pid()
    assert set(answered_by_pid()) == pids


def test_every_connection_gets_health_and_reflection(shared_workers):
    for _ in range(8):
        with grpc.insecure_channel(shared_workers.url, options=OWN_CONNECTION) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            assert (
                health.Check(health_pb2.HealthCheckRequest(service="")).status == health_pb2.HealthCheckResponse.SERVING
            )
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            (listed,) = reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
            assert "inference.GRPCInferenceService" in {s.name for s in listed.list_services_response.service}


def test_the_parent_serves_the_success_count_summed_over_the_workers(two_workers):
    xs = inputs(40, seed=5)
    answer_on_own_connections(two_workers.url, xs)

    def total() -> float:
        return sum(s.value for s in samples_named(two_workers, "xorserve_inference_success_total"))

    poll(lambda: total() >= len(xs))
    assert total() == len(xs)


def test_the_metrics_folder_is_removed_when_the_server_exits(two_workers):
    (folder,) = shlex.split(logged(two_workers, r"metrics_dir=('[^']*'|\S+)")[1])  # quoted if it has spaces
    assert Path(folder).is_dir()
    assert two_workers.stop() == 0
    assert not Path(folder).exists()


@pytest.mark.slow
def test_sigterm_under_load_from_client_threads_loses_no_request_and_exits_0(model_repository, expected):
    clients = 16
    xs = inputs(clients, seed=9)
    server = ServerProcess.start(model_repository, [*WORKERS, "--max-queue-delay-us", "2000", "--grace-s", "20"])
    outcomes: list[tuple[int, object]] = []
    lock = threading.Lock()
    signalled = threading.Event()

    def client(index: int) -> None:
        with grpc.insecure_channel(server.url, options=OWN_CONNECTION) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            while True:
                try:
                    outcome = stub.ModelInfer(infer_request(xs[index], request_id=f"c{index}"), timeout=60)
                except grpc.RpcError as exc:
                    outcome = exc
                with lock:
                    outcomes.append((index, outcome))
                    answered = len(outcomes)
                if isinstance(outcome, grpc.RpcError):
                    return
                if answered >= 8 * clients and not signalled.is_set():
                    signalled.set()
                    server.process.send_signal(signal.SIGTERM)

    try:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        exit_code = server.process.wait(60)
    finally:
        server.stop()

    assert signalled.is_set(), "the load ended before the server was signalled"
    assert exit_code == 0, "\n".join(server.output)
    answered = [(i, o) for i, o in outcomes if isinstance(o, pb.ModelInferResponse)]
    refused = [o for _, o in outcomes if not isinstance(o, pb.ModelInferResponse)]
    assert len(answered) >= 8 * clients
    for index, response in answered:
        np.testing.assert_array_equal(outputs_of(response)["logits"], expected(xs[index]))
    # Every request not answered was refused before it ran, by a draining worker or because the
    # workers had stopped listening; none was cut off in flight.
    assert len(refused) == clients
    for error in refused:
        assert error.code() == grpc.StatusCode.UNAVAILABLE, (error.code(), error.details())
        assert "shutting down" in error.details() or "connect" in error.details().lower(), error.details()


def test_a_worker_killed_with_sigkill_makes_the_parent_drain_the_others_and_exit_1(two_workers):
    pids = worker_pids(two_workers)
    victim, survivor = pids[0], pids[1]
    os.kill(victim, signal.SIGKILL)
    assert two_workers.process.wait(60) == 1
    assert poll(lambda: logged(two_workers, r"event=workers_stopped") is not None)
    assert logged(two_workers, rf"event=worker_died worker=0 pid={victim} exit_code=-9")
    assert logged(two_workers, r"worker=1 event=drain_begin")
    assert logged(two_workers, rf"event=worker_exited worker=1 pid={survivor} exit_code=0")


def test_workers_on_a_port_another_program_listens_on_fail_to_start(model_repository):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        done = subprocess.run(
            [sys.executable, "-m", "serving.cli", "serve", "--model-repository", str(model_repository), *WORKERS]
            + ["--port", str(taken.getsockname()[1]), "--metrics-port", "0"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 2
    assert "READY" not in done.stdout
    assert "cannot start" in done.stderr


def test_a_worker_that_cannot_start_fails_start_up_without_a_ready_line(serve_without_cuda):
    done = serve_without_cuda(*WORKERS)
    assert done.returncode == 2
    assert "READY" not in done.stdout
    assert re.search(r"cannot start: worker \d: .*--device cuda", done.stderr), done.stderr


def test_the_workers_flag_falls_back_to_xorserve_workers(monkeypatch):
    monkeypatch.setenv("XORSERVE_WORKERS", "3")
    parser, _ = command_parser("serve")
    assert parser.parse_args(["--model-repository", "models"]).workers == 3
