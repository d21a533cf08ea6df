"""Fuzzing the server over the wire: a few thousand generated requests, malformed and valid, unary and streamed
(tests/fuzzing.py says what they are and what each answer must be).

Every error carries a documented status code and a bounded message, every valid request gets the model's
outputs, a stream goes on after a message it cannot parse, and the server is still live at the end. The
examples are the same on every run (`derandomize`), and nothing is written to a .hypothesis folder.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import ServerThread, cpu_outputs, infer_request, outputs_of
from fuzzing import (
    MAX_MESSAGE_BYTES,
    MAX_MESSAGE_CHARS,
    MODEL,
    check,
    check_stream,
    send_stream,
    send_unary,
    stream_cases,
    texts,
    unary_cases,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from serving._proto import grpc_service_pb2 as pb
from serving._proto import grpc_service_pb2_grpc as pb_grpc
from serving.server import ServerConfig
from serving.server.errors import Throttle, echo, status_of

MIN_REQUESTS = 2000  # over the module's tests
UNARY_EXAMPLES, UNARY_BATCH = 300, (4, 6)  # examples, and requests per example (at least, at most)
STREAM_EXAMPLES, STREAM_BATCH = 80, (10, 14)
REPOSITORY_EXAMPLES = 60
FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
SENT: Counter = Counter()  # requests sent by kind, over the module


@pytest.fixture(scope="module", autouse=True)
def hypothesis_home(tmp_path_factory: pytest.TempPathFactory):
    """Hypothesis keeps caches (of the constants in the code under test) in ./.hypothesis; not in the repository."""
    set_hypothesis_home_dir(tmp_path_factory.mktemp("hypothesis"))
    yield
    set_hypothesis_home_dir(None)


@pytest.fixture(scope="module")
def fuzzed(model_repository: Path):
    config = ServerConfig(model_repository=model_repository, device="cpu", max_message_bytes=MAX_MESSAGE_BYTES)
    handle = ServerThread(config).start()
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def channel(fuzzed) -> grpc.Channel:
    with grpc.insecure_channel(fuzzed.address) as channel:
        yield channel


@pytest.fixture(scope="module")
def reference(model_repository: Path):
    path = model_repository / "xor" / "1" / "model.onnx"
    return lambda x: cpu_outputs(path, x)


def test_unary_requests_get_documented_codes_and_valid_ones_their_outputs(channel, reference):
    @settings(FUZZ, max_examples=UNARY_EXAMPLES)
    @given(st.lists(unary_cases(), min_size=UNARY_BATCH[0], max_size=UNARY_BATCH[1]))
    def run(cases):
        for case in cases:
            SENT[case.kind] += 1
            check(case, send_unary(channel, case), reference)

    run()


def test_streamed_requests_are_each_answered_and_the_stream_goes_on(channel, reference):
    @settings(FUZZ, max_examples=STREAM_EXAMPLES)
    @given(st.lists(stream_cases(), min_size=STREAM_BATCH[0], max_size=STREAM_BATCH[1]))
    def run(cases):
        SENT.update(case.kind for case in cases)
        check_stream(cases, send_stream(channel, cases), reference)

    run()


def test_the_server_is_live_and_serving_after_the_fuzzing(channel, reference):
    assert sum(SENT.values()) >= MIN_REQUESTS, SENT
    assert all(SENT[kind] > 0 for kind in ("valid", "proto", "undecodable", "bytes", "too_large")), SENT
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    assert stub.ServerLive(pb.ServerLiveRequest()).live
    assert stub.ServerReady(pb.ServerReadyRequest()).ready
    x = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], np.float32)
    got = outputs_of(stub.ModelInfer(infer_request(x)))
    for name, value in reference(x).items():
        np.testing.assert_array_equal(got[name], value)


def test_load_and_unload_of_any_name_in_explicit_mode_are_documented_errors(model_repository):
    """A name the file system cannot look up (over 255 bytes) was an INTERNAL error (OSError) on load."""
    config = ServerConfig(model_repository=model_repository, device="cpu", model_control_mode="explicit")
    handle = ServerThread(config).start()
    try:
        with grpc.insecure_channel(handle.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)

            @settings(FUZZ, max_examples=REPOSITORY_EXAMPLES)
            @given(texts.filter(lambda name: name != MODEL), st.booleans())
            def run(name, load):
                call = stub.RepositoryModelLoad if load else stub.RepositoryModelUnload
                request = (pb.RepositoryModelLoadRequest if load else pb.RepositoryModelUnloadRequest)(model_name=name)
                with pytest.raises(grpc.RpcError) as caught:
                    call(request, timeout=30)
                SENT["repository"] += 1
                assert caught.value.code() == grpc.StatusCode.NOT_FOUND, caught.value.details()
                assert len(caught.value.details()) < MAX_MESSAGE_CHARS

            run()
    finally:
        handle.stop()


def test_an_unparsable_body_is_invalid_argument_on_every_method_and_in_band_on_a_stream(channel):
    """The adversarial run's finding: UNKNOWN (and a traceback in the log) before, and the stream ended."""
    for method in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
        path = f"/inference.GRPCInferenceService/{method.name}"
        if method.client_streaming:
            good = infer_request(np.zeros((1, 2), np.float32), request_id="after").SerializeToString()
            answers = [
                pb.ModelStreamInferResponse.FromString(r)
                for r in channel.stream_stream(path)(iter([b"\x0a\x05ab", good]))
            ]
            assert answers[0].error_message == (
                "INVALID_ARGUMENT: the request (4 bytes) could not be parsed as inference.ModelInferRequest: "
                "field model_name (at byte 0): declares 5 bytes; 2 remain"
            )
            assert answers[1].error_message == "" and answers[1].infer_response.id == "after"
            continue
        with pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary(path)(b"\x0a\x05ab" if method.input_type.fields else b"\xff", timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method.name
        assert f"could not be parsed as {method.input_type.full_name}: " in caught.value.details()


def test_a_huge_name_comes_back_cut_with_its_length(channel):
    """100,000 characters used to overflow the client's metadata limit (RESOURCE_EXHAUSTED, not NOT_FOUND)."""
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelMetadata(pb.ModelMetadataRequest(name="a" * 100_000))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert caught.value.details() == f"unknown model '{'a' * 256}…' (100000 characters); models: ['xor']"


def test_a_flood_of_bad_requests_logs_a_line_not_a_line_each(channel, caplog):
    path = "/inference.GRPCInferenceService/ModelConfig"
    with caplog.at_level(logging.INFO, logger="serving.server.errors"):
        for _ in range(200):
            with pytest.raises(grpc.RpcError):
                channel.unary_unary(path)(b"\x0a\x05ab", timeout=10)
    lines = [r for r in caplog.records if "rpc=ModelConfig code=INVALID_ARGUMENT" in r.getMessage()]
    assert len(lines) <= 1  # none when an earlier test of the module logged one less than LOG_EVERY_S ago
    assert not any(r.exc_info for r in caplog.records)


def test_an_unexpected_error_repeated_gets_one_traceback_then_a_count(caplog):
    with caplog.at_level(logging.INFO, logger="serving.server.errors"):
        answers = [status_of(RuntimeError("boom"), "FloodTest", request_id="r" * 1000) for _ in range(100)]
    assert {code for code, _ in answers} == {grpc.StatusCode.INTERNAL}
    assert all(len(message) < MAX_MESSAGE_CHARS for _, message in answers)
    records = [r for r in caplog.records if "rpc=FloodTest" in r.getMessage()]
    assert len(records) == 1 and records[0].exc_info is not None


def test_the_throttle_writes_one_line_per_period_and_counts_the_rest():
    now, summaries = [0.0], []
    throttle = Throttle(10.0, lambda key, held, note: summaries.append((key, held)), clock=lambda: now[0])
    assert throttle.admit(("A", "X")) == 0
    assert [throttle.admit(("A", "X")) for _ in range(5)] == [None] * 5
    assert throttle.admit(("B", "X")) == 0  # keys are apart
    now[0] = 10.0
    assert throttle.admit(("A", "X")) == 5  # the next line says how many were held back
    assert throttle.admit(("A", "X")) is None
    assert summaries == []  # without an event loop no timer writes them; the next line does

    async def burst():  # with one, a timer writes the count at the end of the period
        throttle = Throttle(0.05, lambda key, held, note: summaries.append((key, held, note)))
        assert [throttle.admit(("C", "X"), f"n{n}") for n in range(4)] == [0, None, None, None]
        await asyncio.sleep(0.2)

    asyncio.run(burst())
    assert summaries == [(("C", "X"), 3, "n3")]


def test_echo_cuts_long_strings_and_states_their_length():
    assert echo("xor") == "'xor'" and echo("FP64", quote=False) == "FP64"
    assert echo("a" * 100_000) == f"'{'a' * 256}…' (100000 characters)"
    assert echo("a" * 257, quote=False) == f"{'a' * 256}… (257 characters)"
