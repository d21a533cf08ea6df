"""Protobuf <-> numpy: decode and validate ModelInfer inputs, encode outputs as raw little-endian bytes.

Validation is as strict as Triton's and every message names the tensor, what was expected and what
came. Nothing here knows about batching or sessions: it sees tensor specs and messages only.
"""

from __future__ import annotations

import math
import operator

import numpy as np

from serving._proto import grpc_service_pb2 as pb
from serving._proto import model_config_pb2 as mc
from serving.protocol import CONTENTS_FIELDS, FLOAT_DATATYPES, NUMPY_DTYPES, TensorSpec, shape_text
from serving.server.errors import MAX_ECHO_CHARS, InvalidInputError, echo

# Datatype -> Triton's ModelConfig enum.
CONFIG_DATATYPES = {name: mc.DataType.Value("TYPE_" + name) for name in NUMPY_DTYPES}


def _shown(shape: tuple[int, ...]) -> str:
    """A request's shape as a message shows it, cut to MAX_ECHO_CHARS as `echo` cuts strings: a shape may
    have millions of dimensions, and only the first MAX_ECHO_CHARS can show."""
    text = shape_text(shape[:MAX_ECHO_CHARS])
    if len(shape) <= MAX_ECHO_CHARS and len(text) <= MAX_ECHO_CHARS:
        return text
    return f"{text[:MAX_ECHO_CHARS]}… ({len(shape)} dimensions)"


def _check_shape(spec: TensorSpec, shape: tuple[int, ...]) -> int:
    """Raises unless `shape` fits the spec with a non-empty batch; returns the element count."""
    if len(shape) != len(spec.shape) or any(shape[axis] != size for axis, size in spec.fixed_dims):
        raise InvalidInputError(f"input '{spec.name}' has shape {_shown(shape)}; expected {shape_text(spec.shape)}")
    count = math.prod(shape)
    if count <= 0:
        if min(shape) < 0:
            raise InvalidInputError(f"input '{spec.name}' has shape {_shown(shape)}; dimensions must be >= 0")
        if shape and shape[0] == 0:
            raise InvalidInputError(f"input '{spec.name}' has an empty batch (shape {_shown(shape)})")
    return count


def _decode_one(spec: TensorSpec, tensor, raw: bytes | None) -> np.ndarray:
    if tensor.datatype != spec.datatype:
        raise InvalidInputError(
            f"input '{spec.name}' has datatype {echo(tensor.datatype, quote=False) or '(none)'}; "
            f"expected {spec.datatype}"
        )
    shape = tuple(tensor.shape)
    count = _check_shape(spec, shape)
    dtype = NUMPY_DTYPES[spec.datatype]
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise InvalidInputError(
                f"input '{spec.name}' has {len(raw)} bytes of raw contents; "
                f"shape {_shown(shape)} of {spec.datatype} needs {count * dtype.itemsize}"
            )
        if tensor.HasField("contents"):
            raise InvalidInputError(
                f"input '{spec.name}' has both raw_input_contents and typed contents; send one of them"
            )
        array = np.frombuffer(raw, dtype=dtype)
    else:
        field = CONTENTS_FIELDS.get(spec.datatype)
        if field is None:
            raise InvalidInputError(f"input '{spec.name}' of datatype {spec.datatype} must be sent as raw contents")
        values = getattr(tensor.contents, field)
        if len(values) != count:
            raise InvalidInputError(
                f"input '{spec.name}' has {len(values)} values in contents.{field}; shape {_shown(shape)} needs {count}"
            )
        array = np.asarray(values, dtype=dtype)
    array = array.reshape(shape)
    if spec.datatype in FLOAT_DATATYPES and not np.isfinite(array).all():
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        raise InvalidInputError(f"input '{spec.name}' has {bad} non-finite value(s) (NaN or Inf); expected finite")
    return array


