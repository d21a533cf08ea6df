"""Triton's own client (tritonclient[grpc], unmodified) against the server: the protocol is the real one.

tritonclient runs in a subprocess (tests/triton_compat_client.py) because it cannot share a process
with serving._proto; this module runs it once and checks each part of its report.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import cpu_outputs

CLIENT = Path(__file__).with_name("triton_compat_client.py")


@pytest.fixture(scope="module")
def report(server) -> dict:
    done = subprocess.run(
        [sys.executable, str(CLIENT), server.address], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def session(model_repository):
    return model_repository / "xor" / "1" / "model.onnx"


def expected(session, x) -> dict[str, np.ndarray]:
    return cpu_outputs(session, x)


def assert_outputs_equal(got: dict[str, list], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for name, value in want.items():
        np.testing.assert_array_equal(np.asarray(got[name], dtype=np.float32), value)


def test_live_ready_and_model_ready(report):
    assert report["live"] is True
    assert report["ready"] is True
    assert report["model_ready"] is True
    assert report["unknown_model_ready"] is False


def test_server_metadata(report):
    assert report["server_metadata"]["name"] == "xorserve"
    assert "model_configuration" in report["server_metadata"]["extensions"]


def test_model_metadata(report):
    metadata = report["model_metadata"]
    assert metadata["platform"] == "onnxruntime_onnx"
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "2"]}]
    assert [o["name"] for o in metadata["outputs"]] == ["logits", "probability"]


def test_model_config_as_perf_analyzer_reads_it(report, server):
    config = report["model_config"]["config"]
    assert config["max_batch_size"] == server.running.config.max_batch_size
    assert "dynamic_batching" in config
    assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": ["2"]}]
    assert config["platform"] == "onnxruntime_onnx"


def test_infer_with_raw_fp32_is_bit_equal_to_in_process_onnx_runtime(report, session):
    assert_outputs_equal(report["infer_raw"], expected(session, report["points"]))


def test_infer_with_typed_fp32_contents(report, session):
    assert_outputs_equal(report["infer_typed"], expected(session, report["points"]))


def test_infer_with_a_subset_of_outputs(report, session):
    assert_outputs_equal(report["infer_subset"], {"probability": expected(session, report["points"])["probability"]})


def test_streaming_infer_answers_each_request_by_id(report, session):
    stream = report["stream"]
    for request_id, x in report["stream_inputs"].items():
        assert_outputs_equal(stream[request_id]["outputs"], expected(session, x))
    errors = [answer["error"] for answer in stream.values() if "error" in answer]
    assert len(errors) == 1
    assert "INVALID_ARGUMENT" in errors[0]


@pytest.mark.parametrize(
    ("case", "status", "words"),
    [
        ("wrong_shape", "INVALID_ARGUMENT", "shape [2, 3]; expected [-1, 2]"),
        ("wrong_datatype", "INVALID_ARGUMENT", "datatype FP64; expected FP32"),
        ("wrong_byte_length", "INVALID_ARGUMENT", "16 bytes of raw contents; shape [3, 2] of FP32 needs 24"),
        ("wrong_input_name", "INVALID_ARGUMENT", "unknown input 'x'"),
        ("empty_batch", "INVALID_ARGUMENT", "empty batch"),
        ("nan", "INVALID_ARGUMENT", "non-finite"),
        ("inf", "INVALID_ARGUMENT", "non-finite"),
        ("unknown_model", "NOT_FOUND", "unknown model 'nope'"),
        ("unknown_version", "NOT_FOUND", "no version '7'"),
    ],
)
def test_each_bad_request_gets_its_status_code(report, case, status, words):
    error = report["errors"][case]
    assert error["status"] == f"StatusCode.{status}"
    assert words in error["message"]


def test_the_server_still_serves_after_the_errors(report, session):
    assert report["ready_after_errors"] is True
    assert_outputs_equal(report["infer_after_errors"], expected(session, report["points"]))
