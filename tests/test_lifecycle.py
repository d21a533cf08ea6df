"""Model lifecycle: Triton-style repositories and config.pbtxt, control modes, the repository API (ours and
tritonclient's), and hot swaps under load that fail no request."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import build_model, cpu_outputs, infer_request, metric_samples, outputs_of
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving._proto import grpc_service_pb2 as pb
from serving._proto import grpc_service_pb2_grpc as pb_grpc
from serving._proto import model_config_pb2 as mc

CLIENT = Path(__file__).with_name("triton_compat_client.py")
X = np.array([[0, 0], [0, 1], [1, 0], [1, 1], [0.3, -0.7]], dtype=np.float32)
LATEST_ONE = "max_batch_size: 64\ndynamic_batching {}\nversion_policy { latest { num_versions: 1 } }\n"


def put_version(repository: Path, model: str, version: int, source: Path | bytes) -> Path:
    """Writes a version folder the way the trainer does: into a hidden sibling, renamed into place at the end."""
    folder = repository / model / str(version)
    staging = repository / model / f".{version}.staging.tmp"
    staging.mkdir(parents=True)
    if isinstance(source, bytes):
        (staging / "model.onnx").write_bytes(source)
    else:
        shutil.copy(source, staging / "model.onnx")
    os.rename(staging, folder)
    return folder


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> tuple[Path, Path]:
    """Two models of the same shape and different weights: A (odd versions below) and B (even ones)."""
    root = tmp_path_factory.mktemp("sources")
    return build_model(root / "a.onnx", seed=21), build_model(root / "b.onnx", seed=22)


def stub_of(handle) -> pb_grpc.GRPCInferenceServiceStub:
    channel = grpc.insecure_channel(handle.address)
    return pb_grpc.GRPCInferenceServiceStub(channel)


def wait_for(condition, timeout_s: float = 30.0, what: str = "condition") -> None:
    give_up = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < give_up, f"timed out waiting for {what}"
        time.sleep(0.02)


def index_of(stub) -> dict[tuple[str, str], tuple[str, str]]:
    answer = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10)
    return {(m.name, m.version): (m.state, m.reason) for m in answer.models}


# --- config.pbtxt -------------------------------------------------------------------------------------

TRITON_CONFIG = """
name: "tri"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ { name: "input" data_type: TYPE_FP32 dims: [ 2 ] } ]
output [
  { name: "logits" data_type: TYPE_FP32 dims: [ 1 ] },
  { name: "probability" data_type: TYPE_FP32 dims: [ 1 ] }
]
dynamic_batching { max_queue_delay_microseconds: 500 preferred_batch_size: [ 4 ] }
instance_group [ { count: 2 kind: KIND_CPU } ]
version_policy: { latest: { num_versions: 2 } }
optimization { graph { level: 1 } }
"""


def test_a_triton_style_repository_serves_as_its_config_says(server_factory, sources, tmp_path, caplog):
    for version in (1, 2, 3):
        put_version(tmp_path, "tri", version, sources[version % 2])
    (tmp_path / "tri" / "config.pbtxt").write_text(TRITON_CONFIG)
    with caplog.at_level(logging.WARNING):
        handle = server_factory(model_repository=tmp_path)
    stub = stub_of(handle)
    assert list(stub.ModelMetadata(pb.ModelMetadataRequest(name="tri")).versions) == ["2", "3"]
    config = stub.ModelConfig(pb.ModelConfigRequest(name="tri")).config
    assert config.max_batch_size == 8
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert [(g.count, g.kind) for g in config.instance_group] == [(2, mc.ModelInstanceGroup.KIND_CPU)]
    assert config.version_policy.latest.num_versions == 2
    assert [list(t.dims) for t in config.input] == [[2]]
    latest = outputs_of(stub.ModelInfer(infer_request(X, model="tri")))
    np.testing.assert_array_equal(latest["logits"], cpu_outputs(sources[1], X)["logits"])  # version 3: B
    with pytest.raises(grpc.RpcError) as refused:
        stub.ModelInfer(infer_request(X, model="tri", version="1"))  # on disk, not chosen by the policy
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    ignored = [r.getMessage() for r in caplog.records if "event=config_ignored" in r.getMessage()]
    assert ignored and "dynamic_batching.preferred_batch_size" in ignored[0] and "optimization" in ignored[0]
    assert len({m for m in ignored}) == 1  # once per load, naming each field once


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (('name: "input"', 'name: "features"'), "'features'"),
        (("data_type: TYPE_FP32 dims: [ 2 ]", "data_type: TYPE_FP64 dims: [ 2 ]"), "TYPE_FP64"),
        (("dims: [ 2 ]", "dims: [ 3 ]"), "dims [3]"),
    ],
)
def test_a_config_that_does_not_match_the_graph_is_refused_naming_the_mismatch(
    server_factory, sources, tmp_path, change, named
):
    put_version(tmp_path, "tri", 1, sources[0])
    (tmp_path / "tri" / "config.pbtxt").write_text(TRITON_CONFIG.replace(*change))
    build_model(tmp_path / "ok" / "1" / "model.onnx", seed=3)
    handle = server_factory(model_repository=tmp_path)
    stub = stub_of(handle)
    state, reason = index_of(stub)[("tri", "1")]
    assert state == "UNAVAILABLE" and named in reason and "config.pbtxt" in reason
    assert not stub.ModelReady(pb.ModelReadyRequest(name="tri")).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name="ok")).ready
    assert not handle.running.ready  # strict readiness: a model to be served has nothing ready


def test_without_strict_readiness_the_server_is_ready_beside_a_broken_model(server_factory, sources, tmp_path):
    put_version(tmp_path, "broken", 1, b"not a model")
    put_version(tmp_path, "ok", 1, sources[0])
    handle = server_factory(model_repository=tmp_path, strict_readiness=False)
    assert handle.running.ready
    assert stub_of(handle).ServerReady(pb.ServerReadyRequest()).ready


# --- control modes and the repository API -----------------------------------------------------------


def test_without_model_control_the_repository_api_refuses_to_load_or_unload(server):
    stub = stub_of(server)
    for call, request in (
        (stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name="xor")),
        (stub.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name="xor")),
    ):
        with pytest.raises(grpc.RpcError) as refused:
            call(request, timeout=10)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "--model-control-mode explicit" in refused.value.details()
    assert index_of(stub)[("xor", "1")] == ("READY", "")


def test_explicit_mode_loads_what_it_is_told_and_unloads_through_the_api(server_factory, sources, tmp_path):
    put_version(tmp_path, "a", 1, sources[0])
    put_version(tmp_path, "b", 1, sources[1])
    handle = server_factory(model_repository=tmp_path, model_control_mode="explicit", load_models=("a",))
    stub = stub_of(handle)
    assert index_of(stub) == {("a", "1"): ("READY", ""), ("b", "1"): ("UNAVAILABLE", "not loaded")}
    with pytest.raises(grpc.RpcError) as refused:
        stub.ModelInfer(infer_request(X, model="b"))
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="b"), timeout=30)
    got = outputs_of(stub.ModelInfer(infer_request(X, model="b")))
    np.testing.assert_array_equal(got["logits"], cpu_outputs(sources[1], X)["logits"])
    stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="a"), timeout=30)
    assert index_of(stub)[("a", "1")] == ("UNAVAILABLE", "unloaded")
    with pytest.raises(grpc.RpcError) as gone:
        stub.ModelInfer(infer_request(X, model="a"))
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as unknown:
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="nope"), timeout=30)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert handle.running.ready  # explicit mode: ready with what it was told to load


def test_tritonclients_repository_calls_work_in_explicit_mode(server_factory, sources, tmp_path):
    put_version(tmp_path, "xor", 1, sources[0])
    handle = server_factory(model_repository=tmp_path, model_control_mode="explicit")
    done = subprocess.run(
        [sys.executable, str(CLIENT), handle.address, "--repository", "xor"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["index_before"] == [{"name": "xor", "version": "1", "state": "UNAVAILABLE", "reason": "not loaded"}]
    assert report["ready_before"] is False
    assert report["load"]["status"] == "OK" and report["ready_after_load"] is True
    assert report["index_after_load"] == [{"name": "xor", "version": "1", "state": "READY"}]
    np.testing.assert_array_equal(
        np.asarray(report["infer_after_load"]["logits"], np.float32), cpu_outputs(sources[0], X[:4])["logits"]
    )
    assert report["unload"]["status"] == "OK" and report["ready_after_unload"] is False
    assert report["index_after_unload"][0]["state"] == "UNAVAILABLE"
    assert "NOT_FOUND" in report["infer_after_unload"]["status"]
    assert "NOT_FOUND" in report["load_unknown"]["status"]


def test_a_failed_load_says_why_in_the_index_ready_a_log_line_a_metric_and_the_load_answer(
    server_factory, sources, tmp_path, caplog
):
    put_version(tmp_path, "m", 1, sources[0])
    handle = server_factory(model_repository=tmp_path, model_control_mode="explicit", load_models=("m",))
    stub = stub_of(handle)
    put_version(tmp_path, "m", 2, b"\x08\x01 definitely not ONNX")
    with caplog.at_level(logging.ERROR), pytest.raises(grpc.RpcError) as refused:
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="m"), timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "version 2" in refused.value.details()
    state, reason = index_of(stub)[("m", "2")]
    assert state == "UNAVAILABLE" and reason
    assert not stub.ModelReady(pb.ModelReadyRequest(name="m", version="2")).ready
    assert any("event=model_load_failed model=m version=2" in r.getMessage() for r in caplog.records)
    failed = [
        s.value
        for s in metric_samples(handle.running.metrics_address)
        if s.name == "xorserve_model_loads_total" and s.labels == {"model": "m", "version": "2", "result": "failed"}
    ]
    assert failed == [1.0]
    got = outputs_of(stub.ModelInfer(infer_request(X, model="m")))  # what served goes on serving
    assert got["logits"].tolist() == cpu_outputs(sources[0], X)["logits"].tolist()


# --- hot swap under load ------------------------------------------------------------------------------


class Clients:
    """`count` threads calling ModelInfer on the model's latest version, back to back, each on its own channel;
    every answer is checked against the version that answered it."""

    def __init__(self, address: str, model: str, expected: dict[str, np.ndarray], count: int = 16) -> None:
        self.address, self.model, self.expected = address, model, expected
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.answers: list[tuple[float, str, float]] = []  # (time, version, latency)
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._call, args=(i,), daemon=True) for i in range(count)]

    def __enter__(self) -> Clients:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)

    def _call(self, index: int) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            request = infer_request(X, model=self.model, request_id=str(index))
            while not self.stop.is_set():
                start = time.perf_counter()
                try:
                    response = stub.ModelInfer(request, timeout=30)
                except grpc.RpcError as error:
                    with self.lock:
                        self.failures.append(f"{error.code().name}: {error.details()}")
                    continue
                latency = time.perf_counter() - start
                version = response.model_version
                logits = outputs_of(response)["logits"]
                with self.lock:
                    if not np.array_equal(logits, self.expected[version]):
                        self.failures.append(f"version {version} answered another model's numbers")
                    self.answers.append((time.monotonic(), version, latency))

    def seen(self, version: str) -> bool:
        with self.lock:
            return any(v == version for _, v, _ in self.answers[-64:])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["poll", "explicit"])
def test_16_clients_on_latest_fail_no_request_through_20_swaps_and_a_corrupt_version(
    server_factory, sources, tmp_path, mode
):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.pbtxt").write_text(LATEST_ONE)
    put_version(tmp_path, "m", 1, sources[1])
    handle = server_factory(
        model_repository=tmp_path, model_control_mode=mode, repository_poll_s=0.05, load_models=("m",)
    )
    stub = stub_of(handle)
    expected = {str(v): cpu_outputs(sources[v % 2], X)["logits"] for v in range(1, 23)}
    with Clients(handle.address, "m", expected) as clients:
        wait_for(lambda: clients.seen("1"), what="the first answers")
        for version in range(2, 22):
            put_version(tmp_path, "m", version, sources[version % 2])
            if mode == "explicit":
                stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="m"), timeout=60)
            wait_for(lambda v=str(version): clients.seen(v), what=f"answers from version {version}")
            wait_for(
                lambda v=str(version): index_of(stub).get(("m", str(int(v) - 1)), ("",))[0] == "UNAVAILABLE",
                what=f"version {version - 1} to unload",
            )
        put_version(tmp_path, "m", 22, b"corrupt")
        if mode == "explicit":
            with pytest.raises(grpc.RpcError):
                stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="m"), timeout=60)
        wait_for(lambda: index_of(stub).get(("m", "22"), ("",))[0] == "UNAVAILABLE", what="version 22 to fail")
        answered = len(clients.answers)
        wait_for(lambda: len(clients.answers) > answered + 200, what="answers after the corrupt version")
    assert clients.failures == []
    after = [version for t, version, _ in clients.answers[answered:]]
    assert set(after) == {"21"}  # the corrupt version changed nothing that serves
    assert len({version for _, version, _ in clients.answers}) == 21
    assert list(stub.ModelMetadata(pb.ModelMetadataRequest(name="m")).versions) == ["21"]


def test_a_version_named_explicitly_is_served_while_it_exists_then_not_found(server_factory, sources, tmp_path):
    put_version(tmp_path, "m", 1, sources[1])
    put_version(tmp_path, "m", 2, sources[0])
    handle = server_factory(model_repository=tmp_path, model_control_mode="explicit", load_models=("m",))
    stub = stub_of(handle)
    np.testing.assert_array_equal(
        outputs_of(stub.ModelInfer(infer_request(X, model="m", version="1")))["logits"],
        cpu_outputs(sources[1], X)["logits"],
    )
    shutil.rmtree(tmp_path / "m" / "1")
    stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="m"), timeout=30)
    with pytest.raises(grpc.RpcError) as gone:
        stub.ModelInfer(infer_request(X, model="m", version="1"))
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    assert stub.ModelInfer(infer_request(X, model="m")).model_version == "2"


def test_poll_mode_reloads_a_changed_file_and_unloads_a_removed_model(server_factory, sources, tmp_path):
    put_version(tmp_path, "m", 1, sources[0])
    put_version(tmp_path, "other", 1, sources[0])
    handle = server_factory(model_repository=tmp_path, model_control_mode="poll", repository_poll_s=0.05)
    stub = stub_of(handle)
    staging = tmp_path / "m" / ".1.new.tmp"
    staging.mkdir()
    shutil.copy(sources[1], staging / "model.onnx")
    os.replace(staging / "model.onnx", tmp_path / "m" / "1" / "model.onnx")  # the file changes in place
    wait_for(
        lambda: np.array_equal(
            outputs_of(stub.ModelInfer(infer_request(X, model="m")))["logits"], cpu_outputs(sources[1], X)["logits"]
        ),
        what="the reload",
    )
    shutil.rmtree(tmp_path / "other")
    wait_for(lambda: not stub.ModelReady(pb.ModelReadyRequest(name="other")).ready, what="the unload")
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(handle.address))
    assert health.Check(health_pb2.HealthCheckRequest(service="m")).status == health_pb2.HealthCheckResponse.SERVING
    wait_for(
        lambda: (
            health.Check(health_pb2.HealthCheckRequest(service="other")).status
            == health_pb2.HealthCheckResponse.NOT_SERVING
        ),
        what="health of the unloaded model",
    )


def test_metrics_count_loads_unloads_and_loaded_versions_per_model(server_factory, sources, tmp_path):
    put_version(tmp_path, "m", 1, sources[0])
    put_version(tmp_path, "m", 2, sources[1])
    handle = server_factory(model_repository=tmp_path, model_control_mode="explicit", load_models=("m",))
    stub = stub_of(handle)
    stub.ModelInfer(infer_request(X, model="m", version="1"))
    stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="m"), timeout=30)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for s in metric_samples(handle.running.metrics_address)
    }
    assert samples[("xorserve_model_loads_total", (("model", "m"), ("result", "ok"), ("version", "1")))] == 1
    assert samples[("xorserve_model_unloads_total", (("model", "m"), ("version", "2")))] == 1
    assert samples[("xorserve_loaded_versions", (("model", "m"),))] == 0
    assert samples[("xorserve_inference_success_total", (("model", "m"), ("version", "1")))] == 1