def _check_names(tensors, specs: tuple[TensorSpec, ...]) -> list[int]:
    """For each spec, the index of its tensor in the request; raises on unknown, missing or repeated names."""
    by_name: dict[str, int] = {}
    for index, tensor in enumerate(tensors):
        if tensor.name in by_name:
            raise InvalidInputError(f"input {echo(tensor.name)} appears more than once")
        by_name[tensor.name] = index
    expected = [spec.name for spec in specs]
    unknown = [name for name in by_name if name not in expected]
    if unknown:
        raise InvalidInputError(f"unknown input {echo(unknown[0])}; the model's inputs are {expected}")
    missing = [name for name in expected if name not in by_name]
    if missing:
        raise InvalidInputError(f"missing input '{missing[0]}'; the model's inputs are {expected}")
    return [by_name[name] for name in expected]


def decode_inputs(request: pb.ModelInferRequest, specs: tuple[TensorSpec, ...]) -> tuple[dict[str, np.ndarray], int]:
    """The request's inputs as arrays keyed by name, and their batch size (rows; 0 without a batch axis).

    Raises InvalidInputError naming the tensor, what was expected and what came.
    """
    tensors = request.inputs
    raws = request.raw_input_contents
    if raws and len(raws) != len(tensors):
        raise InvalidInputError(
            f"request has {len(raws)} raw_input_contents for {len(tensors)} inputs; send one per input, in order"
        )
    if len(tensors) == len(specs) and all(t.name == s.name for t, s in zip(tensors, specs, strict=True)):
        order = range(len(specs))  # the usual case: the model's inputs, in the model's order
    else:
        order = _check_names(tensors, specs)
    arrays = {}
    for spec, index in zip(specs, order, strict=True):
        arrays[spec.name] = _decode_one(spec, tensors[index], raws[index] if raws else None)
    rows = 0
    if specs and specs[0].shape and specs[0].shape[0] == -1:
        rows = arrays[specs[0].name].shape[0]
        for spec in specs[1:]:
            if arrays[spec.name].shape[0] != rows:
                raise InvalidInputError(
                    f"input '{spec.name}' has batch size {arrays[spec.name].shape[0]}; "
                    f"input '{specs[0].name}' has {rows}; all inputs must have the same batch size"
                )
    return arrays, rows


def requested_outputs(request: pb.ModelInferRequest, specs: tuple[TensorSpec, ...]) -> tuple[TensorSpec, ...]:
    """The outputs the request asks for (all when it names none), in the request's order."""
    if not request.outputs:
        return specs
    by_name = {spec.name: spec for spec in specs}
    chosen = []
    for wanted in request.outputs:
        spec = by_name.get(wanted.name)
        if spec is None:
            raise InvalidInputError(f"unknown output {echo(wanted.name)}; the model's outputs are {list(by_name)}")
        chosen.append(spec)
    return tuple(chosen)


def encode_response(
    model: str, version: str, request_id: str, outputs: tuple[TensorSpec, ...], arrays: dict[str, np.ndarray]
) -> pb.ModelInferResponse:
    """A ModelInferResponse carrying `arrays` (by output name) as raw little-endian contents."""
    response = pb.ModelInferResponse(model_name=model, model_version=version, id=request_id)
    raw = response.raw_output_contents
    for spec in outputs:
        array = arrays[spec.name]
        tensor = response.outputs.add()
        tensor.name = spec.name
        tensor.datatype = spec.datatype
        tensor.shape.extend(array.shape)
        raw.append(np.ascontiguousarray(array, dtype=spec.dtype).tobytes())
    return response


class _Signature:
    """What a validated single-input request looked like, so the next one like it skips re-validation."""

    __slots__ = (
        "name",
        "datatype",
        "shape",
        "shape_list",
        "nbytes",
        "dtype",
        "rows",
        "floating",
        "top_byte",
        "suspects",
    )

    def __init__(self, spec: TensorSpec, shape: tuple[int, ...], rows: int) -> None:
        self.name = spec.name
        self.datatype = spec.datatype
        self.shape = shape
        self.shape_list = list(shape)  # what a request's repeated shape field compares equal to
        self.dtype = NUMPY_DTYPES[spec.datatype]
        self.nbytes = math.prod(shape) * self.dtype.itemsize
        self.rows = rows
        self.floating = spec.datatype in FLOAT_DATATYPES
        self.top_byte = self.dtype.itemsize - 1  # little-endian: sign and high exponent bits come last
        self.suspects = _NON_FINITE_TOP_BYTES.get(spec.datatype, ())


