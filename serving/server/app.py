"""Serve a model repository over the Open Inference Protocol (KServe V2 gRPC) from ONNX Runtime.

Every `<model>/<version>/model.onnx` under --model-repository is loaded (one ONNX Runtime session per
instance), warmed up and served with dynamic batching, next to grpc.health.v1 (overall, and per model
by its name), server reflection and Prometheus metrics on --metrics-port (GET /metrics). When every
model is ready it prints one line to stdout:

    READY grpc=HOST:PORT metrics=HOST:PORT startup_s=SECONDS

(or NOT_READY ... failed=MODELS when a model failed to load; the log says why, and the server stays
up, live and not ready). SIGTERM or SIGINT drains (`RunningServer.stop`, docs/serving.md "Draining"):
health turns NOT_SERVING at once; after --drain-delay-s of serving as usual, the gRPC server stops
taking calls (a new one is refused UNAVAILABLE by the transport) while every call it had accepted is
answered; streams end UNAVAILABLE once they have answered what they read; the process exits 0 within
--grace-s.

`--workers N` (N > 1) runs N such servers as worker processes on one gRPC port, supervised by a parent
that restarts a worker that dies (serving.server.workers).

Models load, unload and swap while the server runs as `--model-control-mode` says (serving.server.models);
until the first load finishes, inference answers UNAVAILABLE (retry), not NOT_FOUND.

In-process use (tests): `running = await start_server(ServerConfig(model_repository=...))`, then
`running.grpc_port`, `running.metrics_port`, `running.ready`, and `await running.stop(grace_s)`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from serving._proto import grpc_service_pb2 as pb
from serving.runtime import SessionSettings
from serving.server.batching import BatchPolicy
from serving.server.dataplane import DataPlane
from serving.server.health import NOT_SERVING, SERVING, Health
from serving.server.metrics import Metrics
from serving.server.models import Models
from serving.server.security import (
    DEFAULT_OPEN,
    SecurityConfigError,
    TlsFiles,
    TokenAuth,
    TokenFile,
    open_methods,
    tls_credentials,
)
from serving.server.servicer import GenericOnly, InferenceServicer, add_to_server

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
MiB = 1024 * 1024
# The drain's steps (RunningServer.stop). For CATCH_UP_S after the signal (or --drain-delay-s if longer)
# every request is served: those sent before the signal reach the server within it (they wait in gRPC's
# queue for the event loop for microseconds to milliseconds). Then new requests are held, until none came
# for QUIET_S (at most REFUSE_MAX_S); the gRPC server stops taking calls, and the held ones are refused.
# The last EXIT_MARGIN_S of --grace-s are left for closing the sessions and the process's exit.
CATCH_UP_S = 0.2
QUIET_S = 0.05
REFUSE_MAX_S = 1.0
STOP_BEFORE_RELEASE_S = 0.05
EXIT_MARGIN_S = 0.5


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
    drain_delay_s: float = 0.0
    max_message_bytes: int = 64 * MiB
    max_request_rows: int = 1024 * 1024  # 0: no limit
    intra_op_threads: int = 1
    inline_max_us: int | None = None  # None: default_inline_max_us()
    model_control_mode: str = "none"  # none | poll | explicit (serving.server.models)
    repository_poll_s: float = 15.0
    load_models: tuple[str, ...] = ()  # loaded at start-up in explicit mode
    strict_readiness: bool = True
    # Security (serving.server.security, docs/security.md): TLS when tls_cert and tls_key are set, mutual
    # TLS with tls_client_ca; bearer tokens with auth_token_file, on every RPC but those named in auth_open.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    auth_token_file: Path | None = None
    auth_open: tuple[str, ...] = DEFAULT_OPEN
    metrics_host: str | None = None  # None: the gRPC host
    workers: int = 1  # processes `xorserve serve` runs; start_server always serves in this one
    # Set by the parent of several workers: this process is worker `worker`. It shares `port` with the
    # others (SO_REUSEPORT) and records metrics in PROMETHEUS_MULTIPROC_DIR for the parent, which
    # serves them on `metrics_port`.
    worker: int | None = None


class RunningServer:
    """A started server: its ports, readiness and a graceful `stop`."""

    def __init__(
        self,
        config: ServerConfig,
        server: grpc.aio.Server,
        plane: DataPlane,
        servicer: InferenceServicer,
        health: Health,
        metrics: Metrics,
        grpc_port: int,
        metrics_port: int,
    ) -> None:
        self.config = config
        self.host = config.host
        self.grpc_port = grpc_port
        self.metrics_port = metrics_port
        self.plane = plane
        self._servicer = servicer
        self._server = server
        self._health = health
        self._metrics = metrics
        self._stopped = False
        self.health_follower: asyncio.Task | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_address(self) -> str:
        return f"{self.config.metrics_host or self.host}:{self.metrics_port}"

    @property
    def ready(self) -> bool:
        return self.plane.ready

    async def stop(self, grace_s: float | None = None, catch_up_s: float = CATCH_UP_S) -> None:
        """Drains, and returns within grace_s (default --grace-s). `catch_up_s`: 0 for a server whose
        clients have stopped (in-process use: tests).

        1. health NOT_SERVING and ServerReady false at once; no model loads or unloads from now on;
        2. every request is served as usual for --drain-delay-s (load balancers take the server out
           meanwhile), and at least catch_up_s: every request sent before the signal is answered;
        3. new inference requests are held (DataPlane.refuse); ModelStreamInfer streams end UNAVAILABLE
           once they answered what they read; health Watch streams end;
        4. once no new request came for QUIET_S (at most REFUSE_MAX_S), the gRPC server stops taking
           calls (its transport refuses new ones, UNAVAILABLE), and the held requests are refused,
           UNAVAILABLE; the calls it had accepted are answered;
        5. a call still running EXIT_MARGIN_S before the grace ends is cancelled by gRPC (only a call
           slower than the grace), and the sessions close.
        """
        if self._stopped:
            return
        self._stopped = True
        loop = asyncio.get_running_loop()
        grace = self.config.grace_s if grace_s is None else grace_s
        deadline = loop.time() + grace
        log.info("event=drain_begin grace_s=%s drain_delay_s=%s", grace, self.config.drain_delay_s)

        def left() -> float:
            return max(deadline - EXIT_MARGIN_S - loop.time(), 0.0)

        self.plane.start_drain()
        if self.health_follower is not None:
            self.health_follower.cancel()
        await self._health.enter_graceful_shutdown()
        await asyncio.sleep(min(max(self.config.drain_delay_s, catch_up_s), left()))
        self.plane.refuse()
        self._servicer.end_streams()
        await self._health.end_watches()
        await self.plane.wait_quiet(QUIET_S, min(REFUSE_MAX_S, left()))
        stopping = asyncio.ensure_future(self._server.stop(left()))
        # The stop gets 50 ms to close gRPC's listener and connections before the held requests are
        # refused, so that a refused client that sends again at once meets a closed transport
        # (UNAVAILABLE). With one turn of the loop instead, 6 of 40 rounds of `bench/drain.py --workers 2
        # --backoff-s 0 --signal-after 0.6` lost 1-3 streamed requests sent after the signal as
        # CANCELLED; with 50 ms, 0 of 80 (2026-12-02). Why one turn was too little is not proven.
        await asyncio.sleep(STOP_BEFORE_RELEASE_S)
        self.plane.release()
        await stopping
        await self.plane.close()
        self._metrics.close()
        log.info("event=stopped after_s=%.3f", grace - (deadline - loop.time()))

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()


def _server_version() -> str:
    try:
        return metadata.version("xorserve")
    except metadata.PackageNotFoundError:
        return "0+unknown"


async def _publish_health(health: Health, plane: DataPlane) -> None:
    """grpc.health.v1: the server (and the inference service) by readiness; each model SERVING while one
    of its versions is ready."""
    overall = SERVING if plane.ready else NOT_SERVING
    await health.set("", overall)
    await health.set(SERVICE, overall)
    for model in plane.model_names():
        await health.set(model, SERVING if plane.model_ready(model) else NOT_SERVING)


async def _follow_models(health: Health, plane: DataPlane) -> None:
    """Publishes health again whenever a model version comes or goes."""
    changed = plane.models.changed
    while True:
        await changed.wait()
        changed.clear()
        await _publish_health(health, plane)


async def start_server(config: ServerConfig) -> RunningServer:
    """Starts the gRPC and metrics endpoints, loads and warms up every model, and returns.

    The server answers ServerLive (and health, NOT_SERVING) while models load. Check `.ready`:
    False when a model failed to load. Raises DeviceUnavailableError when --device cuda cannot be had.
    """
    is_worker = config.worker is not None
    metrics = Metrics(config.max_batch_size, multiprocess=is_worker)
    settings = SessionSettings(device=config.device, tf32=config.tf32, intra_op_threads=config.intra_op_threads)
    policy = BatchPolicy(config.max_batch_size, config.max_queue_delay_us, config.max_queue_size, config.batching)
    inline_max_us = default_inline_max_us() if config.inline_max_us is None else config.inline_max_us
    models = Models(
        config.model_repository,
        settings,
        config.instances,
        policy,
        metrics,
        inline_max_us / 1e6,
        mode=config.model_control_mode,
        load_models=config.load_models,
        poll_s=config.repository_poll_s,
        retire_timeout_s=config.grace_s,
    )
    plane = DataPlane(
        models,
        settings,
        policy,
        metrics,
        _server_version(),
        config.max_message_bytes,
        strict_readiness=config.strict_readiness,
        max_request_rows=config.max_request_rows,
    )
    credentials, interceptors = _security(config, metrics)
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.max_receive_message_length", config.max_message_bytes),
            # Only workers share their port: a lone server must fail if the port is taken.
            ("grpc.so_reuseport", int(is_worker)),
        ],
    )
    servicer = InferenceServicer(plane)
    generic = GenericOnly(server)  # no registered methods: see GenericOnly
    add_to_server(servicer, generic)
    health = Health()
    health_pb2_grpc.add_HealthServicer_to_server(health, generic)
    names = (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
    # reflection.enable_server_reflection, which would pick the sync servicer for `generic`.
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(reflection.aio.ReflectionServicer(names), generic)
    address = f"{config.host}:{config.port}"
    grpc_port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if grpc_port == 0:
        raise OSError(f"cannot listen on {config.host}:{config.port}")
    metrics_host = config.metrics_host or config.host
    metrics_port = config.metrics_port if is_worker else metrics.serve(metrics_host, config.metrics_port)
    metrics.start()
    await server.start()
    running = RunningServer(config, server, plane, servicer, health, metrics, grpc_port, metrics_port)
    log.info(
        "event=listening grpc=%s metrics=%s tls=%s auth=%s",
        running.address,
        running.metrics_address,
        "mutual" if config.tls_client_ca else "on" if credentials else "off",
        "token" if interceptors else "off",
    )
    try:
        await plane.load()
    except BaseException:
        await running.stop(0)
        raise
    await _publish_health(health, plane)
    running.health_follower = asyncio.ensure_future(_follow_models(health, plane))
    if plane.ready:
        log.info("event=ready models=%s providers=%s", ",".join(plane.model_names()), ",".join(plane.providers()))
    else:
        log.error("event=not_ready failed=%s", ",".join(sorted(plane.failures)))
    return running


def _security(config: ServerConfig, metrics: Metrics) -> tuple[grpc.ServerCredentials | None, list]:
    """The server's TLS credentials (None: plaintext) and interceptors (the token check, when a token file is
    set); SecurityConfigError when a setting cannot work."""
    if (config.tls_cert is None) != (config.tls_key is None):
        raise SecurityConfigError("--tls-cert and --tls-key go together: TLS needs the certificate and its key")
    if config.tls_client_ca is not None and config.tls_cert is None:
        raise SecurityConfigError("--tls-client-ca needs --tls-cert and --tls-key: mutual TLS is TLS first")
    credentials = None
    if config.tls_cert is not None:
        credentials = tls_credentials(TlsFiles(config.tls_cert, config.tls_key, config.tls_client_ca))
    interceptors = []
    if config.auth_token_file is not None:
        tokens = TokenFile(config.auth_token_file)
        interceptors.append(TokenAuth(tokens, open_methods(config.auth_open), metrics.auth_failure))
    return credentials, interceptors


def _process_age_s() -> float | None:
    """Seconds since this process started (interpreter start-up included); None where that cannot be read.

    The start comes from /proc/self/stat in clock ticks since boot, and now from the kernel's boot-time
    clock, which containers do not virtualise (their /proc/uptime may be: lxcfs)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        now = time.clock_gettime(time.CLOCK_BOOTTIME)
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    age = now - start_ticks / os.sysconf("SC_CLK_TCK")
    return age if age >= 0 else None


