"""serving.client (sync and asyncio) and `xorserve predict` against an in-process server."""

import asyncio

import grpc
import numpy as np
import pytest
from conftest import run_xorserve

from serving.cli.predict import parse_points
from serving.client import AsyncInferenceClient, InferenceClient, InferenceError
from serving.runtime import SessionSettings, open_session

CORNERS = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float32)


@pytest.fixture(scope="module")
def reference(model_repository):
    session = open_session(model_repository / "xor" / "1" / "model.onnx", SessionSettings(device="cpu"))
    names = ["logits", "probability"]
    return lambda x: dict(zip(names, session.run(names, {"input": x}), strict=True))


def test_predict_returns_the_models_probabilities_and_labels(server, reference):
    with InferenceClient(server.address) as client:
        prediction = client.predict(CORNERS)
    expected = reference(CORNERS)["probability"].reshape(-1)
    assert np.array_equal(prediction.probability, expected)
    assert np.array_equal(prediction.label, (expected >= 0.5).astype(np.int64))


def test_infer_returns_every_output_shaped_by_default(server, reference):
    x = np.random.default_rng(3).normal(size=(37, 2)).astype(np.float32)
    with InferenceClient(server.address) as client:
        outputs = client.infer(x)
    assert sorted(outputs) == ["logits", "probability"]
    for name, expected in reference(x).items():
        assert outputs[name].shape == (37, 1)
        assert np.array_equal(outputs[name], expected)


def test_infer_honours_a_subset_of_outputs(server):
    with InferenceClient(server.address) as client:
        assert list(client.infer(CORNERS, ["logits"])) == ["logits"]


def test_async_client_gives_the_same_answers_as_the_sync_one(server):
    async def many():
        async with AsyncInferenceClient(server.address) as client:
            return await asyncio.gather(*(client.predict(CORNERS[i : i + 1]) for i in range(4)))

    with InferenceClient(server.address) as client:
        expected = client.predict(CORNERS).probability
    got = np.concatenate([p.probability for p in asyncio.run(many())])
    assert np.array_equal(got, expected)


def test_metadata_and_readiness(server):
    with InferenceClient(server.address) as client:
        metadata = client.metadata()
        assert client.ready()
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 2]}]
    with InferenceClient(server.address, model="nope") as client:
        assert not client.ready()


def test_unknown_model_raises_not_found_without_retrying(server):
    with InferenceClient(server.address, model="nope") as client, pytest.raises(InferenceError) as error:
        client.predict(CORNERS)
    assert error.value.code == grpc.StatusCode.NOT_FOUND
    assert "nope" in error.value.message


def test_unreachable_server_raises_unavailable_after_retries(refused_address):
    client = InferenceClient(refused_address, timeout_s=2, retries=1, backoff_s=0.01)
    with client, pytest.raises(InferenceError) as error:
        client.predict(CORNERS)
    assert error.value.code == grpc.StatusCode.UNAVAILABLE


def test_parse_points_reads_pairs_and_names_a_bad_one():
    assert parse_points(["0,1", "1.5,-2"]).tolist() == [[0.0, 1.0], [1.5, -2.0]]
    with pytest.raises(ValueError, match="'1,2,3'"):
        parse_points(["0,0", "1,2,3"])
    with pytest.raises(ValueError, match="'a,b'"):
        parse_points(["a,b"])


def test_parse_points_refuses_values_beyond_float32():
    with pytest.raises(ValueError, match="'1e40,1'.*float32"):
        parse_points(["1e40,1"])


def test_predict_command_prints_a_row_per_point(server, reference):
    result = run_xorserve("predict", "--url", server.address, "0,0", "1,1")
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.strip().splitlines()
    assert header.split() == ["x1", "x2", "probability", "label"]
    expected = reference(CORNERS[[0, 3]])["probability"].reshape(-1)
    assert [float(row.split()[2]) for row in rows] == pytest.approx(expected.tolist(), abs=1e-6)


def test_predict_command_takes_negative_coordinates(server, reference):
    result = run_xorserve("predict", "--url", server.address, "-0.5,1", "1,-.25")
    assert result.returncode == 0, result.stderr
    rows = result.stdout.strip().splitlines()[1:]
    assert [row.split()[:2] for row in rows] == [["-0.5000", "1.0000"], ["1.0000", "-0.2500"]]


def test_predict_command_rejects_a_malformed_point_with_exit_2():
    result = run_xorserve("predict", "--url", "127.0.0.1:1", "0;1")
    assert result.returncode == 2
    assert "'0;1'" in result.stderr


def test_predict_command_reports_an_unreachable_server_in_one_line(refused_address):
    result = run_xorserve("predict", "--url", refused_address, "--timeout-s", "2", "0,0")
    assert result.returncode == 3
    assert len(result.stderr.strip().splitlines()) == 1
    assert "UNAVAILABLE" in result.stderr


def test_outputs_are_read_from_typed_contents_when_a_server_sends_no_raw_bytes():
    from serving._proto import grpc_service_pb2 as pb
    from serving.client.inference import _outputs

    response = pb.ModelInferResponse()
    tensor = response.outputs.add(name="probability", datatype="FP32", shape=[2, 1])
    tensor.contents.fp32_contents.extend([0.25, 0.75])
    assert _outputs(response)["probability"].tolist() == [[0.25], [0.75]]