class InputDecoder:
    """`decode_inputs` for one model, with a fast path for the common request: a single input sent as
    raw contents whose (name, datatype, shape) already passed validation once.

    The fast path re-checks only what varies between such requests (byte length, typed contents present,
    finite values); on any doubt it falls back to `decode_inputs`, which raises the precise error.
    """

    MAX_SIGNATURES = 256  # distinct shapes remembered; beyond that the cache starts afresh

    def __init__(self, specs: tuple[TensorSpec, ...]) -> None:
        self._specs = specs
        self._single = len(specs) == 1
        self._signatures: dict[tuple, _Signature] = {}
        self._last: _Signature | None = None  # the signature of the previous fast request: usually this one's

    def decode(self, request: pb.ModelInferRequest) -> tuple[dict[str, np.ndarray], int]:
        if self._single:
            tensors = request.inputs
            raws = request.raw_input_contents
            if len(tensors) == 1 and len(raws) == 1:
                tensor = tensors[0]
                signature = self._last
                if (
                    signature is None
                    or tensor.shape != signature.shape_list
                    or tensor.name != signature.name
                    or tensor.datatype != signature.datatype
                ):
                    key = (tensor.name, tensor.datatype, tuple(tensor.shape))
                    signature = self._signatures.get(key)
                raw = raws[0]
                if signature is not None and len(raw) == signature.nbytes and not tensor.HasField("contents"):
                    array = np.ndarray(signature.shape, signature.dtype, raw)
                    if not signature.floating or _surely_finite_raw(raw, signature) or _surely_finite(array):
                        self._last = signature
                        return {signature.name: array}, signature.rows
                arrays, rows = decode_inputs(request, self._specs)
                if signature is None:
                    if len(self._signatures) >= self.MAX_SIGNATURES:
                        self._signatures.clear()
                    key = (tensor.name, tensor.datatype, tuple(tensor.shape))
                    self._signatures[key] = _Signature(self._specs[0], key[2], rows)
                return arrays, rows
        return decode_inputs(request, self._specs)


# The top byte (sign bit and high exponent bits, last in little-endian) of every NaN or infinity, by
# datatype: its exponent bits are all ones. FP32 and FP64 share their top byte with the largest finite
# values (above 1.7e38 and 2.7e303), which is why a match is only a suspicion.
_NON_FINITE_TOP_BYTES = {
    "FP16": tuple(bytes([b]) for b in (0x7C, 0x7D, 0x7E, 0x7F, 0xFC, 0xFD, 0xFE, 0xFF)),
    "FP32": (b"\x7f", b"\xff"),
    "FP64": (b"\x7f", b"\xff"),
}


def _surely_finite_raw(raw: bytes, signature: _Signature) -> bool:
    """True when no value of the raw little-endian floats can be NaN or infinite: no top byte is one that
    a non-finite value has (False may still be finite: the caller then checks exactly).

    Works on bytes (a strided slice and a memchr per suspect byte), holding the GIL: numpy releases it
    for arrays of 500 elements or more, and each release costs tens of microseconds of a loaded
    single-core server (docs/benchmarks.md); on tiny arrays it is also faster than np.isfinite."""
    tops = raw[signature.top_byte :: signature.top_byte + 1]
    for suspect in signature.suspects:  # noqa: SIM110 (a loop: all() and its generator cost more per request)
        if suspect in tops:
            return False
    return True


def _surely_finite(array: np.ndarray) -> bool:
    """True when every value is finite; may say False for finite values whose squares overflow (the
    caller then checks exactly). A NaN or infinity always makes the sum of squares non-finite.

    Small arrays use np.isfinite: numpy keeps the GIL for ufuncs under 500 elements, while the dot
    product releases it, and on a loaded single-core server each release hands the GIL to gRPC's
    polling thread and back, which costs tens of microseconds (docs/benchmarks.md)."""
    if array.size < 500:
        return bool(np.isfinite(array).all())
    flat = array.ravel()
    return math.isfinite(flat @ flat)


