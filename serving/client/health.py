"""Ask a server's grpc.health.v1 Health service about itself or one service: the question of Kubernetes'
gRPC probes, of the compose healthcheck (`xorserve health`) and of scripts."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str = "", timeout_s: float = 3.0) -> tuple[str | None, str]:
    """(the serving status's name, e.g. "SERVING"; or None and the gRPC error when there is no answer)."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as error:
            return None, f"{error.code().name}: {error.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return status, status
