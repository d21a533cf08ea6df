"""The server over the wire with its own stubs: metadata, config, inference, streaming, errors, health,
reflection and metrics."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from conftest import cpu_outputs, infer_request, metric_samples, outputs_of
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from serving._proto import grpc_service_pb2 as pb
from serving._proto import grpc_service_pb2_grpc as pb_grpc
from serving.runtime import SessionSettings, open_session

Input = pb.ModelInferRequest.InferInputTensor


@pytest.fixture(scope="module")
def channel(server) -> grpc.Channel:
    with grpc.insecure_channel(server.address) as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(channel) -> pb_grpc.GRPCInferenceServiceStub:
    return pb_grpc.GRPCInferenceServiceStub(channel)


POINTS = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float32)


def test_server_is_live_and_ready(stub):
    assert stub.ServerLive(pb.ServerLiveRequest()).live
    assert stub.ServerReady(pb.ServerReadyRequest()).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name="xor")).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name="xor", version="1")).ready


def test_unknown_model_is_not_ready(stub):
    assert not stub.ModelReady(pb.ModelReadyRequest(name="nope")).ready


def test_server_metadata_reports_the_providers(stub):
    metadata = stub.ServerMetadata(pb.ServerMetadataRequest())
    assert metadata.name == "xorserve"
    assert "model_configuration" in metadata.extensions
    assert metadata.parameters["providers"].string_param == "CPUExecutionProvider"


def test_model_metadata_comes_from_the_graph(stub, model_repository):
    metadata = stub.ModelMetadata(pb.ModelMetadataRequest(name="xor"))
    assert metadata.platform == "onnxruntime_onnx"
    assert list(metadata.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("input", "FP32", [-1, 2])]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [
        ("logits", "FP32", [-1, 1]),
        ("probability", "FP32", [-1, 1]),
    ]
    session = open_session(model_repository / "xor" / "1" / "model.onnx", SessionSettings(device="cpu"))
    for key, value in session.get_modelmeta().custom_metadata_map.items():
        assert metadata.parameters[key].string_param == value
    assert metadata.parameters["providers"].string_param == "CPUExecutionProvider"


def test_model_config_reports_batching_with_dims_without_the_batch_axis(stub, server):
    config = stub.ModelConfig(pb.ModelConfigRequest(name="xor")).config
    assert config.max_batch_size == server.running.config.max_batch_size
    assert config.HasField("dynamic_batching")
    assert config.dynamic_batching.max_queue_delay_microseconds == server.running.config.max_queue_delay_us
    assert [(i.name, list(i.dims)) for i in config.input] == [("input", [2])]
    assert [(o.name, list(o.dims)) for o in config.output] == [("logits", [1]), ("probability", [1])]
    assert config.instance_group[0].count == server.running.config.instances
    assert config.platform == "onnxruntime_onnx"


def test_model_config_without_batching_has_no_dynamic_batching(server_factory):
    handle = server_factory(batching=False)
    with grpc.insecure_channel(handle.address) as channel:
        config = pb_grpc.GRPCInferenceServiceStub(channel).ModelConfig(pb.ModelConfigRequest(name="xor")).config
    assert not config.HasField("dynamic_batching")


def test_raw_fp32_inference_equals_in_process_onnx_runtime(stub, model_repository):
    response = stub.ModelInfer(infer_request(POINTS, request_id="req-1"))
    assert response.id == "req-1"
    assert response.model_name == "xor"
    assert response.model_version == "1"
    expected = cpu_outputs(model_repository / "xor" / "1" / "model.onnx", POINTS)
    got = outputs_of(response)
    assert set(got) == {"logits", "probability"}
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value)


def test_typed_fp32_contents_are_accepted(stub, model_repository):
    tensor = Input(name="input", datatype="FP32", shape=[4, 2])
    tensor.contents.fp32_contents.extend(POINTS.ravel().tolist())
    response = stub.ModelInfer(pb.ModelInferRequest(model_name="xor", inputs=[tensor]))
    expected = cpu_outputs(model_repository / "xor" / "1" / "model.onnx", POINTS)
    np.testing.assert_array_equal(outputs_of(response)["logits"], expected["logits"])
    assert len(response.raw_output_contents) == 2


def test_a_requested_subset_of_outputs_is_all_that_comes_back(stub):
    wanted = [pb.ModelInferRequest.InferRequestedOutputTensor(name="probability")]
    response = stub.ModelInfer(infer_request(POINTS, outputs=wanted))
    assert [t.name for t in response.outputs] == ["probability"]
    assert len(response.raw_output_contents) == 1


def test_streaming_answers_every_request_and_reports_errors_in_band(stub, model_repository):
    rng = np.random.default_rng(3)
    inputs = {f"s{i}": rng.normal(size=(i + 1, 2)).astype(np.float32) for i in range(6)}
    requests = [infer_request(x, request_id=name) for name, x in inputs.items()]
    requests.insert(3, infer_request(np.zeros((2, 3), np.float32), request_id="bad"))
    answers = list(stub.ModelStreamInfer(iter(requests)))
    assert len(answers) == len(requests)
    by_id = {answer.infer_response.id: answer for answer in answers}
    assert by_id["bad"].error_message.startswith("INVALID_ARGUMENT")
    path = model_repository / "xor" / "1" / "model.onnx"
    for name, x in inputs.items():
        assert by_id[name].error_message == ""
        np.testing.assert_array_equal(outputs_of(by_id[name].infer_response)["logits"], cpu_outputs(path, x)["logits"])


def _raw(x: np.ndarray, datatype: str = "FP32", shape=None, name: str = "input", raw: bytes | None = None):
    tensor = Input(name=name, datatype=datatype, shape=list(x.shape) if shape is None else shape)
    return pb.ModelInferRequest(
        model_name="xor", inputs=[tensor], raw_input_contents=[x.tobytes() if raw is None else raw]
    )


ERROR_CASES = {
    "wrong shape": (
        _raw(np.zeros((2, 3), np.float32)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "shape [2, 3]; expected [-1, 2]",
    ),
    "wrong datatype": (
        _raw(np.zeros((2, 2), np.float64), "FP64"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "datatype FP64; expected FP32",
    ),
    "wrong byte length": (
        _raw(np.zeros((2, 2), np.float32), raw=bytes(12)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "12 bytes",
    ),
    "wrong input name": (
        _raw(np.zeros((2, 2), np.float32), name="x"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "unknown input 'x'",
    ),
    "no input": (pb.ModelInferRequest(model_name="xor"), grpc.StatusCode.INVALID_ARGUMENT, "missing input 'input'"),
    "empty batch": (_raw(np.zeros((0, 2), np.float32)), grpc.StatusCode.INVALID_ARGUMENT, "empty batch"),
    "NaN": (_raw(np.array([[np.nan, 0]], np.float32)), grpc.StatusCode.INVALID_ARGUMENT, "non-finite"),
    "Inf": (_raw(np.array([[0, np.inf]], np.float32)), grpc.StatusCode.INVALID_ARGUMENT, "non-finite"),
    "unknown output": (
        infer_request(POINTS, outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="nope")]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "unknown output 'nope'",
    ),
    "unknown model": (infer_request(POINTS, model="nope"), grpc.StatusCode.NOT_FOUND, "unknown model 'nope'"),
    "unknown version": (infer_request(POINTS, version="7"), grpc.StatusCode.NOT_FOUND, "no version '7'"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_requests_get_their_status_code_and_the_server_keeps_serving(stub, case):
    request, code, message = ERROR_CASES[case]
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request)
    assert caught.value.code() == code
    assert message in caught.value.details()
    assert stub.ServerReady(pb.ServerReadyRequest()).ready
    assert len(stub.ModelInfer(infer_request(POINTS)).raw_output_contents) == 2


def test_metadata_of_an_unknown_model_is_not_found(stub):
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelMetadata(pb.ModelMetadataRequest(name="nope"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_message_over_the_size_limit_is_resource_exhausted(server_factory):
    handle = server_factory(max_message_bytes=64 * 1024)
    x = np.zeros((16 * 1024, 2), np.float32)  # 128 KiB of raw contents
    with grpc.insecure_channel(handle.address) as channel, pytest.raises(grpc.RpcError) as caught:
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(infer_request(x))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize("limit", [0, 1000])
def test_a_request_over_max_request_rows_is_resource_exhausted_unary_and_in_band(server_factory, limit):
    handle = server_factory(max_request_rows=limit)
    over = np.ones((1001, 2), np.float32)
    at = np.zeros((1000, 2), np.float32)
    with grpc.insecure_channel(handle.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert outputs_of(stub.ModelInfer(infer_request(at)))["logits"].shape == (1000, 1)
        if limit == 0:  # no limit
            assert outputs_of(stub.ModelInfer(infer_request(over)))["logits"].shape == (1001, 1)
            return
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(infer_request(over))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert caught.value.details() == (
            "the request has 1001 rows; this server takes at most 1000 per request (--max-request-rows): split it"
        )
        answers = list(stub.ModelStreamInfer(iter([infer_request(over, request_id="big"), infer_request(at)])))
        assert answers[0].error_message.startswith("RESOURCE_EXHAUSTED: the request has 1001 rows")
        assert answers[0].infer_response.id == "big"
        assert not answers[1].error_message
        assert stub.ModelInfer(infer_request(at)).outputs  # still serving


def test_versions_are_addressable_and_empty_means_latest(server_factory, model_builder, tmp_path):
    model_builder(tmp_path / "xor" / "1" / "model.onnx", seed=1)
    model_builder(tmp_path / "xor" / "10" / "model.onnx", seed=10)
    handle = server_factory(model_repository=tmp_path)
    with grpc.insecure_channel(handle.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        latest = stub.ModelInfer(infer_request(POINTS))
        first = stub.ModelInfer(infer_request(POINTS, version="1"))
        metadata = stub.ModelMetadata(pb.ModelMetadataRequest(name="xor"))
    assert list(metadata.versions) == ["1", "10"]
    assert latest.model_version == "10"
    np.testing.assert_array_equal(
        outputs_of(latest)["logits"], cpu_outputs(tmp_path / "xor" / "10" / "model.onnx", POINTS)["logits"]
    )
    np.testing.assert_array_equal(
        outputs_of(first)["logits"], cpu_outputs(tmp_path / "xor" / "1" / "model.onnx", POINTS)["logits"]
    )


def test_health_is_serving_overall_and_per_model(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "inference.GRPCInferenceService", "xor"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
        assert status == health_pb2.HealthCheckResponse.SERVING, service


def test_reflection_lists_the_inference_service_and_describes_it(channel):
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService"),
    ]
    listed, described = list(reflection.ServerReflectionInfo(iter(requests)))
    names = {service.name for service in listed.list_services_response.service}
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names
    assert described.file_descriptor_response.file_descriptor_proto


def test_metrics_count_requests_and_batches_over_http(stub, server):
    stub.ModelInfer(infer_request(POINTS))
    with pytest.raises(grpc.RpcError):
        stub.ModelInfer(_raw(np.zeros((2, 3), np.float32)))
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for sample in metric_samples(server.running.metrics_address)
    }

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted({"model": "xor", "version": "1", **labels}.items())))]

    assert value("xorserve_inference_success_total") >= 1
    assert value("xorserve_inference_failure_total", reason="INVALID_ARGUMENT") >= 1
    assert value("xorserve_batch_size_rows_count") >= 1
    assert value("xorserve_batch_size_requests_count") >= 1
    assert value("xorserve_request_duration_seconds_count") >= 1
    assert value("xorserve_queue_duration_seconds_count") >= 1
    assert value("xorserve_compute_duration_seconds_count") >= 1
    assert value("xorserve_queue_depth") == 0
    assert value("xorserve_model_info", provider="CPUExecutionProvider") == 1


def test_the_shipped_model_serves_xor_bit_equal_to_in_process_onnx_runtime(server_factory, shipped_model_repository):
    handle = server_factory(model_repository=shipped_model_repository)
    with grpc.insecure_channel(handle.address) as channel:
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(infer_request(POINTS))
    got = outputs_of(response)
    expected = cpu_outputs(shipped_model_repository / "xor" / "1" / "model.onnx", POINTS)
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value)
    assert (got["probability"].ravel() >= 0.5).tolist() == [False, True, True, False]


@pytest.mark.parametrize("rows", [1, 1024])
def test_non_finite_values_are_refused_after_requests_of_the_same_shape_passed(stub, rows):
    x = np.zeros((rows, 2), np.float32)
    stub.ModelInfer(_raw(x))  # validated once: later requests of this shape take the fast path
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[rows - 1, 1] = bad
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(_raw(y))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "1 non-finite value(s)" in caught.value.details()


def test_the_largest_finite_values_are_accepted(stub):
    x = np.array([[np.finfo(np.float32).max, -np.finfo(np.float32).max]], np.float32)
    stub.ModelInfer(_raw(np.zeros((1, 2), np.float32)))
    response = stub.ModelInfer(_raw(x))
    assert [output.name for output in response.outputs] == ["logits", "probability"]
