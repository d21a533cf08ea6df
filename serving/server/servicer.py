"""The inference.GRPCInferenceService handlers: each a few lines that delegate to the data plane.

Status codes come from serving.server.errors, the same way for every handler (the `rpc_errors`
decorator); on ModelStreamInfer a failed request does not end the stream: its error travels in that
response's `error_message`, as Triton does. Inference answers are bytes already in protobuf's wire
format (serving.server.codec): `add_to_server` registers the service so that gRPC sends them as they are,
and so that a request that cannot be parsed reaches its handler as an `Undecodable` (answered
INVALID_ARGUMENT; on a stream in-band, and the stream goes on).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import grpc
from google.protobuf.descriptor import FieldDescriptor

from serving._proto import grpc_service_pb2 as pb
from serving._proto import grpc_service_pb2_grpc as pb_grpc
from serving.server.codec import stream_response
from serving.server.dataplane import DataPlane, Job
from serving.server.errors import UnavailableError, Undecodable, rpc_errors, status_of

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]


class _Stream:
    """A ModelStreamInfer call as the drain sees it: its task, whether it waits for the client's next
    message, and whether it is to end."""

    __slots__ = ("task", "reading", "ending")

    def __init__(self, task: asyncio.Task, ending: bool) -> None:
        self.task = task
        self.reading = False
        self.ending = ending


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, plane: DataPlane) -> None:
        self._plane = plane
        self._streams: set[_Stream] = set()
        self._ending = False

    def end_streams(self) -> None:
        """The server drains and refuses new requests: each ModelStreamInfer stream (and any opened from
        now on) ends UNAVAILABLE once it has answered the requests it read: at once if it waits for the
        client's next message, else after the one it works on."""
        self._ending = True
        for stream in self._streams:
            stream.ending = True
            if stream.reading:
                stream.task.cancel()

    @rpc_errors
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @rpc_errors
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self._plane.ready)

    @rpc_errors
    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=self._plane.model_ready(request.name, request.version))

    @rpc_errors
    async def ServerMetadata(self, request, context):
        return self._plane.server_metadata()

    @rpc_errors
    async def ModelMetadata(self, request, context):
        return self._plane.model_metadata(request.name, request.version)

    @rpc_errors
    async def ModelConfig(self, request, context):
        return self._plane.model_config(request.name, request.version)

    @rpc_errors
    async def RepositoryIndex(self, request, context):
        return await self._plane.repository_index(request.ready)

    @rpc_errors
    async def RepositoryModelLoad(self, request, context):
        await self._plane.load_model(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @rpc_errors
    async def RepositoryModelUnload(self, request, context):
        await self._plane.unload_model(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    @rpc_errors
    def ModelInfer(self, request, context):
        return self._plane.infer(request, context.time_remaining())  # awaited by rpc_errors

    async def ModelStreamInfer(
        self, requests: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> None:
        """Answers each request of the stream as it finishes, in-band errors included.

        A request the batcher answers soon (run at once, or held briefly for coalescing: see
        serving.server.batching) is answered before the next is read, without a task; one that must wait
        for a queue delay or an instance thread gets a task, so the stream's requests can share batches.
        Writes are serialised: gRPC allows one message in flight per call.
        """
        plane = self._plane
        write_lock = asyncio.Lock()
        tasks: set[asyncio.Task] = set()

        async def answer(job: Job) -> None:
            try:
                response = stream_response(await plane.run(job))
            except Exception as exc:
                response = _stream_error(exc, job.request)
            async with write_lock:
                await context.write(response)

        stream = _Stream(asyncio.current_task(), self._ending)
        self._streams.add(stream)
        incoming = None if stream.ending else aiter(requests)  # (an iterator never iterated: a warning)
        try:
            if stream.ending:  # opened while the server drains: held, then refused below (DataPlane.refused)
                with contextlib.suppress(UnavailableError):
                    await plane.refused(context.time_remaining())
            while not stream.ending:
                stream.reading = True
                try:
                    request = await anext(incoming)
                except StopAsyncIteration:
                    break
                except asyncio.CancelledError:
                    if not stream.ending or context.cancelled():
                        raise  # the client went, or the server cancels what is left
                    asyncio.current_task().uncancel()  # end_streams's doing: end as a drained stream
                    break
                finally:
                    stream.reading = False
                if type(request) is Undecodable:  # a message that could not be parsed: answered in-band
                    async with write_lock:
                        await context.write(_stream_error(request.error, request))
                    continue
                try:
                    job = plane.prepare(request, context.time_remaining())
                except Exception as exc:
                    async with write_lock:
                        await context.write(_stream_error(exc, request))
                    continue
                if job.soon:
                    await answer(job)
                else:
                    task = asyncio.ensure_future(answer(job))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks)
            if stream.ending:
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE,
                    "server is shutting down: every request read on this stream was answered; "
                    "send the next ones on a new stream, to another server",
                )
        finally:
            self._streams.discard(stream)
            for task in list(tasks):
                task.cancel()


def _stream_error(exc: Exception, request: pb.ModelInferRequest | Undecodable) -> pb.ModelStreamInferResponse:
    """A failed request on a stream: its error travels in-band and the stream goes on. The response echoes
    the request's model name and id (empty for an Undecodable) in full, as a successful one does, so that
    the client can tell which request failed."""
    code, message = status_of(exc, "ModelStreamInfer", request.id)
    echo = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
    return pb.ModelStreamInferResponse(error_message=f"{code.name}: {message}", infer_response=echo)


def _serialize(response) -> bytes:
    """Bytes already encoded go out as they are; messages are serialized."""
    return response if type(response) is bytes else response.SerializeToString()


def _deserializer(message_type) -> Callable[[bytes], object]:
    """`message_type.FromString` that never raises: bytes it cannot parse become an `Undecodable`.

    gRPC answers a deserializer's exception UNKNOWN, logs it with a traceback, and on a stream ends the
    call; the handlers answer an Undecodable INVALID_ARGUMENT instead (`rpc_errors`, ModelStreamInfer)."""
    parse = message_type.FromString
    descriptor = message_type.DESCRIPTOR

    def deserialize(data: bytes):
        try:
            return parse(data)
        except Exception as exc:  # DecodeError, or whatever else a malformed message makes the parser raise
            reason = _wire_problem(memoryview(data), descriptor, [MAX_SCANNED_FIELDS])
            if reason is None:
                reason = f"{type(exc).__name__} ({' '.join(str(exc).split())})"
            return Undecodable(descriptor.full_name, len(data), reason)

    return deserialize


MAX_SCANNED_FIELDS = 10_000  # `_wire_problem` looks no further: it runs on the event loop, in Python
_FIXED_SIZES = {1: 8, 5: 4}  # wire type -> bytes: fixed64 (double, fixed64, sfixed64), fixed32 (float, ...)


def _wire_problem(data: memoryview, descriptor, budget: list[int], depth: int = 0) -> str | None:
    """Where `data`, a `descriptor` message in protobuf's wire format, goes wrong (None: nothing found within
    the budget of fields, shared by the nested messages): upb's parser says only that it failed, and a
    client needs to know more than that. Finds a key or value cut short, a length past the end, a wire type
    these messages do not use (groups, 6, 7), field number 0, and a string that is not UTF-8, also in
    nested messages (map entries included)."""
    position, end = 0, len(data)
    while position < end:
        budget[0] -= 1
        if budget[0] < 0:
            return None
        start = position
        key, position = _varint(data, position)
        if key is None:
            return f"the field key at byte {start} is cut short"
        number, wire = key >> 3, key & 7
        field = descriptor.fields_by_number.get(number)
        where = f"field {field.name if field is not None else number} (at byte {start})"
        if number == 0:
            return f"field number 0 at byte {start}"
        if wire == 0:
            value, position = _varint(data, position)
            if value is None:
                return f"{where}: its varint is cut short"
        elif wire in _FIXED_SIZES:
            position += _FIXED_SIZES[wire]
            if position > end:
                return f"{where}: its {_FIXED_SIZES[wire]}-byte value is cut short"
        elif wire == 2:
            length, position = _varint(data, position)
            if length is None or length > end - position:
                return f"{where}: declares {length} bytes; {end - position} remain"
            value = data[position : position + length]
            position += length
            if field is None:
                continue
            if field.type == FieldDescriptor.TYPE_STRING:
                try:
                    str(value, "utf-8")
                except UnicodeDecodeError:
                    return f"{where}: a string that is not UTF-8"
            elif field.type == FieldDescriptor.TYPE_MESSAGE and depth < MAX_NESTING:
                problem = _wire_problem(value, field.message_type, budget, depth + 1)
                if problem is not None:
                    return f"{where}: {problem}"
        else:
            return f"{where}: wire type {wire}, which these messages do not use"
    return None


MAX_NESTING = 16  # far deeper than the service's messages go


def _varint(data: memoryview, position: int) -> tuple[int | None, int]:
    """The base-128 varint at `position` and the position after it; None when it is cut short or longer
    than 10 bytes."""
    value = shift = 0
    for index in range(position, min(position + 10, len(data))):
        byte = data[index]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, index + 1
        shift += 7
    return None, len(data)


def add_to_server(servicer: InferenceServicer, server: grpc.aio.Server | GenericOnly) -> None:
    """Registers every method of the service, as the generated `add_GRPCInferenceServiceServicer_to_server`
    does, but with a serializer that passes encoded answers through and a deserializer that never raises.
    The server (serving.server.app) passes a `GenericOnly`."""
    handlers = {}
    for method in SERVICE.methods:
        request = getattr(pb, method.input_type.name)
        kind = grpc.stream_stream_rpc_method_handler if method.client_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = kind(
            getattr(servicer, method.name), request_deserializer=_deserializer(request), response_serializer=_serialize
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)


class GenericOnly:
    """A grpc.aio.Server as generated `add_*Servicer_to_server` functions see it, which registers their
    handlers generically only: `add_registered_method_handlers` is dropped.

    Registered methods made grpcio 1.85's aio server cancel other clients' fresh calls (CANCELLED, before
    any handler ran) under a storm of expiring and cancelled calls that outran its event loop: 4 to 23 of
    about 5,000 background calls in 6 s, the server on one core and the clients on another
    (tests/test_isolation.py). Generic handlers alone lost none there, and cost nothing measurable
    (docs/benchmarks.md, "Registered methods"). With the server and the clients on one core both lose a
    few (docs/serving.md, "Inside the server")."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, handlers) -> None:
        pass
