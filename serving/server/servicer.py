"""The inference.GRPCInferenceService handlers: each a few lines that delegate to the data plane.

Status codes come from serving.server.errors, the same way for every handler (the `rpc_errors`
decorator); on ModelStreamInfer a failed request does not end the stream: its error travels in that
response's `error_message`, as Triton does. Inference answers are bytes already in protobuf's wire
format (serving.server.codec): `add_to_server` registers the service so that gRPC sends them as they are.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from serving._proto import grpc_service_pb2 as pb
from serving._proto import grpc_service_pb2_grpc as pb_grpc
from serving.server.codec import stream_response
from serving.server.dataplane import DataPlane, Job
from serving.server.errors import rpc_errors, status_of

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, plane: DataPlane) -> None:
        self._plane = plane

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

        try:
            async for request in requests:
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
        finally:
            for task in list(tasks):
                task.cancel()


def _stream_error(exc: Exception, request: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
    """A failed request on a stream: its error travels in-band and the stream goes on."""
    code, message = status_of(exc, "ModelStreamInfer", request.id)
    echo = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
    return pb.ModelStreamInferResponse(error_message=f"{code.name}: {message}", infer_response=echo)


def _serialize(response) -> bytes:
    """Bytes already encoded go out as they are; messages are serialized."""
    return response if type(response) is bytes else response.SerializeToString()


def add_to_server(servicer: InferenceServicer, server: grpc.aio.Server) -> None:
    """Registers every method of the service, as the generated `add_GRPCInferenceServiceServicer_to_server`
    does, but with a serializer that passes encoded answers through."""
    handlers = {}
    for method in SERVICE.methods:
        request = getattr(pb, method.input_type.name)
        kind = grpc.stream_stream_rpc_method_handler if method.client_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = kind(
            getattr(servicer, method.name), request_deserializer=request.FromString, response_serializer=_serialize
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)
