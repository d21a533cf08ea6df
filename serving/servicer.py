"""The inference.GRPCInferenceService handlers: each a few lines that delegate to the data plane.

Status codes come from serving.errors (the `rpc_errors` decorator); on ModelStreamInfer a failed
request does not end the stream: its error travels in that response's `error_message`, as Triton does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from serving._proto import grpc_service_pb2 as pb
from serving._proto import grpc_service_pb2_grpc as pb_grpc
from serving.dataplane import DataPlane, Prompt
from serving.errors import rpc_errors, status_of


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

    async def ModelInfer(self, request, context):
        # Not @rpc_errors: the same mapping inline, without a second coroutine per request.
        try:
            result = self._plane.start_infer(request, context.time_remaining())
            if type(result) is not pb.ModelInferResponse:
                result = await result
            return result
        except Exception as exc:
            code, message = status_of(exc, "ModelInfer", request.id)
        await context.abort(code, message)

    async def ModelStreamInfer(
        self, requests: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> None:
        """Answers each request of the stream as it finishes, in-band errors included.

        A request that runs at once or is held briefly for coalescing (inline execution: see
        serving.batching) is answered before the next is read, without a task; one that must wait for
        a queue delay or an instance thread gets a task, so the stream's requests can share batches.
        Writes are serialised: gRPC allows one message in flight per call.
        """
        plane = self._plane
        write_lock = asyncio.Lock()
        tasks: set[asyncio.Task] = set()

        async def send(response: pb.ModelStreamInferResponse) -> None:
            async with write_lock:
                await context.write(response)

        async def answer_later(request: pb.ModelInferRequest, pending) -> None:
            try:
                response = pb.ModelStreamInferResponse(infer_response=await pending)
            except Exception as exc:
                response = _stream_error(exc, request)
            await send(response)

        try:
            async for request in requests:
                try:
                    result = plane.start_infer(request, context.time_remaining())
                except Exception as exc:
                    await send(_stream_error(exc, request))
                    continue
                if type(result) is pb.ModelInferResponse:
                    await send(pb.ModelStreamInferResponse(infer_response=result))
                elif type(result) is Prompt:
                    try:
                        response = pb.ModelStreamInferResponse(infer_response=await result)
                    except Exception as exc:
                        response = _stream_error(exc, request)
                    await send(response)
                else:
                    task = asyncio.ensure_future(answer_later(request, result))
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
