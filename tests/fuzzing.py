"""Requests to throw at a server, malformed and valid, as Hypothesis strategies; what every answer must be.

Shared by tests/test_fuzz.py (a few thousand requests in the suite) and bench/fuzz.py (50,000 against
`xorserve serve`). A `Case` is one message in the wire format, for a method of the service:
- `undecodable`: random bytes, or a valid request cut short or with a byte changed, that protobuf cannot
  parse (checked here): the answer must be INVALID_ARGUMENT, "could not be parsed";
- `proto`: a well-formed message with random fields: model names, versions, ids, tensor names, datatypes,
  shapes (huge ones with small contents too), contents, parameters, requested outputs; strings up to
  100,000 characters;
- `bytes`: random bytes that happen to parse;
- `too_large`: a ModelInferRequest over the server's message limit (unary only): RESOURCE_EXHAUSTED;
- `valid`: an XOR request (raw or typed contents, some outputs or all, version "" or "1"): it must be
  answered with the model's outputs.
Every error must carry a documented status code (`ALLOWED`, docs/serving.md), never UNKNOWN or
INTERNAL, and a message shorter than MAX_MESSAGE_CHARS.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from serving._proto import grpc_service_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
MODEL = "xor"
# The status codes a request may be answered with besides OK (docs/serving.md, "Bad input"); the
# fuzzed server runs in the "none" model control mode, where loads and unloads are FAILED_PRECONDITION.
ALLOWED = frozenset({"INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED", "UNAVAILABLE"})
MAX_MESSAGE_CHARS = 2048
# The message limit of the server being fuzzed (`--max-message-bytes`): large enough for 100,000-character
# strings, small enough that a request over it is cheap to send.
MAX_MESSAGE_BYTES = 1024 * 1024
DATATYPES = ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64")
DATATYPES += ("FP16", "FP32", "FP64", "BYTES", "BF16")
UNARY = tuple(m.name for m in SERVICE.methods if not m.client_streaming)
Reference = Callable[[np.ndarray], dict[str, np.ndarray]]  # x -> the model's outputs by name

_ids = itertools.count()


@dataclass
class Case:
    method: str  # a method of inference.GRPCInferenceService
    body: bytes  # the message as sent
    kind: str  # undecodable, proto, bytes, too_large, valid
    x: np.ndarray | None = None  # a valid request's input
    request_id: str = ""  # a valid request's id (unique)
    outputs: tuple[str, ...] = ()  # the outputs a valid request asks for (empty: all)

    @property
    def path(self) -> str:
        return f"/{SERVICE.full_name}/{self.method}"


# -- strings, shapes, tensors ----------------------------------------------------------------------

huge_texts = st.builds(
    lambda c, n: c * n, st.sampled_from(["a", "é", "✓", "\x00", "'"]), st.sampled_from([257, 10_000, 100_000])
)
texts = st.one_of(
    st.sampled_from(["xor", "1", "", "input", "logits", "probability", "FP32", "nope", "../xor", ".", "-1"]),
    st.text(st.characters(exclude_categories=["Cs"]), max_size=24),  # every character but surrogates (not UTF-8)
    huge_texts,
)
_big_dims = st.sampled_from([2**31, 2**32 + 2, 2**62, 2**63 - 1, -(2**63), -1])
shapes = st.one_of(
    st.lists(st.one_of(st.integers(-2, 5), _big_dims), max_size=5),
    st.builds(lambda n, d: [d] * n, st.sampled_from([300, 10_000]), st.sampled_from([0, 1, 2**62])),
)


_float_lists = {
    "fp32_contents": st.lists(st.floats(width=32), max_size=12),
    "fp64_contents": st.lists(st.floats(), max_size=12),
    "int_contents": st.lists(st.integers(-(2**31), 2**31 - 1), max_size=12),
    "int64_contents": st.lists(st.integers(-(2**63), 2**63 - 1), max_size=12),
    "uint_contents": st.lists(st.integers(0, 2**32 - 1), max_size=12),
    "bool_contents": st.lists(st.booleans(), max_size=12),
}
contents = st.one_of(
    *(
        st.builds(lambda field, values: pb.InferTensorContents(**{field: values}), st.just(f), v)
        for f, v in _float_lists.items()
    )
)
_parameter_values = st.one_of(
    st.builds(lambda v: pb.InferParameter(bool_param=v), st.booleans()),
    st.builds(lambda v: pb.InferParameter(int64_param=v), st.integers(-(2**63), 2**63 - 1)),
    st.builds(lambda v: pb.InferParameter(uint64_param=v), st.integers(0, 2**64 - 1)),
    st.builds(lambda v: pb.InferParameter(double_param=v), st.floats()),
    st.builds(lambda v: pb.InferParameter(string_param=v), texts),
)
parameters = st.dictionaries(texts, _parameter_values, max_size=3)
_model_names = st.one_of(st.just(MODEL), texts)
_versions = st.one_of(st.sampled_from(["", "1"]), texts)
_input_names = st.one_of(st.just("input"), texts)
_datatypes = st.one_of(st.just("FP32"), st.sampled_from(DATATYPES), texts)
_shapes = st.one_of(st.just([1, 2]), shapes)
_raws = st.one_of(st.binary(max_size=64), st.just(bytes(8)))
_others = st.sampled_from([name for name in UNARY if name != "ModelInfer"])
_output_names = st.lists(st.one_of(st.sampled_from(["logits", "probability"]), texts), max_size=3)


@st.composite
def infer_requests(draw) -> pb.ModelInferRequest:
    """A well-formed ModelInferRequest with random fields; mostly for model "xor", so that it gets as far as
    the input checks. (Strategies are built once, above: building them per draw costs more than drawing.)"""
    request = pb.ModelInferRequest(model_name=draw(_model_names), model_version=draw(_versions), id=draw(texts))
    raw = draw(st.booleans())
    for _ in range(draw(st.integers(0, 3))):
        tensor = request.inputs.add(name=draw(_input_names), datatype=draw(_datatypes), shape=draw(_shapes))
        if raw:
            request.raw_input_contents.append(draw(_raws))
        elif draw(st.booleans()):
            tensor.contents.CopyFrom(draw(contents))
        _set(tensor.parameters, draw(parameters))
    if draw(st.booleans()) and draw(st.booleans()):  # raw contents that do not match the inputs in number
        request.raw_input_contents.append(draw(st.binary(max_size=16)))
    for name in draw(_output_names):
        _set(request.outputs.add(name=name).parameters, draw(parameters))
    _set(request.parameters, draw(parameters))
    return request


def _set(target, values: dict) -> None:
    """Fills a map of InferParameter messages (a message map cannot be assigned to)."""
    for key, value in values.items():
        target[key].CopyFrom(value)


@st.composite
def other_requests(draw) -> tuple[str, bytes]:
    """A well-formed request for one of the other unary methods, its strings and booleans random."""
    method = draw(_others)
    message = getattr(pb, SERVICE.methods_by_name[method].input_type.name)()
    for field in message.DESCRIPTOR.fields:
        if field.type == field.TYPE_STRING:
            setattr(message, field.name, draw(_model_names))
        elif field.type == field.TYPE_BOOL:
            setattr(message, field.name, draw(st.booleans()))
    return method, message.SerializeToString()


# -- cases -----------------------------------------------------------------------------------------

valid_inputs = st.integers(1, 8).flatmap(
    lambda rows: arrays(np.float32, (rows, 2), elements=st.floats(-4, 4, width=32))
)
_valid_versions = st.sampled_from(["", "1"])
_valid_outputs = st.sampled_from([(), ("logits",), ("probability",), ("probability", "logits")])


@st.composite
def valid_cases(draw, request_id: str | None = None) -> Case:
    """A valid XOR request; its id unique unless given (the draws never depend on it: Hypothesis replays them)."""
    x = draw(valid_inputs)
    request_id = f"valid-{next(_ids)}" if request_id is None else request_id
    tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=list(x.shape))
    request = pb.ModelInferRequest(model_name=MODEL, model_version=draw(_valid_versions), id=request_id)
    if draw(st.booleans()):
        request.raw_input_contents.append(x.tobytes())
    else:
        tensor.contents.fp32_contents.extend(x.ravel().tolist())
    request.inputs.append(tensor)
    outputs = draw(_valid_outputs)
    request.outputs.extend(pb.ModelInferRequest.InferRequestedOutputTensor(name=name) for name in outputs)
    return Case("ModelInfer", request.SerializeToString(), "valid", x, request_id, outputs)


_random_bodies = st.binary(min_size=1, max_size=256)
_mutable = valid_cases("mutated")


@st.composite
def undecodable_bodies(draw, message_type=pb.ModelInferRequest) -> bytes:
    """Bytes that `message_type` cannot parse: random ones, or a valid request cut short or changed."""
    for _ in range(20):
        if draw(st.booleans()):
            body = draw(_random_bodies)
        else:
            body = bytearray(draw(_mutable).body)
            if draw(st.booleans()):
                del body[draw(st.integers(1, len(body) - 1)) :]
            else:
                body[draw(st.integers(0, len(body) - 1))] = draw(st.integers(0, 255))
            body = bytes(body)
        if not parses(message_type, body):
            return body
    return b"\x0a\x05ab"  # field 1 declares 5 bytes; 2 remain


def parses(message_type, body: bytes) -> bool:
    try:
        message_type.FromString(body)
    except Exception:
        return False
    return True


# Kinds of case, as often as they appear here: one in 100 unary requests is too large (each costs the
# server's transport a tenth of a second or so to refuse).
_UNARY_KINDS = ["valid"] * 25 + ["proto"] * 30 + ["other"] * 15 + ["undecodable"] * 20 + ["bytes"] * 9
_unary_kinds = st.sampled_from(_UNARY_KINDS[:50] + ["too_large"] + _UNARY_KINDS[50:])
_unary_kinds_small = st.sampled_from(_UNARY_KINDS)
_stream_kinds = st.sampled_from(["valid"] * 3 + ["proto"] * 3 + ["undecodable"] * 2 + ["bytes"])
_methods = st.sampled_from(UNARY)
_bodies = st.binary(max_size=128)
_TOO_LARGE = pb.ModelInferRequest(model_name=MODEL, raw_input_contents=[bytes(MAX_MESSAGE_BYTES)]).SerializeToString()


@st.composite
def unary_cases(draw, too_large: bool = True) -> Case:
    """One request for a unary method, of any kind."""
    kind = draw(_unary_kinds if too_large else _unary_kinds_small)
    if kind == "valid":
        return draw(valid_cases())
    if kind == "proto":
        body = draw(infer_requests()).SerializeToString()
        return Case("ModelInfer", body, "too_large" if len(body) > MAX_MESSAGE_BYTES else "proto")
    if kind == "other":
        method, body = draw(other_requests())
        return Case(method, body, "proto")
    if kind == "too_large":
        return Case("ModelInfer", _TOO_LARGE, "too_large")
    method = draw(_methods)
    message_type = getattr(pb, SERVICE.methods_by_name[method].input_type.name)
    if kind == "undecodable":
        return Case(method, draw(undecodable_bodies(message_type)), "undecodable")
    body = draw(_bodies)
    return Case(method, body, "bytes" if parses(message_type, body) else "undecodable")


_SHRINK = ("parameters", "outputs", "id", "model_name", "model_version", "inputs", "raw_input_contents")


@st.composite
def stream_cases(draw) -> Case:
    """One message for ModelStreamInfer; none over the message limit (the transport ends a stream for that)."""
    kind = draw(_stream_kinds)
    if kind == "valid":
        return draw(valid_cases())
    if kind == "proto":
        request = draw(infer_requests())
        for field in _SHRINK:  # under the limit (by far), dropping the fields that can hold the most
            if request.ByteSize() <= MAX_MESSAGE_BYTES // 2:
                break
            request.ClearField(field)
        return Case("ModelStreamInfer", request.SerializeToString(), "proto")
    if kind == "undecodable":
        return Case("ModelStreamInfer", draw(undecodable_bodies()), "undecodable")
    body = draw(_bodies)
    return Case("ModelStreamInfer", body, "bytes" if parses(pb.ModelInferRequest, body) else "undecodable")


# -- sending, and what the answers must be ---------------------------------------------------------


@dataclass
class Answer:
    code: str  # a grpc.StatusCode name; for a stream's in-band error, the one its message starts with
    message: str  # the error message ("" when OK)
    body: bytes | None  # the response message (None on an error)


def send_unary(channel: grpc.Channel, case: Case, timeout_s: float = 30.0) -> Answer:
    try:
        body = channel.unary_unary(case.path)(case.body, timeout=timeout_s)
    except grpc.RpcError as error:
        return Answer(error.code().name, error.details() or "", None)
    return Answer("OK", "", body)


def send_stream(channel: grpc.Channel, cases: list[Case], timeout_s: float = 60.0) -> list[Answer]:
    """The cases' messages on one ModelStreamInfer call; each response as an Answer (in the order they came).
    An error that ends the stream raises grpc.RpcError."""
    call = channel.stream_stream(f"/{SERVICE.full_name}/ModelStreamInfer")
    answers = []
    for raw in call(iter([case.body for case in cases]), timeout=timeout_s):
        response = pb.ModelStreamInferResponse.FromString(raw)
        if response.error_message:
            code, _, message = response.error_message.partition(": ")
            answers.append(Answer(code, message, None))
        else:
            answers.append(Answer("OK", "", response.infer_response.SerializeToString()))
    return answers


def check(case: Case, answer: Answer, reference: Reference) -> None:
    """Raises AssertionError unless `answer` is one that `case` may get."""
    assert len(answer.message) < MAX_MESSAGE_CHARS, f"{answer.code}: a message of {len(answer.message)} characters"
    if case.kind == "valid":
        assert answer.code == "OK", f"a valid request was answered {answer.code}: {answer.message}"
        check_outputs(case, pb.ModelInferResponse.FromString(answer.body), reference)
    elif case.kind == "undecodable":
        assert answer.code == "INVALID_ARGUMENT", f"an undecodable message was answered {answer.code}: {answer.message}"
        assert "could not be parsed as inference." in answer.message, answer.message
    elif case.kind == "too_large":
        assert answer.code == "RESOURCE_EXHAUSTED", f"a message over the limit was answered {answer.code}"
    else:
        assert answer.code == "OK" or answer.code in ALLOWED, f"answered {answer.code}: {answer.message[:300]}"


def check_outputs(case: Case, response: pb.ModelInferResponse, reference: Reference) -> None:
    expected = reference(case.x)
    assert response.id == case.request_id
    names = [tensor.name for tensor in response.outputs]
    assert names == list(case.outputs or expected), names
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        got = np.frombuffer(raw, np.float32).reshape(tensor.shape)
        np.testing.assert_allclose(got, expected[tensor.name], rtol=1e-5, atol=1e-6)


def check_stream(cases: list[Case], answers: list[Answer], reference: Reference) -> None:
    """Every message answered once: the valid ones (matched by id) with their outputs, the others with a
    documented in-band error or an answer."""
    assert len(answers) == len(cases), f"{len(cases)} messages, {len(answers)} answers"
    valid = {case.request_id: case for case in cases if case.kind == "valid"}
    answered = set()
    for answer in answers:
        assert len(answer.message) < MAX_MESSAGE_CHARS, f"{answer.code}: {len(answer.message)} characters"
        assert answer.code == "OK" or answer.code in ALLOWED, f"answered {answer.code}: {answer.message[:300]}"
        if answer.code == "OK":
            response = pb.ModelInferResponse.FromString(answer.body)
            case = valid.get(response.id)
            if case is not None:
                check_outputs(case, response, reference)
                answered.add(case.request_id)
    assert answered == set(valid), f"valid requests not answered: {sorted(set(valid) - answered)}"
    undecodable = sum(case.kind == "undecodable" for case in cases)
    parse_errors = sum("could not be parsed as inference." in answer.message for answer in answers)
    assert parse_errors == undecodable, f"{undecodable} undecodable messages, {parse_errors} answered so"
