"""The Open Inference Protocol's tensor vocabulary, shared by the server and the client.

Datatype names and their numpy dtypes on the wire (little-endian), the typed-contents field that
carries each, ONNX Runtime's type names, and TensorSpec, a model tensor as the server describes it.
Numpy only: no gRPC, no ONNX Runtime.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

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


def shape_text(shape) -> str:
    """A shape as the messages print it: [3, 5]."""
    return "[" + ", ".join(str(d) for d in shape) + "]"


# The RPCs open without a token when the server requires one (`xorserve serve --auth-open`): the probes
# (Kubernetes' gRPC probe asks grpc.health.v1; ServerLive and ServerReady are the protocol's) and reflection.
OPEN_BY_DEFAULT = ("ServerLive", "ServerReady", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection")
