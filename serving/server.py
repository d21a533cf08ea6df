"""Serve a model repository over the Open Inference Protocol (KServe V2 gRPC) from ONNX Runtime.

Every `<model>/<version>/model.onnx` under --model-repository is loaded (one ONNX Runtime session per
instance), warmed up and served with dynamic batching, next to grpc.health.v1 (overall, and per model
by its name), server reflection and Prometheus metrics on --metrics-port (GET /metrics). When every
model is ready it prints one line to stdout:

    READY grpc=HOST:PORT metrics=HOST:PORT startup_s=SECONDS

(or NOT_READY ... failed=MODELS when a model failed to load; the log says why, and the server stays
up, live and not ready). SIGTERM or SIGINT: health turns NOT_SERVING, new requests are refused with
UNAVAILABLE, queued and running ones finish within --grace-s, and the process exits 0.

`--workers N` (N > 1) runs N such servers as worker processes ("spawn") on one gRPC port
(SO_REUSEPORT: the kernel spreads connections across them), each with its own sessions and batcher,
health and reflection. The parent picks the port, serves /metrics summed over the workers
(prometheus_client's multiprocess mode, in a temporary folder removed at exit), prints the READY line
once every worker is ready, and forwards SIGTERM/SIGINT to all of them: each drains as above, and the
parent exits 0 when all exited 0. A worker that fails to start stops the others (exit 1, no READY
line). A worker that dies while serving is not restarted: the parent logs it, drains the others and
exits 1, leaving restarts to whatever supervises the server (systemd, Kubernetes, compose).

In-process use (tests): `running = await start_server(ServerConfig(model_repository=...))`, then
`running.grpc_port`, `running.metrics_port`, `running.ready`, and `await running.stop(grace_s)`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from importlib import metadata
from multiprocessing.connection import Connection, wait
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, multiprocess, start_http_server

from serving._proto import grpc_service_pb2 as pb
from serving._proto import grpc_service_pb2_grpc as pb_grpc
from serving.batching import BatchPolicy
from serving.cli import env_default, number
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
    inline_max_us: int | None = None  # None: default_inline_max_us()
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
    is_worker = config.worker is not None
    metrics = Metrics(config.max_batch_size, multiprocess=is_worker)
    plane = DataPlane(
        config.model_repository,
        SessionSettings(device=config.device, tf32=config.tf32, intra_op_threads=config.intra_op_threads),
        config.instances,
        BatchPolicy(config.max_batch_size, config.max_queue_delay_us, config.max_queue_size, config.batching),
        metrics,
        _server_version(),
        config.max_message_bytes,
        default_inline_max_us() if config.inline_max_us is None else config.inline_max_us,
    )
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.max_receive_message_length", config.max_message_bytes),
            # Only workers share their port: a lone server must fail if the port is taken.
            ("grpc.so_reuseport", int(is_worker)),
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
    metrics_port = config.metrics_port if is_worker else metrics.serve(config.host, config.metrics_port)
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
        help="longest a batch waits to fill, in microseconds; 0: run queued requests as soon as the event loop "
        "has nothing else to do (a model run on the loop holds a request at most 2 ms while it is busy) or an "
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
        type=number(int, minimum=0),
        default=e("inline_max_us", None),
        help="run a model's batches on the event loop instead of instance threads up to the largest size "
        "(--max-batch-size, halved until it fits) that runs within this many microseconds, measured at load; "
        "larger batches run in threads; 0: always threads. Default: 50 where the server may use several cores "
        "(a hand-over to a thread costs 40-75 us of CPU), 500 where it has one core (env XORSERVE_INLINE_MAX_US)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=e("workers", 1),
        help="server processes sharing the gRPC port (SO_REUSEPORT), each with its own sessions and batcher; "
        "metrics are summed over them (env XORSERVE_WORKERS)",
    )


def default_inline_max_us() -> int:
    """--inline-max-us when not given. With several cores a batch handed to an instance thread runs beside
    the event loop, so only batches cheaper than the hand-over (40-75 us of CPU) run on the loop. With one
    core to run on (`taskset`, a cpuset of one CPU; a CPU quota such as `docker --cpus 1` does not show
    here) a thread runs nothing in parallel: the hand-over buys only responsiveness during a long run, so
    batches of up to 0.5 ms run on the loop (docs/benchmarks.md)."""
    affinity = getattr(os, "sched_getaffinity", None)  # Linux; elsewhere count the machine's CPUs
    cores = len(affinity(0)) if affinity is not None else (os.cpu_count() or 1)
    return 500 if cores == 1 else 50


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
        workers=args.workers,
    )


def _ready_line(running: RunningServer) -> str:
    return f"READY grpc={running.address} metrics={running.metrics_address} startup_s={_startup_s()}"


def _startup_s() -> str:
    age = _process_age_s()
    return f"{age:.3f}" if age is not None else "unknown"


async def _serve(config: ServerConfig, announce: Callable[[RunningServer], None]) -> int:
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


def _print_readiness(running: RunningServer) -> None:
    if running.ready:
        print(_ready_line(running), flush=True)
    else:
        failed = ",".join(sorted(running.plane.failures))
        print(f"NOT_READY grpc={running.address} metrics={running.metrics_address} failed={failed}", flush=True)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if config.workers < 1:
        print(f"xorserve serve: --workers must be at least 1, not {config.workers}", file=sys.stderr)
        return 2
    if config.workers > 1:
        return serve_workers(config, logging.getLogger().level)
    try:
        return asyncio.run(_serve(config, _print_readiness))
    except (DeviceUnavailableError, OSError, ValueError) as exc:
        log.error("event=startup_failed reason=%r", str(exc))
        print(f"xorserve serve: cannot start: {exc}", file=sys.stderr)
        return 1


# --- several worker processes -------------------------------------------------------------------

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
_PR_SET_PDEATHSIG = 1
# How long the parent waits for draining workers beyond --grace-s (their quiet period, gRPC's own
# grace and exit) before it kills them.
_WORKER_EXIT_MARGIN_S = 2 * MAX_LINGER_S + 10.0


def _worker_main(config: ServerConfig, report: Connection, log_level: int, parent_pid: int) -> None:
    """A worker process: the normal server, reporting readiness (or why it could not start) to the parent."""
    logging.basicConfig(
        level=log_level,
        format=f"%(asctime)s level=%(levelname)s logger=%(name)s worker={config.worker} %(message)s",
        stream=sys.stderr,
    )
    # A worker drains and exits when the parent dies, however it dies (Linux; elsewhere the parent's
    # own clean-up stops it).
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        sys.exit(1)

    def announce(running: RunningServer) -> None:
        report.send(("ready", running.ready, sorted(running.plane.failures)))

    try:
        code = asyncio.run(_serve(config, announce))
    except (DeviceUnavailableError, OSError, ValueError) as exc:
        log.error("event=startup_failed reason=%r", str(exc))
        with contextlib.suppress(OSError):
            report.send(("failed", str(exc)))
        code = 1
    sys.exit(code)


def _reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to host:port with SO_REUSEPORT (not listening), so that port 0 becomes a definite
    free port the workers can bind too, and a port taken by another program fails here."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[
        0
    ]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


@dataclass
class _Worker:
    index: int
    process: multiprocessing.Process
    report: Connection
    reported: tuple | None = None
    exit_code: int | None = None


class _Supervisor:
    """The parent of several workers: starts them, waits for their readiness, forwards signals,
    notices deaths and collects exit codes. Runs on the main thread without an event loop."""

    def __init__(self, config: ServerConfig, log_level: int, metrics_dir: str) -> None:
        self.config = config
        self.log_level = log_level
        self.metrics_dir = metrics_dir
        self.workers: list[_Worker] = []
        self.stopping = False
        self.failed = False
        self._wake_read, self._wake_write = socket.socketpair()

    def run(self) -> int:
        self._wake_read.setblocking(False)
        self._wake_write.setblocking(False)
        # The C-level handler writes the signal number to the socket; the loop below reads it, so a
        # signal wakes `wait` at once.
        previous_fd = signal.set_wakeup_fd(self._wake_write.fileno())
        previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
        reservation = http = None
        try:
            reservation = _reserve_port(self.config.host, self.config.port)
            port = reservation.getsockname()[1]
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=self.metrics_dir)
            http, _ = start_http_server(self.config.metrics_port, addr=self.config.host, registry=registry)
            metrics_port = http.server_port
            self._start_workers(port, metrics_port)
            if self._wait_until_reported():
                self._announce(port, metrics_port)
                reservation.close()  # the workers hold the port now
                self._wait_while_serving()
            self._stop_workers()
        finally:
            if reservation is not None:
                reservation.close()
            if http is not None:
                http.shutdown()
                http.server_close()
            signal.set_wakeup_fd(previous_fd)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._stop_workers(kill=True)
            self._wake_read.close()
            self._wake_write.close()
        codes = [w.exit_code for w in self.workers]
        log.info("event=workers_stopped exit_codes=%s", ",".join(map(str, codes)))
        return 1 if self.failed or any(code != 0 for code in codes) else 0

    def _start_workers(self, port: int, metrics_port: int) -> None:
        context = multiprocessing.get_context("spawn")
        for index in range(self.config.workers):
            receive, send = context.Pipe(duplex=False)
            config = replace(self.config, port=port, metrics_port=metrics_port, workers=1, worker=index)
            process = context.Process(
                target=_worker_main,
                args=(config, send, self.log_level, os.getpid()),
                name=f"xorserve-worker-{index}",
                daemon=True,  # multiprocessing terminates them should the parent fail unexpectedly
            )
            process.start()
            send.close()  # the parent keeps only the reading end: EOF when the worker dies
            self.workers.append(_Worker(index, process, receive))
            log.info("event=worker_started worker=%d pid=%d", index, process.pid)

    def _signals(self) -> None:
        """Reads the signal numbers that woke the loop; any of them starts the shutdown."""
        with contextlib.suppress(BlockingIOError):
            received = self._wake_read.recv(64)
            if received and not self.stopping:
                log.info("event=signal_received signal=%s action=drain_workers", signal.Signals(received[0]).name)
                self.stopping = True

    def _alive(self) -> list[_Worker]:
        return [w for w in self.workers if w.exit_code is None]

    def _reap(self, worker: _Worker) -> None:
        worker.process.join()
        worker.exit_code = worker.process.exitcode
        multiprocess.mark_process_dead(worker.process.pid, self.metrics_dir)
        level = logging.INFO if self.stopping and worker.exit_code == 0 else logging.ERROR
        event = "worker_exited" if self.stopping else "worker_died"
        log.log(
            level, "event=%s worker=%d pid=%d exit_code=%s", event, worker.index, worker.process.pid, worker.exit_code
        )
        if not self.stopping:
            self.failed = True
            self.stopping = True

    def _wait_until_reported(self) -> bool:
        """Waits for every worker's readiness report; False when a worker failed, died or a signal came."""
        while not self.stopping and any(w.reported is None for w in self.workers):
            pending = {w.report: w for w in self.workers if w.reported is None}
            sentinels = {w.process.sentinel: w for w in self._alive()}
            for ready in wait([self._wake_read, *pending, *sentinels]):
                if ready is self._wake_read:
                    self._signals()
                elif ready in pending:
                    worker = pending[ready]
                    try:
                        worker.reported = ready.recv()
                    except EOFError:  # died before reporting; its sentinel says so
                        worker.reported = ("failed", "exited before it was ready")
                    if worker.reported[0] == "failed":
                        self._startup_failed(worker)
            for worker in sentinels.values():
                if worker.exit_code is None and not worker.process.is_alive():
                    if worker.reported is None:
                        worker.reported = ("failed", "exited before it was ready")
                        self._startup_failed(worker)
                    self._reap(worker)
        return not self.stopping

    def _startup_failed(self, worker: _Worker) -> None:
        reason = worker.reported[1]
        log.error("event=startup_failed worker=%d reason=%r", worker.index, reason)
        print(f"xorserve serve: cannot start: worker {worker.index}: {reason}", file=sys.stderr)
        self.failed = True
        self.stopping = True

    def _announce(self, port: int, metrics_port: int) -> None:
        host = self.config.host
        failed = sorted({model for w in self.workers for model in w.reported[2]})
        if all(w.reported[1] for w in self.workers):
            print(f"READY grpc={host}:{port} metrics={host}:{metrics_port} startup_s={_startup_s()}", flush=True)
            log.info(
                "event=ready workers=%d grpc=%s:%d metrics=%s:%d", len(self.workers), host, port, host, metrics_port
            )
        else:
            # As a lone server does: a model that failed to load leaves the workers up and not ready.
            print(f"NOT_READY grpc={host}:{port} metrics={host}:{metrics_port} failed={','.join(failed)}", flush=True)

    def _wait_while_serving(self) -> None:
        while not self.stopping:
            sentinels = {w.process.sentinel: w for w in self._alive()}
            for ready in wait([self._wake_read, *sentinels]):
                if ready is self._wake_read:
                    self._signals()
                else:
                    self._reap(sentinels[ready])

    def _stop_workers(self, kill: bool = False) -> None:
        """SIGTERM to every live worker (each drains within --grace-s) and waits for them; SIGKILL with
        `kill` (clean-up after an error) or once the drain overran its time."""
        alive = self._alive()
        if not alive:
            return
        self.stopping = True
        self._send(alive, signal.SIGKILL if kill else signal.SIGTERM)
        deadline = None if kill else time.monotonic() + self.config.grace_s + _WORKER_EXIT_MARGIN_S
        while alive:
            timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            sentinels = {w.process.sentinel: w for w in alive}
            woken = wait([self._wake_read, *sentinels], timeout)
            if not woken:  # the deadline passed
                for worker in alive:
                    log.error(
                        "event=worker_kill worker=%d pid=%d reason=drain_overran", worker.index, worker.process.pid
                    )
                self._send(alive, signal.SIGKILL)
                deadline = None
            for ready in woken:
                if ready is self._wake_read:
                    with contextlib.suppress(BlockingIOError):
                        self._wake_read.recv(64)  # another signal: the drain is already under way
                else:
                    self._reap(sentinels[ready])
            alive = self._alive()

    @staticmethod
    def _send(workers: list[_Worker], sig: signal.Signals) -> None:
        for worker in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.process.pid, sig)


def serve_workers(config: ServerConfig, log_level: int) -> int:
    """`xorserve serve --workers N`: the parent process (see the module's docstring); returns the exit code."""
    metrics_dir = tempfile.mkdtemp(prefix="xorserve-metrics-")
    previous = os.environ.get(MULTIPROC_DIR_ENV)
    # Inherited by the spawned workers, which import prometheus_client afresh and so record into files.
    # This process imported it before (it only reads the files), so it is unaffected.
    os.environ[MULTIPROC_DIR_ENV] = metrics_dir
    log.info("event=workers_starting workers=%d metrics_dir=%s", config.workers, metrics_dir)
    try:
        return _Supervisor(config, log_level, metrics_dir).run()
    except OSError as exc:
        log.error("event=startup_failed reason=%r", str(exc))
        print(f"xorserve serve: cannot start: {exc}", file=sys.stderr)
        return 1
    finally:
        if previous is None:
            os.environ.pop(MULTIPROC_DIR_ENV, None)
        else:
            os.environ[MULTIPROC_DIR_ENV] = previous
        shutil.rmtree(metrics_dir, ignore_errors=True)
