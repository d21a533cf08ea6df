"""`xorserve serve --workers N`: N server processes on one gRPC port, and the parent that supervises them.

Each worker is the in-process server of serving.server.app, started with "spawn", sharing the port with
the others (SO_REUSEPORT: the kernel spreads connections across them), with its own sessions and
batcher. The parent picks the port, serves /metrics summed over the workers (prometheus_client's
multiprocess mode, in a temporary folder removed at exit), prints the READY line once every worker is
ready, and forwards SIGTERM/SIGINT to all of them: each drains, and the parent exits 0 when all exited 0.
A worker that fails to start stops the others (exit 2, no READY line). A worker that dies while serving
is not restarted: the parent logs it, drains the others and exits 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, wait

from prometheus_client import CollectorRegistry, multiprocess, start_http_server

from serving.devices import DeviceUnavailableError
from serving.lifetime import die_with_parent
from serving.server.app import MAX_LINGER_S, RunningServer, ServerConfig, serve, startup_s
from serving.server.metrics import HistogramView, histograms

log = logging.getLogger(__name__)

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
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
    die_with_parent(signal.SIGTERM)  # drains and exits when the parent dies, however it dies
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        sys.exit(1)

    def announce(running: RunningServer) -> None:
        report.send(("ready", running.ready, sorted(running.plane.failures)))

    try:
        code = asyncio.run(serve(config, announce))
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
        self.failed = False  # a worker died while serving
        self.start_failed = False  # a worker could not start
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
            stored = CollectorRegistry()
            multiprocess.MultiProcessCollector(stored, path=self.metrics_dir)
            shown = CollectorRegistry()
            shown.register(HistogramView(stored, histograms(self.config.max_batch_size)))
            http, _ = start_http_server(self.config.metrics_port, addr=self.config.host, registry=shown)
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
        if self.start_failed:
            return 2  # cannot start: as a lone server's start-up failure
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
        self.start_failed = True
        self.stopping = True

    def _announce(self, port: int, metrics_port: int) -> None:
        host = self.config.host
        failed = sorted({model for w in self.workers for model in w.reported[2]})
        if all(w.reported[1] for w in self.workers):
            print(f"READY grpc={host}:{port} metrics={host}:{metrics_port} startup_s={startup_s()}", flush=True)
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
    log.info("event=workers_starting workers=%d metrics_dir=%s", config.workers, shlex.quote(metrics_dir))
    try:
        return _Supervisor(config, log_level, metrics_dir).run()
    except OSError as exc:
        log.error("event=startup_failed reason=%r", str(exc))
        print(f"xorserve serve: cannot start: {exc}", file=sys.stderr)
        return 2
    finally:
        if previous is None:
            os.environ.pop(MULTIPROC_DIR_ENV, None)
        else:
            os.environ[MULTIPROC_DIR_ENV] = previous
        shutil.rmtree(metrics_dir, ignore_errors=True)
