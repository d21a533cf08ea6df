"""Serve a model repository over the Open Inference Protocol (KServe V2 gRPC) from ONNX Runtime.

Every `<model>/<version>/model.onnx` under --model-repository is loaded (one ONNX Runtime session per
instance), warmed up and served with dynamic batching, next to grpc.health.v1 (overall, and per model
by its name), server reflection and Prometheus metrics on --metrics-port (GET /metrics). When every
model is ready it prints one line to stdout:

    READY grpc=HOST:PORT metrics=HOST:PORT startup_s=SECONDS

(or NOT_READY ... failed=MODELS when a model failed to load; the log says why, and the server stays
up, live and not ready). SIGTERM or SIGINT: health turns NOT_SERVING, new requests are refused with
UNAVAILABLE, queued and running ones finish within --grace-s, and the process exits 0.

In-process use (tests): `running = await start_server(ServerConfig(model_repository=...))`, then
`running.grpc_port`, `running.metrics_port`, `running.ready`, and `await running.stop(grace_s)`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from serving._proto import grpc_service_pb2 as pb
from serving._proto import grpc_service_pb2_grpc as pb_grpc
from serving.batching import BatchPolicy
from serving.cli import env_default
from serving.dataplane import DataPlane
from serving.metrics import Metrics
from serving.runtime import DEVICES, DeviceUnavailableError, SessionSettings
from serving.servicer import InferenceServicer

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
MiB = 1024 * 1024
# After draining, keep refusing requests (UNAVAILABLE) until none came for QUIET_S, for at most
# MAX_LINGER_S, before the gRPC server stops (see DataPlane.wait_quiet).
QUIET_S = 0.5
MAX_LINGER_S = 5.0


@dataclass(frozen=True)
class ServerConfig:
    """Everything `xorserve serve` can be told; the defaults are the flags' defaults."""

    model_repository: Path
    host: str = "127.0.0.1"
    port: int = 0
    metrics_port: int = 0
    device: str = "auto"
    tf32: bool = False
    max_batch_size: int = 64
    max_queue_delay_us: int = 0
    instances: int = 1
    max_queue_size: int = 1024
    batching: bool = True
    grace_s: float = 30.0
    max_message_bytes: int = 64 * MiB
    intra_op_threads: int = 1
    inline_max_us: int = 50


