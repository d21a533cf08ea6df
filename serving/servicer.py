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
from serving.dataplane import DataPlane
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

    @rpc_errors
    async def ModelInfer(self, request, context):
        return await self._plane.infer(request, context.time_remaining())

    async def ModelStreamInfer(
        self, requests: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Runs the stream's requests concurrently (so they can share batches); answers as each finishes."""
        answers: asyncio.Queue = asyncio.Queue()  # responses, then the number of requests read (an int)
        tasks: set[asyncio.Task] = set()

        async def answer(request: pb.ModelInferRequest) -> None:
            try:
                response = await self._plane.infer(request, context.time_remaining())
                answers.put_nowait(pb.ModelStreamInferResponse(infer_response=response))
            except Exception as exc:
                code, message = status_of(exc, "ModelStreamInfer", request.id)
                echo = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
                answers.put_nowait(
                    pb.ModelStreamInferResponse(error_message=f"{code.name}: {message}", infer_response=echo)
                )

        async def read() -> None:
            count = 0
            try:
                async for request in requests:
                    task = asyncio.create_task(answer(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    count += 1
            finally:
                answers.put_nowait(count)

        reader = asyncio.create_task(read())
        sent, total = 0, None
        try:
            while total is None or sent < total:
                item = await answers.get()
                if isinstance(item, int):
                    total = item
                    continue
                yield item
                sent += 1
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()
