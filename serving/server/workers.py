"""`xorserve serve --workers N`: N server processes on one gRPC port, and the parent that supervises them.

Each worker is the in-process server of serving.server.app, started with "spawn", sharing the port with
the others (SO_REUSEPORT: the kernel spreads connections across them), with its own sessions and
batcher. The parent picks the port, serves /metrics summed over the workers (prometheus_client's
multiprocess mode, in a temporary folder removed at exit), prints the READY line once every worker is
ready, and forwards SIGTERM/SIGINT to all of them: each drains, and the parent exits 0 when all exited 0.
A worker that fails to start stops the others (exit 2, no READY line).

A worker that dies while serving (any exit the parent did not ask for) is restarted, as gunicorn's and
uvicorn's supervisors do: the same index on the same port (SO_REUSEPORT lets it bind beside the live
ones; the parent keeps its own reservation of the port bound, so no other program takes it meanwhile),
after a back-off of RESTART_DELAY_S that doubles on each quick death of that worker up to
RESTART_DELAY_MAX_S and starts again once a worker served for STABLE_AFTER_S. The log says
`event=worker_died` then `event=worker_restarted worker=I pid=OLD->NEW exit_code=... after_s=...`, and
`event=worker_ready` once the replacement loaded its models (it counts as healthy only then; one that
cannot start, or whose models fail where the first start's loaded, is stopped and retried). /metrics
counts the restarts in `xorserve_worker_restarts_total{worker}`. Clients connected to the dead worker
see their calls in flight fail (UNAVAILABLE) and reconnect to a live one; connections already open stay
where they are, new ones are spread over all workers, the replacement included.

The parent gives up on a crash loop: more than CRASH_LOOP_DEATHS deaths within CRASH_LOOP_WINDOW_S, or
MAX_DEATHS_BEFORE_READY replacements in a row of one worker that die (or fail) before they are ready.
It then logs `event=crash_loop`, drains the others and exits 1, leaving the next step to whatever
supervises the server (systemd, Kubernetes, compose). A signal during a back-off or while a replacement
starts drains at once: no worker is started after it, and a replacement that was not ready yet is not
held against the exit code (0 when every worker that served drained cleanly).
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
from collections import deque
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, wait

from prometheus_client import CollectorRegistry, Counter, multiprocess

from serving.devices import DeviceUnavailableError
from serving.lifetime import die_with_parent
from serving.server.app import RunningServer, ServerConfig, serve, startup_s
from serving.server.metrics import HistogramView, histograms, serve_metrics

log = logging.getLogger(__name__)

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
# How long the parent waits for draining workers beyond --grace-s (a worker drains within it, but one
# may be stuck, e.g. in a native call) before it kills them.
_WORKER_EXIT_MARGIN_S = 10.0

# Crash loop: more than CRASH_LOOP_DEATHS deaths of workers (all of them together) within
# CRASH_LOOP_WINDOW_S stop the server (exit 1). A healthy server loses a worker rarely (the OOM killer, a
# crash in a native library); six deaths in a minute mean a cause that restarting does not remove (a
# request that crashes whichever worker gets it, memory exhausted, a failing device), and the supervisor
# above should see it rather than a server that keeps answering some of its clients with errors. With
# the back-off below, six quick deaths take some 3 s of delays plus six start-ups (0.5-2 s each on a small
# machine), well within the window; systemd's default start limit is of the same order (5 in 10 s).
CRASH_LOOP_DEATHS = 5
CRASH_LOOP_WINDOW_S = 60.0
# Replacements of one worker that die, fail to start or fail to load a model in a row before they are
# ready. The first start proved that the configuration works, so three such failures mean something
# changed that retrying does not fix (the model file, the device, memory); and start-ups slow enough
# (large models) would never reach the limit within the window above.
MAX_DEATHS_BEFORE_READY = 3
# Back-off before a restart: RESTART_DELAY_S, doubled on each death of the same worker that comes before
# it served STABLE_AFTER_S, up to RESTART_DELAY_MAX_S. The first restart is nearly immediate (capacity
# is missing meanwhile); repeated ones leave the machine time to recover (memory freed, a device reset).
RESTART_DELAY_S = 0.1
RESTART_DELAY_MAX_S = 5.0
STABLE_AFTER_S = CRASH_LOOP_WINDOW_S


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
    process: multiprocessing.Process  # closed once reaped
    pid: int
    report: Connection  # closed once reaped
    replacement: bool = False  # started after a worker with this index died while serving
    reported: tuple | None = None
    ready_at: float | None = None  # time.monotonic() of its readiness report (a replacement: once healthy)
    exit_code: int | None = None
    retiring: bool = False  # a replacement the parent stopped while the others serve
    kill_at: float | None = None  # when a retiring one that has not exited yet gets SIGKILL


class _Supervisor:
    """The parent of several workers: starts them, waits for their readiness, forwards signals,
    restarts the ones that die and collects exit codes. Runs on the main thread without an event loop."""

    def __init__(self, config: ServerConfig, log_level: int, metrics_dir: str) -> None:
        self.config = config
        self.log_level = log_level
        self.metrics_dir = metrics_dir
        self.port = self.metrics_port = 0
        self.workers: list[_Worker] = []  # the latest process of each index, alive or not
        self.stopping = False
        self.failed = False  # a worker died during start-up, after it was ready, or the workers crash-looped
        self.start_failed = False  # a worker could not start
        self.drained: list[_Worker] = []  # the workers that exited after the shutdown began
        self.first_failures: set[str] = set()  # the models that failed to load at the first start
        self.restarts: Counter | None = None
        self.deaths: deque[float] = deque()  # when workers died while serving, within the crash-loop window
        self.died_at: dict[int, float] = {}
        self.restart_due: dict[int, float] = {}  # index -> when its replacement starts
        self.delay: dict[int, float] = {}  # index -> the back-off before its next restart
        self.unready_deaths: dict[int, int] = {}  # index -> replacements in a row that died before ready
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
            self.port = reservation.getsockname()[1]
            stored = CollectorRegistry()
            multiprocess.MultiProcessCollector(stored, path=self.metrics_dir)
            shown = CollectorRegistry()
            shown.register(HistogramView(stored, histograms(self.config.max_batch_size)))
            # This process imported prometheus_client before PROMETHEUS_MULTIPROC_DIR was set: the
            # counter lives in its memory, not in the workers' files.
            self.restarts = Counter(
                "xorserve_worker_restarts",
                "Worker processes started again after the previous one of that index died while serving",
                ["worker"],
                registry=shown,
            )
            for index in range(self.config.workers):
                self.restarts.labels(str(index))
            http = serve_metrics(self.config.metrics_host or self.config.host, self.config.metrics_port, shown)
            self.metrics_port = http.server_port
            self._start_workers()
            if self._wait_until_reported():
                self._announce()
                # The reservation stays bound (not listening, so it gets no connections) until the end: should
                # every worker die, no other program can take the port before the replacements bind it.
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
        clean = all(w.exit_code == 0 or (w.replacement and w.ready_at is None) for w in self.drained)
        return 1 if self.failed or not clean else 0

    def _spawn(self, index: int, replacement: bool = False) -> _Worker:
        context = multiprocessing.get_context("spawn")
        receive, send = context.Pipe(duplex=False)
        config = replace(self.config, port=self.port, metrics_port=self.metrics_port, workers=1, worker=index)
        process = context.Process(
            target=_worker_main,
            args=(config, send, self.log_level, os.getpid()),
            name=f"xorserve-worker-{index}",
            daemon=True,  # multiprocessing terminates them should the parent fail unexpectedly
        )
        try:
            process.start()
        except BaseException:
            receive.close()
            raise
        finally:
            send.close()  # the parent keeps only the reading end: EOF when the worker dies
        return _Worker(index, process, process.pid, receive, replacement)

    def _start_workers(self) -> None:
        for index in range(self.config.workers):
            worker = self._spawn(index)
            self.workers.append(worker)
            log.info("event=worker_started worker=%d pid=%d", index, worker.pid)

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
        worker.process.close()
        worker.report.close()
        multiprocess.mark_process_dead(worker.pid, self.metrics_dir)
        asked = self.stopping or worker.retiring
        # A replacement that was not ready yet served nothing: however the shutdown ended it, it is clean.
        clean = worker.exit_code == 0 or (worker.replacement and worker.ready_at is None)
        level = logging.INFO if asked and clean else logging.ERROR
        event = "worker_exited" if asked else "worker_died"
        log.log(level, "event=%s worker=%d pid=%d exit_code=%s", event, worker.index, worker.pid, worker.exit_code)
        if self.stopping:
            self.drained.append(worker)

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
                    else:
                        worker.ready_at = time.monotonic()
            for worker in sentinels.values():
                if worker.exit_code is None and not worker.process.is_alive():
                    if worker.reported is None:
                        worker.reported = ("failed", "exited before it was ready")
                        self._startup_failed(worker)
                    self._reap(worker)
                    self.failed = self.failed or not self.stopping  # died before all were ready
                    self.stopping = True
        return not self.stopping

    def _startup_failed(self, worker: _Worker) -> None:
        reason = worker.reported[1]
        log.error("event=startup_failed worker=%d reason=%r", worker.index, reason)
        print(f"xorserve serve: cannot start: worker {worker.index}: {reason}", file=sys.stderr)
        self.start_failed = True
        self.stopping = True

    def _announce(self) -> None:
        host, port, metrics_port = self.config.host, self.port, self.metrics_port
        metrics_host = self.config.metrics_host or host
        self.first_failures = {model for w in self.workers for model in w.reported[2]}
        if all(w.reported[1] for w in self.workers):
            print(f"READY grpc={host}:{port} metrics={metrics_host}:{metrics_port} startup_s={startup_s()}", flush=True)
            log.info(
                "event=ready workers=%d grpc=%s:%d metrics=%s:%d",
                len(self.workers),
                host,
                port,
                metrics_host,
                metrics_port,
            )
        else:
            # As a lone server does: a model that failed to load leaves the workers up and not ready.
            failed = ",".join(sorted(self.first_failures))
            print(f"NOT_READY grpc={host}:{port} metrics={metrics_host}:{metrics_port} failed={failed}", flush=True)

    def _wait_while_serving(self) -> None:
        """Serves until a signal or a crash loop, restarting the workers that die once their back-off passed."""
        while not self.stopping:
            self._signals()  # one that came since `wait` returned: start nothing after it
            now = time.monotonic()
            for index, due in sorted(self.restart_due.items()):
                if due <= now and not self.stopping:
                    del self.restart_due[index]
                    self._restart(index)
            alive = self._alive()
            for worker in alive:
                if worker.kill_at is not None and worker.kill_at <= now:
                    log.error("event=worker_kill worker=%d pid=%d reason=drain_overran", worker.index, worker.pid)
                    self._send([worker], signal.SIGKILL)
                    worker.kill_at = None
            if self.stopping:
                break
            deadlines = [*self.restart_due.values(), *(w.kill_at for w in alive if w.kill_at is not None)]
            timeout = max(min(deadlines) - time.monotonic(), 0.0) if deadlines else None
            reports = {w.report: w for w in alive if w.reported is None}
            sentinels = {w.process.sentinel: w for w in alive}
            woken = wait([self._wake_read, *reports, *sentinels], timeout)
            # Reports before deaths (a report is read before its pipe closes), deaths before signals (a worker
            # that died on its own before the shutdown began did not fail to drain).
            for ready in woken:
                if ready in reports:
                    self._replacement_reported(reports[ready])
            for ready in woken:
                if ready in sentinels:
                    worker = sentinels[ready]
                    stopping = self.stopping
                    self._reap(worker)
                    if not stopping:
                        self._count_death(worker.index, worker.ready_at)
            if self._wake_read in woken:
                self._signals()

    def _replacement_reported(self, worker: _Worker) -> None:
        try:
            worker.reported = worker.report.recv()
        except (EOFError, OSError):  # died before reporting: its sentinel says so
            worker.reported = ("failed", "exited before it was ready")
            return
        if worker.reported[0] == "failed":  # it exits: counted as a death before it was ready
            log.error("event=restart_failed worker=%d pid=%d reason=%r", worker.index, worker.pid, worker.reported[1])
            return
        _, ready, failures = worker.reported
        if ready or set(failures) <= self.first_failures:
            worker.ready_at = time.monotonic()
            log.info(
                "event=worker_ready worker=%d pid=%d after_s=%.3f",
                worker.index,
                worker.pid,
                worker.ready_at - self.died_at.get(worker.index, worker.ready_at),
            )
            return
        # Models that loaded at the first start failed in the replacement: a worker that answers its share of
        # the connections with errors is worse than none. It drains and exits, and is counted as a death
        # before it was ready.
        log.error(
            "event=restart_failed worker=%d pid=%d reason=not_ready failed=%s",
            worker.index,
            worker.pid,
            ",".join(sorted(failures)),
        )
        worker.retiring = True
        worker.kill_at = time.monotonic() + self.config.grace_s + _WORKER_EXIT_MARGIN_S
        self._send([worker], signal.SIGTERM)

    def _count_death(self, index: int, ready_at: float | None) -> None:
        """A worker (ready since `ready_at`, None if never) ended while serving without the shutdown asking it
        to: schedules its restart, or gives up on a crash loop."""
        now = time.monotonic()
        self.deaths.append(now)
        while self.deaths[0] <= now - CRASH_LOOP_WINDOW_S:
            self.deaths.popleft()
        self.unready_deaths[index] = 0 if ready_at is not None else self.unready_deaths.get(index, 0) + 1
        if ready_at is not None and now - ready_at >= STABLE_AFTER_S:
            self.delay[index] = RESTART_DELAY_S
        delay = self.delay.get(index, RESTART_DELAY_S)
        self.delay[index] = min(2 * delay, RESTART_DELAY_MAX_S)
        if len(self.deaths) > CRASH_LOOP_DEATHS:
            log.error(
                "event=crash_loop deaths=%d window_s=%g action=stop_workers", len(self.deaths), CRASH_LOOP_WINDOW_S
            )
        elif self.unready_deaths[index] >= MAX_DEATHS_BEFORE_READY:
            log.error(
                "event=crash_loop worker=%d deaths_before_ready=%d action=stop_workers",
                index,
                self.unready_deaths[index],
            )
        else:
            self.died_at[index] = now
            self.restart_due[index] = now + delay
            return
        self.failed = True
        self.stopping = True

    def _restart(self, index: int) -> None:
        dead = self.workers[index]
        try:
            worker = self._spawn(index, replacement=True)
        except OSError as exc:  # e.g. out of processes or file descriptors: counted as a death before ready
            log.error("event=restart_failed worker=%d reason=%r", index, str(exc))
            self._count_death(index, None)
            return
        self.workers[index] = worker
        self.restarts.labels(str(index)).inc()
        log.warning(
            "event=worker_restarted worker=%d pid=%d->%d exit_code=%s after_s=%.3f",
            index,
            dead.pid,
            worker.pid,
            dead.exit_code,
            time.monotonic() - self.died_at[index],
        )

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
                    log.error("event=worker_kill worker=%d pid=%d reason=drain_overran", worker.index, worker.pid)
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
                os.kill(worker.pid, sig)


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