class RunningServer:
    """A started server: its ports, readiness and a graceful `stop`."""

    def __init__(
        self,
        config: ServerConfig,
        server: grpc.aio.Server,
        plane: DataPlane,
        health: health_aio.HealthServicer,
        metrics: Metrics,
        grpc_port: int,
        metrics_port: int,
    ) -> None:
        self.config = config
        self.host = config.host
        self.grpc_port = grpc_port
        self.metrics_port = metrics_port
        self.plane = plane
        self._server = server
        self._health = health
        self._metrics = metrics
        self._stopped = False

    @property
    def address(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_address(self) -> str:
        return f"{self.host}:{self.metrics_port}"

    @property
    def ready(self) -> bool:
        return self.plane.ready

    async def stop(self, grace_s: float | None = None, quiet_s: float = QUIET_S) -> None:
        """Drains: new requests refused (UNAVAILABLE), health NOT_SERVING, queued work finished within
        grace_s; then, once no request was refused for quiet_s, the gRPC server stops."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.config.grace_s if grace_s is None else grace_s
        deadline = time.monotonic() + grace
        log.info("event=drain_begin grace_s=%s", grace)
        drained = self.plane.drain()  # refuses new requests before health says so
        await self._health.enter_graceful_shutdown()
        try:
            async with asyncio.timeout(grace):
                await drained
        except TimeoutError:
            log.warning("event=drain_timeout grace_s=%s detail=unfinished requests are failed", grace)
        await self.plane.wait_quiet(quiet_s, min(MAX_LINGER_S, max(deadline - time.monotonic(), 0.0)))
        # gRPC's own grace lets handlers that already hold their results send them; it also ends
        # long-lived health Watch streams, hence the cap.
        await self._server.stop(min(max(deadline - time.monotonic(), 0.5), MAX_LINGER_S))
        await self.plane.close()
        self._metrics.close()
        log.info("event=stopped")

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()


def _server_version() -> str:
    try:
        return metadata.version("xorserve")
    except metadata.PackageNotFoundError:
        return "0+unknown"


async def _publish_health(health: health_aio.HealthServicer, plane: DataPlane) -> None:
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    overall = serving if plane.ready else not_serving
    await health.set("", overall)
    await health.set(SERVICE, overall)
    for model in plane.model_names():
        await health.set(model, serving if plane.model_ready(model) else not_serving)


async def start_server(config: ServerConfig) -> RunningServer:
    """Starts the gRPC and metrics endpoints, loads and warms up every model, and returns.

    The server answers ServerLive (and health, NOT_SERVING) while models load. Check `.ready`:
    False when a model failed to load. Raises DeviceUnavailableError when --device cuda cannot be had.
    """
    metrics = Metrics(config.max_batch_size)
    plane = DataPlane(
        config.model_repository,
        SessionSettings(device=config.device, tf32=config.tf32, intra_op_threads=config.intra_op_threads),
        config.instances,
        BatchPolicy(config.max_batch_size, config.max_queue_delay_us, config.max_queue_size, config.batching),
        metrics,
        _server_version(),
        config.max_message_bytes,
        config.inline_max_us,
    )
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(plane), server)
    health = health_aio.HealthServicer()
    await health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    grpc_port = server.add_insecure_port(f"{config.host}:{config.port}")
    if grpc_port == 0:
        raise OSError(f"cannot listen on {config.host}:{config.port}")
    metrics_port = metrics.serve(config.host, config.metrics_port)
    metrics.start()
    await server.start()
    running = RunningServer(config, server, plane, health, metrics, grpc_port, metrics_port)
    log.info("event=listening grpc=%s metrics=%s", running.address, running.metrics_address)
    try:
        await plane.load()
    except BaseException:
        await running.stop(0)
        raise
    await _publish_health(health, plane)
    if plane.ready:
        log.info("event=ready models=%s providers=%s", ",".join(plane.model_names()), ",".join(plane.providers()))
    else:
        log.error("event=not_ready failed=%s", ",".join(sorted(plane.failures)))
    return running


def _process_age_s() -> float | None:
    """Seconds since this process started (interpreter start-up included), from /proc; None elsewhere."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    e = env_default
    parser.add_argument(
        "--model-repository",
        type=Path,
        default=e("model_repository", None),
        required=e("model_repository", None) is None,
        help="folder of <model>/<version>/model.onnx (env XORSERVE_MODEL_REPOSITORY)",
    )
    parser.add_argument("--host", default=e("host", "127.0.0.1"), help="address to listen on (env XORSERVE_HOST)")
    parser.add_argument(
        "--port", type=int, default=e("port", 8001), help="gRPC port; 0 picks a free one (env XORSERVE_PORT)"
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=e("metrics_port", 8002),
        help="Prometheus metrics HTTP port; 0 picks a free one (env XORSERVE_METRICS_PORT)",
    )
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default=e("device", "auto"),
        help="auto: CUDA if available, else CPU with a warning; cuda: fail without CUDA (env XORSERVE_DEVICE)",
    )
    parser.add_argument(
        "--tf32", action="store_true", default=e("tf32", False), help="allow TF32 on CUDA (env XORSERVE_TF32)"
    )
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=e("max_batch_size", 64),
        help="largest batch in rows; larger requests run alone (env XORSERVE_MAX_BATCH_SIZE)",
    )
    parser.add_argument(
        "--max-queue-delay-us",
        type=int,
        default=e("max_queue_delay_us", 0),
        help="longest a batch waits to fill, in microseconds; 0: run what is queued as soon as an "
        "instance is free (env XORSERVE_MAX_QUEUE_DELAY_US)",
    )
    parser.add_argument(
        "--instances",
        type=int,
        default=e("instances", 1),
        help="ONNX Runtime sessions per model version, running batches concurrently (env XORSERVE_INSTANCES)",
    )
    parser.add_argument(
        "--max-queue-size",
        type=int,
        default=e("max_queue_size", 1024),
        help="requests a model may have waiting; beyond it requests get UNAVAILABLE (env XORSERVE_MAX_QUEUE_SIZE)",
    )
    parser.add_argument(
        "--no-batching",
        action="store_true",
        default=e("no_batching", False),
        help="run each request on its own (env XORSERVE_NO_BATCHING)",
    )
    parser.add_argument(
        "--grace-s",
        type=float,
        default=e("grace_s", 30.0),
        help="on SIGTERM/SIGINT, seconds to finish queued and running requests (env XORSERVE_GRACE_S)",
    )
    parser.add_argument(
        "--max-message-bytes",
        type=int,
        default=e("max_message_bytes", 64 * MiB),
        help="largest gRPC message received or sent; larger ones get RESOURCE_EXHAUSTED "
        "(env XORSERVE_MAX_MESSAGE_BYTES)",
    )
    parser.add_argument(
        "--inline-max-us",
        type=int,
        default=e("inline_max_us", 50),
        help="run a model's batches on the event loop instead of instance threads when its largest batch "
        "runs within this many microseconds (measured at load): a hand-over to a thread costs 40-75 us of CPU; "
        "0: always threads (env XORSERVE_INLINE_MAX_US)",
    )


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        model_repository=Path(args.model_repository),
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        device=args.device,
        tf32=args.tf32,
        max_batch_size=args.max_batch_size,
        max_queue_delay_us=args.max_queue_delay_us,
        instances=args.instances,
        max_queue_size=args.max_queue_size,
        batching=not args.no_batching,
        grace_s=args.grace_s,
        max_message_bytes=args.max_message_bytes,
        inline_max_us=args.inline_max_us,
    )


async def _serve(config: ServerConfig) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    running = await start_server(config)
    age = _process_age_s()
    startup = f"{age:.3f}" if age is not None else "unknown"
    if running.ready:
        print(f"READY grpc={running.address} metrics={running.metrics_address} startup_s={startup}", flush=True)
    else:
        failed = ",".join(sorted(running.plane.failures))
        print(f"NOT_READY grpc={running.address} metrics={running.metrics_address} failed={failed}", flush=True)
    await stop.wait()
    log.info("event=signal_received action=drain")
    await running.stop(config.grace_s)
    return 0


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    try:
        return asyncio.run(_serve(config))
    except (DeviceUnavailableError, OSError, ValueError) as exc:
        log.error("event=startup_failed reason=%r", str(exc))
        print(f"xorserve serve: cannot start: {exc}", file=sys.stderr)
        return 1
