"""Ask a server's grpc.health.v1 Health service about itself or one service: the question of Kubernetes'
gRPC probes, of the compose healthcheck (`xorserve health`) and of scripts.

The server answers health without a token (it is one of the open RPCs); `security` still says how to
reach it (TLS, mutual TLS) and sends its token, if it has one, for a server that does not leave health
open."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.client.connect import PLAINTEXT, Security, explain_unavailable


def check(
    address: str, service: str = "", timeout_s: float = 3.0, security: Security = PLAINTEXT
) -> tuple[str | None, str]:
    """(the serving status's name, e.g. "SERVING"; or None and why there is no answer: the gRPC error as
    "CODE: details", or, for a TLS mismatch, explain_unavailable's line, which names `address`).

    Raises serving.client.connect.SecurityError when a file of `security` cannot be read."""
    metadata = security.metadata() or None
    with security.channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s, metadata=metadata)
        except grpc.RpcError as error:
            details = error.details() or ""
            if error.code() == grpc.StatusCode.UNAVAILABLE:
                explained = explain_unavailable(address, security, details)
                if explained != " ".join(details.split()):
                    return None, explained
            return None, f"{error.code().name}: {details}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return status, status