class ResponseEncoder:
    """`encode_response` for one model version, written straight into protobuf's wire format.

    A ModelInferResponse is its fields one after another, in any order. Per (outputs asked for, shapes)
    the encoder serializes once a template holding the model name, version and output tensors; each
    answer is that template, then the id (field 3) and the raw contents (field 6), each a tag, a length
    and the bytes. The servicer hands these bytes to gRPC as they are (see `servicer.add_to_server`);
    `tests/test_codec.py` checks that they parse to the message `encode_response` builds.
    """

    MAX_TEMPLATES = 256

    def __init__(self, model: str, version: str, specs: tuple[TensorSpec, ...]) -> None:
        self._model = model
        self._version = version
        self._specs = specs
        self._index = {spec.name: index for index, spec in enumerate(specs)}
        # (id of a selection below, shapes...) -> (template bytes, whether the arrays' dtypes are the specs').
        self._templates: dict[tuple, tuple[bytes, bool]] = {}
        # The outputs a list of names asks for; templates are keyed by these tuples' ids, so they live here.
        self._selections: dict[tuple[str, ...], tuple[TensorSpec, ...]] = {tuple(self._index): specs}

    def outputs_for(self, request: pb.ModelInferRequest) -> tuple[TensorSpec, ...]:
        """`requested_outputs`, remembered per list of names: all outputs in the model's order are the specs
        themselves (the encoder's quickest case)."""
        if not request.outputs:
            return self._specs
        names = tuple(map(_NAME, request.outputs))
        chosen = self._selections.get(names)
        if chosen is None:
            chosen = requested_outputs(request, self._specs)
            if len(self._selections) >= self.MAX_TEMPLATES:  # templates keyed by the old selections go too
                self._selections = {tuple(self._index): self._specs}
                self._templates.clear()
            self._selections[names] = chosen
        return chosen

    def encode(self, request_id: str, outputs: tuple[TensorSpec, ...], results: list[np.ndarray]) -> bytes:
        """The serialized response carrying `outputs` (a tuple from `outputs_for`) of `results`, the model's
        outputs in its order."""
        chosen = results if outputs is self._specs else [results[self._index[spec.name]] for spec in outputs]
        key = (id(outputs), *map(_SHAPE, chosen))
        entry = self._templates.get(key)
        if entry is None:
            if len(self._templates) >= self.MAX_TEMPLATES:
                self._templates.clear()
            arrays = {spec.name: array for spec, array in zip(outputs, chosen, strict=True)}
            template = encode_response(self._model, self._version, "", outputs, arrays)
            template.ClearField("raw_output_contents")
            same = all(array.dtype == spec.dtype for spec, array in zip(outputs, chosen, strict=True))
            entry = self._templates[key] = (template.SerializeToString(), same)
        template, same_dtypes = entry
        parts = [template]
        if request_id:
            identifier = request_id.encode()
            parts += (length_prefix(_ID, len(identifier)), identifier)
        if not same_dtypes:
            chosen = [np.asarray(array, dtype=spec.dtype) for spec, array in zip(outputs, chosen, strict=True)]
        for data in map(_TOBYTES, chosen):
            parts += (length_prefix(_RAW_OUTPUT, len(data)), data)
        return b"".join(parts)


_NAME = operator.attrgetter("name")
_SHAPE = operator.attrgetter("shape")
_TOBYTES = np.ndarray.tobytes
# Tags of length-delimited fields: (field number << 3) | 2.
_ID = 3 << 3 | 2  # ModelInferResponse.id
_RAW_OUTPUT = 6 << 3 | 2  # ModelInferResponse.raw_output_contents
_STREAM_INFER_RESPONSE = 2 << 3 | 2  # ModelStreamInferResponse.infer_response
_PREFIXES: dict[tuple[int, int], bytes] = {}


def length_prefix(tag: int, length: int) -> bytes:
    """A length-delimited field's tag and length as varints (both below 2**63), remembered for common ones."""
    prefix = _PREFIXES.get((tag, length))
    if prefix is None:
        out = bytearray([tag])
        value = length
        while value > 0x7F:
            out.append(value & 0x7F | 0x80)
            value >>= 7
        out.append(value)
        prefix = bytes(out)
        if len(_PREFIXES) < 4096:
            _PREFIXES[(tag, length)] = prefix
    return prefix


def stream_response(infer_response: bytes) -> bytes:
    """A ModelStreamInferResponse carrying an encoded ModelInferResponse, in wire format."""
    return length_prefix(_STREAM_INFER_RESPONSE, len(infer_response)) + infer_response
