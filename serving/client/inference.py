"""A Python client for the Open Inference Protocol gRPC API: numpy in, numpy out, sync and asyncio.

    with InferenceClient("127.0.0.1:8001") as client:
        prediction = client.predict(np.array([[0, 0], [0, 1]], np.float32))

Tensors travel as raw little-endian bytes (`raw_input_contents`), as tritonclient sends them; answers
are read from `raw_output_contents`, or from typed `contents` for servers that answer that way. Calls
that fail with UNAVAILABLE (server starting, draining or queue full) are retried `retries` times,
waiting `backoff_s`, then twice as long each time (at most 2 s, with jitter, so that many clients
refused together do not come back together); every other error is raised at once as `InferenceError`.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

import grpc
import numpy as np

from serving._proto import grpc_service_pb2 as pb
from serving._proto import grpc_service_pb2_grpc as pb_grpc
from serving.protocol import CONTENTS_FIELDS, NUMPY_DTYPES

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_MAX_WAIT_S = 2.0


# Status codes that refuse the request itself; any other failure means that the server or the model could
# not be reached or could not answer.
_REFUSED_AS_INVALID = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)


class InferenceError(Exception):
    """A call the server refused or could not answer; `code` is the gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message

    @property
    def exit_code(self) -> int:
        """The commands' exit status for it (README, "Exit codes"): 2 bad input, 3 server or model unreachable."""
        return 2 if self.code in _REFUSED_AS_INVALID else 3


@dataclass(frozen=True)
class Prediction:
    probability: np.ndarray  # float32 [N]
    label: np.ndarray  # int64 [N], probability >= 0.5

    @classmethod
    def from_outputs(cls, outputs: dict[str, np.ndarray]) -> Prediction:
        probability = outputs["probability"].reshape(-1)
        return cls(probability=probability, label=(probability >= 0.5).astype(np.int64))


@dataclass(frozen=True)
class _Signature:
    input_name: str
    datatype: str
    outputs: tuple[str, ...]


def _channel_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]


def _signature(metadata: pb.ModelMetadataResponse) -> _Signature:
    if len(metadata.inputs) != 1:
        raise InferenceError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"model '{metadata.name}' has {len(metadata.inputs)} inputs; this client sends exactly one",
        )
    tensor = metadata.inputs[0]
    return _Signature(tensor.name, tensor.datatype, tuple(o.name for o in metadata.outputs))


def _request(model: str, version: str, sig: _Signature, x: np.ndarray, outputs) -> pb.ModelInferRequest:
    x = np.ascontiguousarray(x, dtype=NUMPY_DTYPES[sig.datatype])
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    request.inputs.add(name=sig.input_name, datatype=sig.datatype, shape=list(x.shape))
    for name in outputs or ():
        request.outputs.add(name=name)
    request.raw_input_contents.append(x.tobytes())
    return request


def _outputs(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    result = {}
    for i, tensor in enumerate(response.outputs):
        dtype, shape = NUMPY_DTYPES[tensor.datatype], tuple(tensor.shape)
        if response.raw_output_contents:
            result[tensor.name] = np.frombuffer(response.raw_output_contents[i], dtype=dtype).reshape(shape)
        else:
            values = getattr(tensor.contents, CONTENTS_FIELDS[tensor.datatype])
            result[tensor.name] = np.asarray(values, dtype=dtype).reshape(shape)
    return result


def _backoff(first_s: float, attempt: int) -> float:
    return min(first_s * 2**attempt, _MAX_WAIT_S) * random.uniform(0.5, 1.0)


def _metadata_dict(metadata: pb.ModelMetadataResponse) -> dict:
    def tensors(items):
        return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in items]

    return {
        "name": metadata.name,
        "versions": list(metadata.versions),
        "platform": metadata.platform,
        "inputs": tensors(metadata.inputs),
        "outputs": tensors(metadata.outputs),
        "parameters": {key: value.string_param for key, value in metadata.parameters.items()},
    }


class _Client:
    """What the blocking and the asyncio client share: the target, the call policy and the channel."""

    def __init__(
        self,
        url: str,
        model: str = "xor",
        version: str = "",
        timeout_s: float = 10.0,
        retries: int = 5,
        backoff_s: float = 0.1,
    ):
        self.url, self.model, self.version = url, model, version
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self._channel = self._open_channel(url)
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._sig: _Signature | None = None

    def _open_channel(self, url: str):
        raise NotImplementedError

    def _metadata_request(self) -> pb.ModelMetadataRequest:
        return pb.ModelMetadataRequest(name=self.model, version=self.version)

    def _ready_request(self) -> pb.ModelReadyRequest:
        return pb.ModelReadyRequest(name=self.model, version=self.version)


class InferenceClient(_Client):
    """Blocking client for one model on one server."""

    def _open_channel(self, url: str) -> grpc.Channel:
        return grpc.insecure_channel(url, options=_channel_options())

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method, request):
        for attempt in range(self.retries + 1):
            try:
                return method(request, timeout=self.timeout_s)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt == self.retries:
                    raise InferenceError(exc.code(), exc.details() or "") from None
            time.sleep(_backoff(self.backoff_s, attempt))
        raise AssertionError("unreachable")

    def _metadata(self) -> pb.ModelMetadataResponse:
        return self._call(self._stub.ModelMetadata, self._metadata_request())

    def metadata(self) -> dict:
        return _metadata_dict(self._metadata())

    def ready(self) -> bool:
        try:
            return self._call(self._stub.ModelReady, self._ready_request()).ready
        except InferenceError:
            return False

    def infer(self, x: np.ndarray, outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        if self._sig is None:
            self._sig = _signature(self._metadata())
        request = _request(self.model, self.version, self._sig, x, outputs)
        return _outputs(self._call(self._stub.ModelInfer, request))

    def predict(self, x: np.ndarray) -> Prediction:
        return Prediction.from_outputs(self.infer(x, ["probability"]))


class AsyncInferenceClient(_Client):
    """The same client on grpc.aio, for many requests in flight from one thread."""

    def _open_channel(self, url: str) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(url, options=_channel_options())

    async def __aenter__(self) -> AsyncInferenceClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method, request):
        for attempt in range(self.retries + 1):
            try:
                return await method(request, timeout=self.timeout_s)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt == self.retries:
                    raise InferenceError(exc.code(), exc.details() or "") from None
            await asyncio.sleep(_backoff(self.backoff_s, attempt))
        raise AssertionError("unreachable")

    async def _metadata(self) -> pb.ModelMetadataResponse:
        return await self._call(self._stub.ModelMetadata, self._metadata_request())

    async def metadata(self) -> dict:
        return _metadata_dict(await self._metadata())

    async def ready(self) -> bool:
        try:
            return (await self._call(self._stub.ModelReady, self._ready_request())).ready
        except InferenceError:
            return False

    async def infer(self, x: np.ndarray, outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        if self._sig is None:
            self._sig = _signature(await self._metadata())
        request = _request(self.model, self.version, self._sig, x, outputs)
        return _outputs(await self._call(self._stub.ModelInfer, request))

    async def predict(self, x: np.ndarray) -> Prediction:
        return Prediction.from_outputs(await self.infer(x, ["probability"]))
