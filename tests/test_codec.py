"""The response encoder: protobuf's wire format written directly, and caches that never mix selections."""

import itertools

import numpy as np
import pytest
from conftest import outputs_of

from serving._proto import grpc_service_pb2 as pb
from serving.protocol import TensorSpec
from serving.server.codec import ResponseEncoder, encode_response, stream_response


def test_outputs_asked_for_in_any_order_come_back_by_name_past_the_cache_limits():
    specs = tuple(TensorSpec(f"out{i}", "FP32", (-1, 1)) for i in range(6))
    encoder = ResponseEncoder("m", "1", specs)
    encoder.MAX_TEMPLATES = 8  # small caches, so that they are cleared many times below
    results = [np.full((2, 1), i, np.float32) for i in range(len(specs))]
    for names in itertools.islice(itertools.permutations([s.name for s in specs], 3), 60):
        request = pb.ModelInferRequest(outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in names])
        response = pb.ModelInferResponse.FromString(encoder.encode("id", encoder.outputs_for(request), results))
        got = outputs_of(response)
        assert list(got) == list(names)
        for name in names:
            np.testing.assert_array_equal(got[name], results[int(name[3:])])
    everything = pb.ModelInferResponse.FromString(
        encoder.encode("", encoder.outputs_for(pb.ModelInferRequest()), results)
    )
    assert [t.name for t in everything.outputs] == [s.name for s in specs] and everything.id == ""


@pytest.mark.parametrize("rows", [1, 31, 32, 4096, 300_000])  # lengths of one, two and three varint bytes
@pytest.mark.parametrize("request_id", ["", "r1", "é" * 70])
def test_the_encoded_bytes_parse_to_the_message_encode_response_builds(rows, request_id):
    specs = (TensorSpec("logits", "FP32", (-1, 1)), TensorSpec("index", "INT64", (-1, 2)))
    results = [np.arange(rows, dtype=np.float32).reshape(rows, 1), np.ones((rows, 2), dtype=np.int32)]
    encoder = ResponseEncoder("xor", "7", specs)
    encoded = encoder.encode(request_id, specs, results)
    expected = encode_response("xor", "7", request_id, specs, dict(zip(("logits", "index"), results, strict=True)))
    assert pb.ModelInferResponse.FromString(encoded) == expected
    stream = pb.ModelStreamInferResponse.FromString(stream_response(encoded))
    assert stream.infer_response == expected and stream.error_message == ""