def default_inline_max_us() -> int:
    """--inline-max-us when not given. With several cores a batch handed to an instance thread runs beside
    the event loop, so only batches cheaper than the hand-over (40-75 us of CPU) run on the loop. With one
    core to run on (`taskset`, a cpuset of one CPU; a CPU quota such as `docker --cpus 1` does not show
    here) a thread runs nothing in parallel: the hand-over buys only responsiveness during a long run, so
    batches of up to 0.5 ms run on the loop (docs/benchmarks.md)."""
    affinity = getattr(os, "sched_getaffinity", None)  # Linux; elsewhere count the machine's CPUs
    cores = len(affinity(0)) if affinity is not None else (os.cpu_count() or 1)
    return 500 if cores == 1 else 50


def startup_s() -> str:
    """Seconds from this process's exec to now, for the READY line ("unknown" off Linux)."""
    age = _process_age_s()
    return f"{age:.3f}" if age is not None else "unknown"


def readiness_line(running: RunningServer) -> str:
    """`READY grpc=... metrics=... startup_s=...`, or `NOT_READY ... failed=MODELS` when a model failed to load."""
    if running.ready:
        return f"READY grpc={running.address} metrics={running.metrics_address} startup_s={startup_s()}"
    failed = ",".join(sorted(running.plane.failures))
    return f"NOT_READY grpc={running.address} metrics={running.metrics_address} failed={failed}"


async def serve(config: ServerConfig, announce: Callable[[RunningServer], None]) -> int:
    """Starts the server, tells `announce`, serves until SIGTERM or SIGINT, drains; the exit code."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    running = await start_server(config)
    announce(running)
    await stop.wait()
    log.info("event=signal_received action=drain")
    await running.stop(config.grace_s)
    return 0


def run_server(config: ServerConfig) -> int:
    """`xorserve serve` in this process: prints the readiness line to stdout, serves, drains; the exit code.

    Raises DeviceUnavailableError, OSError or ValueError when the server cannot start."""
    return asyncio.run(serve(config, lambda running: print(readiness_line(running), flush=True)))
