"""Ask a server's grpc.health.v1 Health service whether it is SERVING: exit 0 if so, 1 otherwise.

A container healthcheck (docker-compose.yml runs it inside the server's container), a probe for
scripts, and the same question Kubernetes' gRPC probes ask:

    python -m serving.healthcheck --port 8001
    python -m serving.healthcheck --host 127.0.0.1 --port 8001 --service inference.GRPCInferenceService

Prints one line: the status, or why there is none (the gRPC error).
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.cli import env_default


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m serving.healthcheck", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=env_default("health_host", "127.0.0.1"), help="(XORSERVE_HEALTH_HOST)")
    parser.add_argument("--port", type=int, default=env_default("health_port", 8001), help="(XORSERVE_HEALTH_PORT)")
    parser.add_argument(
        "--service",
        default=env_default("health_service", ""),
        help="service name to ask about; empty: the server as a whole (XORSERVE_HEALTH_SERVICE)",
    )
    parser.add_argument(
        "--timeout", type=float, default=env_default("health_timeout", 3.0), help="seconds (XORSERVE_HEALTH_TIMEOUT)"
    )
    return parser.parse_args(argv)


def check(host: str, port: int, service: str = "", timeout_s: float = 3.0) -> tuple[bool, str]:
    """(serving?, what to print)."""
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as error:
            return False, f"{error.code().name}: {error.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return response.status == health_pb2.HealthCheckResponse.SERVING, status


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    serving, message = check(args.host, args.port, args.service, args.timeout)
    print(f"{args.host}:{args.port} {args.service or '(server)'}: {message}", flush=True)
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
