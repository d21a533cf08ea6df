"""Protobuf <-> numpy: decode and validate ModelInfer inputs, encode outputs as raw little-endian bytes.

Validation is as strict as Triton's and every message names the tensor, what was expected and what
came. Nothing here knows about batching or sessions: it sees tensor specs and messages only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from serving._proto import grpc_service_pb2 as pb
from serving._proto import model_config_pb2 as mc
from serving.errors import InvalidInputError

# ONNX Runtime's type names -> Open Inference Protocol datatypes.
ONNX_DATATYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
}

# Datatype -> numpy dtype on the wire (little-endian, as the protocol requires).
NUMPY_DTYPES = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}

# Datatype -> the InferTensorContents field that carries it typed (FP16 travels raw only).
CONTENTS_FIELDS = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}

# Datatype -> Triton's ModelConfig enum.
CONFIG_DATATYPES = {name: mc.DataType.Value("TYPE_" + name) for name in NUMPY_DTYPES}

FLOAT_DATATYPES = frozenset({"FP16", "FP32", "FP64"})


@dataclass(frozen=True)
class TensorSpec:
    """A model tensor: name, protocol datatype and shape with -1 for each variable dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype:
        return NUMPY_DTYPES[self.datatype]

    @cached_property
    def fixed_dims(self) -> tuple[tuple[int, int], ...]:
        """(axis, size) of every dimension whose size is fixed."""
        return tuple((axis, size) for axis, size in enumerate(self.shape) if size != -1)


def _shape_text(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _check_shape(spec: TensorSpec, shape: tuple[int, ...]) -> int:
    """Raises unless `shape` fits the spec with a non-empty batch; returns the element count."""
    if len(shape) != len(spec.shape) or any(shape[axis] != size for axis, size in spec.fixed_dims):
        raise InvalidInputError(
            f"input '{spec.name}' has shape {_shape_text(shape)}; expected {_shape_text(spec.shape)}"
        )
    count = math.prod(shape)
    if count <= 0:
        if min(shape) < 0:
            raise InvalidInputError(f"input '{spec.name}' has shape {_shape_text(shape)}; dimensions must be >= 0")
        if shape and shape[0] == 0:
            raise InvalidInputError(f"input '{spec.name}' has an empty batch (shape {_shape_text(shape)})")
    return count


def _decode_one(spec: TensorSpec, tensor, raw: bytes | None) -> np.ndarray:
    if tensor.datatype != spec.datatype:
        raise InvalidInputError(
            f"input '{spec.name}' has datatype {tensor.datatype or '(none)'}; expected {spec.datatype}"
        )
    shape = tuple(tensor.shape)
    count = _check_shape(spec, shape)
    dtype = NUMPY_DTYPES[spec.datatype]
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise InvalidInputError(
                f"input '{spec.name}' has {len(raw)} bytes of raw contents; "
                f"shape {_shape_text(shape)} of {spec.datatype} needs {count * dtype.itemsize}"
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
                f"input '{spec.name}' has {len(values)} values in contents.{field}; "
                f"shape {_shape_text(shape)} needs {count}"
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
            raise InvalidInputError(f"input '{tensor.name}' appears more than once")
        by_name[tensor.name] = index
    expected = [spec.name for spec in specs]
    unknown = [name for name in by_name if name not in expected]
    if unknown:
        raise InvalidInputError(f"unknown input '{unknown[0]}'; the model's inputs are {expected}")
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
            raise InvalidInputError(f"unknown output '{wanted.name}'; the model's outputs are {list(by_name)}")
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

    __slots__ = ("name", "shape", "nbytes", "dtype", "rows", "floating", "top_byte", "suspects")

    def __init__(self, spec: TensorSpec, shape: tuple[int, ...], rows: int) -> None:
        self.name = spec.name
        self.shape = shape
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

    def decode(self, request: pb.ModelInferRequest) -> tuple[dict[str, np.ndarray], int]:
        if self._single:
            tensors = request.inputs
            raws = request.raw_input_contents
            if len(tensors) == 1 and len(raws) == 1:
                tensor = tensors[0]
                key = (tensor.name, tensor.datatype, tuple(tensor.shape))
                signature = self._signatures.get(key)
                raw = raws[0]
                if signature is not None and len(raw) == signature.nbytes and not tensor.HasField("contents"):
                    array = np.frombuffer(raw, signature.dtype).reshape(signature.shape)
                    if not signature.floating or _surely_finite_raw(raw, signature) or _surely_finite(array):
                        return {signature.name: array}, signature.rows
                arrays, rows = decode_inputs(request, self._specs)
                if signature is None:
                    if len(self._signatures) >= self.MAX_SIGNATURES:
                        self._signatures.clear()
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
    return not any(suspect in tops for suspect in signature.suspects)


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
    """`encode_response` for one model version, from a prebuilt response per (outputs, shapes): each
    answer copies it (one C-level copy) and adds the id and the raw contents."""

    MAX_TEMPLATES = 256

    def __init__(self, model: str, version: str, specs: tuple[TensorSpec, ...]) -> None:
        self._model = model
        self._version = version
        self._specs = specs
        self._templates: dict[tuple, pb.ModelInferResponse] = {}

    def encode(
        self, request_id: str, outputs: tuple[TensorSpec, ...], arrays: dict[str, np.ndarray]
    ) -> pb.ModelInferResponse:
        chosen = [arrays[spec.name] for spec in outputs]
        # All outputs (the usual request) are keyed by shapes alone; hashing the specs costs more.
        names = None if outputs is self._specs else tuple(spec.name for spec in outputs)
        key = (names, *[array.shape for array in chosen])
        template = self._templates.get(key)
        if template is None:
            if len(self._templates) >= self.MAX_TEMPLATES:
                self._templates.clear()
            template = encode_response(self._model, self._version, "", outputs, arrays)
            template.ClearField("raw_output_contents")
            self._templates[key] = template
        response = pb.ModelInferResponse()
        response.CopyFrom(template)
        if request_id:
            response.id = request_id
        response.raw_output_contents.extend(
            [
                array.tobytes() if array.dtype == spec.dtype else np.asarray(array, dtype=spec.dtype).tobytes()
                for spec, array in zip(outputs, chosen, strict=True)
            ]
        )
        return response
