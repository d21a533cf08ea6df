"""grpc.health.v1 for the server: Check and Watch, per service name ("" the whole server, the inference
service, each model by its name, and "liveness": SERVING while the process answers), and a drain that ends
the Watch streams.

grpc_health's own aio servicer keeps a Watch stream open until its client goes. A server that drains
waits for every call it accepted, so one watcher would hold the drain up to its grace and then be
cancelled. Here a drain sends NOT_SERVING to every watcher (`enter_graceful_shutdown`), and once the
server stops taking calls the streams end, OK (`end_watches`): the client reconnects and finds the
server gone, as Kubernetes and Envoy expect.
"""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
# The service name of liveness, as ServerLive: SERVING while the process answers, through a drain too
# (a Kubernetes gRPC liveness probe on "" would restart a pod whose model failed to load, or one draining).
LIVENESS = "liveness"


class Health(health_pb2_grpc.HealthServicer):
    def __init__(self) -> None:
        self._status: dict[str, int] = {"": NOT_SERVING, LIVENESS: SERVING}
        self._changed = asyncio.Condition()  # one for every service: a watcher compares its own status
        self._shutting_down = False
        self._ended = False

    async def Check(self, request: health_pb2.HealthCheckRequest, context) -> health_pb2.HealthCheckResponse:
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context) -> None:
        """Sends the service's status now and on every change; ends once the server stopped taking calls."""
        sent = None
        async with self._changed:
            while True:
                status = self._status.get(request.service, SERVICE_UNKNOWN)
                if status != sent:
                    await context.write(health_pb2.HealthCheckResponse(status=status))
                    sent = status
                if self._ended:
                    return
                await self._changed.wait()

    async def set(self, service: str, status: int) -> None:
        """Sets a service's status; ignored once the server drains (everything stays NOT_SERVING)."""
        if self._shutting_down or self._status.get(service) == status:
            return
        async with self._changed:
            self._status[service] = status
            self._changed.notify_all()

    async def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING, for good."""
        async with self._changed:
            self._shutting_down = True
            self._status = dict.fromkeys(self._status, NOT_SERVING) | {LIVENESS: SERVING}
            self._changed.notify_all()

    async def end_watches(self) -> None:
        """Ends every Watch stream (after its NOT_SERVING), and any opened from now on after its first answer."""
        async with self._changed:
            self._ended = True
            self._changed.notify_all()
