"""A Python client for the Open Inference Protocol gRPC API: numpy in, numpy out, sync and asyncio.

    with InferenceClient("127.0.0.1:8001") as client:
        prediction = client.predict(np.array([[0, 0], [0, 1]], np.float32))
    security = Security(tls_ca=Path("ca.pem"), token_file=Path("token"))  # serving.client.connect
    with InferenceClient("server.example:8001", security=security) as client: ...

`security` says how to reach the server: plaintext (the default) or TLS, mutual TLS with a client
certificate, and the bearer token sent with every call, read once when the client is made (a file that
cannot be read raises SecurityError there, not at the first call).

Tensors travel as raw little-endian bytes (`raw_input_contents`), as tritonclient sends them; answers
are read from `raw_output_contents`, or from typed `contents` for servers that answer that way. Calls
that fail with UNAVAILABLE (server starting, draining or queue full) are retried `retries` times,
waiting `backoff_s`, then twice as long each time (at most 2 s, with jitter, so that many clients
refused together do not come back together); every other error is raised at once as `InferenceError`,
UNAUTHENTICATED (no token, or one the server does not accept) too. Until the server has answered this
client once, the first UNAVAILABLE of a call is checked for a TLS mismatch (`explain_unavailable`: a
plaintext client at a TLS port or the reverse, a server certificate not signed by --tls-ca, a client
certificate the server requires); a mismatch is raised at once, its one-line explanation the message,
since retrying cannot help.
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
from serving.client.connect import PLAINTEXT, Security, explain_unavailable
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
        # The caller's credentials: no token, or one the server does not accept (--token-file).
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
    }
)


class InferenceError(Exception):
    """A call the server refused or could not answer; `code` is the gRPC status.

    `tls_mismatch`: the call found no server because of how this client connects (plaintext at a TLS
    port, ...); the message is then explain_unavailable's line, which names the server itself."""

    def __init__(self, code: grpc.StatusCode, message: str, *, tls_mismatch: bool = False):
        super().__init__(message if tls_mismatch else f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.tls_mismatch = tls_mismatch

    @property
    def exit_code(self) -> int:
        """The commands' exit status for it (README, "Exit codes"): 2 bad input or credentials refused
        (UNAUTHENTICATED), 3 server or model unreachable (a TLS mismatch too)."""
        return 2 if self.code in _REFUSED_AS_INVALID else 3

    def line(self, url: str) -> str:
        """The error as a command prints it: "URL: CODE: details", or the mismatch's line (which names URL)."""
        return str(self) if self.tls_mismatch else f"{url}: {self}"


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


def _raise_if_mismatch(explained: str, details: str) -> None:
    """Raises the mismatch explain_unavailable found, if it found one (its line differs from the details)."""
    if explained != " ".join(details.split()):
        raise InferenceError(grpc.StatusCode.UNAVAILABLE, explained, tls_mismatch=True) from None


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
        *,
        security: Security = PLAINTEXT,
    ):
        self.url, self.model, self.version = url, model, version
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.security = security
        # Whether the server has answered this client: from then on an UNAVAILABLE is the server's state
        # (starting, draining, full), not a TLS mismatch, and is only retried. Set off the hot path.
        self._answered = False
        # The call metadata, read once (SecurityError here, not at the first call); None without a token.
        self._metadata = security.metadata() or None
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
        return self.security.channel(url, options=_channel_options())

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method, request):
        for attempt in range(self.retries + 1):
            try:
                return method(request, timeout=self.timeout_s, metadata=self._metadata)
            except grpc.RpcError as exc:
                code, details = exc.code(), exc.details() or ""
                if code != grpc.StatusCode.UNAVAILABLE:
                    self._answered = True
                    raise InferenceError(code, details) from None
                if attempt == 0 and not self._answered:
                    _raise_if_mismatch(explain_unavailable(self.url, self.security, details), details)
                if attempt == self.retries:
                    raise InferenceError(code, details) from None
            time.sleep(_backoff(self.backoff_s, attempt))
        raise AssertionError("unreachable")

    def _model_metadata(self) -> pb.ModelMetadataResponse:
        response = self._call(self._stub.ModelMetadata, self._metadata_request())
        self._answered = True
        return response

    def metadata(self) -> dict:
        return _metadata_dict(self._model_metadata())

    def ready(self) -> bool:
        try:
            ready = self._call(self._stub.ModelReady, self._ready_request()).ready
        except InferenceError:
            return False
        self._answered = True
        return ready

    def infer(self, x: np.ndarray, outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        if self._sig is None:
            self._sig = _signature(self._model_metadata())
        request = _request(self.model, self.version, self._sig, x, outputs)
        return _outputs(self._call(self._stub.ModelInfer, request))

    def predict(self, x: np.ndarray) -> Prediction:
        return Prediction.from_outputs(self.infer(x, ["probability"]))


class AsyncInferenceClient(_Client):
    """The same client on grpc.aio, for many requests in flight from one thread."""

    def _open_channel(self, url: str) -> grpc.aio.Channel:
        return self.security.aio_channel(url, options=_channel_options())

    async def __aenter__(self) -> AsyncInferenceClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method, request):
        for attempt in range(self.retries + 1):
            try:
                return await method(request, timeout=self.timeout_s, metadata=self._metadata)
            except grpc.aio.AioRpcError as exc:
                code, details = exc.code(), exc.details() or ""
                if code != grpc.StatusCode.UNAVAILABLE:
                    self._answered = True
                    raise InferenceError(code, details) from None
                if attempt == 0 and not self._answered:
                    # The check opens a socket and may wait for it: not on the event loop.
                    explained = await asyncio.to_thread(explain_unavailable, self.url, self.security, details)
                    _raise_if_mismatch(explained, details)
                if attempt == self.retries:
                    raise InferenceError(code, details) from None
            await asyncio.sleep(_backoff(self.backoff_s, attempt))
        raise AssertionError("unreachable")

    async def _model_metadata(self) -> pb.ModelMetadataResponse:
        response = await self._call(self._stub.ModelMetadata, self._metadata_request())
        self._answered = True
        return response

    async def metadata(self) -> dict:
        return _metadata_dict(await self._model_metadata())

    async def ready(self) -> bool:
        try:
            ready = (await self._call(self._stub.ModelReady, self._ready_request())).ready
        except InferenceError:
            return False
        self._answered = True
        return ready

    async def infer(self, x: np.ndarray, outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        if self._sig is None:
            self._sig = _signature(await self._model_metadata())
        request = _request(self.model, self.version, self._sig, x, outputs)
        return _outputs(await self._call(self._stub.ModelInfer, request))

    async def predict(self, x: np.ndarray) -> Prediction:
        return Prediction.from_outputs(await self.infer(x, ["probability"]))
