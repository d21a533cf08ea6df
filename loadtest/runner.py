"""Run a headless Locust load test against an Open Inference Protocol server and judge it.

Runs loadtest/locustfile.py under Locust (one process, or a master and N local workers) for a fixed
time, then writes into --out: Locust's CSV tables (locust_stats.csv, locust_failures.csv, ...), its
HTML report (report.html), its log (locust.log) and summary.json (requests, failures and fail ratio
over all calls; rps and exact p50/p95/p99 over the successful calls only, per task and in total,
computed from the locustfile's 0.01-ms histograms, not from Locust's whole-millisecond buckets).
The request and failure counts agree with Locust's CSV and HTML tables; the rates and percentiles
differ from Locust's, which time failed calls too. Prints the summary as a table ("-" where no call
succeeded) and exits:
  0  every objective holds
  1  one is missed: p99 above --max-p99-ms, failure ratio above --max-fail-ratio, no call succeeded
  2  bad arguments or a TLS or token file that cannot be read (one line on stderr), an --out that
     cannot be made, the server refused the credentials before the run (UNAUTHENTICATED: no
     --token-file, or a token it does not accept), or Locust itself failed
  3  the server could not be reached before the run, also when this client and the server do not
     speak the same (plaintext at a TLS server, TLS at a plaintext one, a certificate one side does
     not trust: the line says which), or --start-server's server did not start
  143 stopped by SIGTERM (Locust and a --start-server server are stopped first)

A server that serves TLS needs --tls-ca (and --tls-cert with --tls-key when it requires a client
certificate); one that requires a bearer token needs --token-file. Before any load is sent, the server's
health is asked (open, no token needed) and one ModelMetadata call checks the token; Locust's users get
the same four (the locustfile's --grpc-tls-ca, --grpc-tls-cert, --grpc-tls-key, --grpc-token-file).
--start-server starts a plaintext server without tokens and ignores them.

    xorserve loadtest --url 127.0.0.1:8001 --users 32 --spawn-rate 32 --duration 30s --out out/loadtest
    xorserve loadtest --start-server --users 8 --duration 10s --max-p99-ms 20
    xorserve loadtest --url server.example:8001 --tls-ca ca.pem --token-file token --duration 10s
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import TextIO

from loadtest.timings import ResponseTimes, summarize
from serving.cli.flags import (
    CHECK_FAILED,
    OK,
    UNREACHABLE,
    USAGE,
    Parser,
    flag,
    model,
    model_repository,
    number,
    security,
    url,
)

log = logging.getLogger("xorserve.loadtest")

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
CSV_PREFIX = "locust"
# Locust start-up, workers connecting, and the final reports, beyond --duration.
OVERHEAD_S = 60.0
WORKER_CONNECT_S = 30
# The locustfile's names for --tls-ca, --tls-cert, --tls-key and --token-file (Locust's own --tls-cert and
# --tls-key are its web UI's).
LOCUST_SECURITY = ("--grpc-tls-ca", "--grpc-tls-cert", "--grpc-tls-key", "--grpc-token-file")
_DURATION = re.compile(r"^(?:(?P<h>\d+)h)?(?:(?P<m>\d+)m)?(?:(?P<s>\d+)s?)?$")


def add_arguments(parser: Parser) -> None:
    url(parser)
    model(parser, help="model to call")
    flag(parser, "--users", type=number(int, minimum=1), default=32, help="concurrent Locust users")
    flag(
        parser,
        "--spawn-rate",
        type=number(float, above=0),
        help="users started per second; default: --users, all within a second",
    )
    flag(parser, "--duration", type=duration_s, default=30, help="run time in seconds, or e.g. 30s, 2m, 1h30m")
    flag(
        parser,
        "--out",
        env="LOADTEST_OUT",
        type=out_folder,
        default=Path("out/loadtest"),
        help="result folder, created if missing",
    )
    flag(
        parser,
        "--max-p99-ms",
        type=number(float, above=0),
        help="objective: p99 latency of the successful requests at most this",
    )
    flag(
        parser,
        "--max-fail-ratio",
        type=number(float, minimum=0, maximum=1),
        default=0.0,
        help="objective: failed / all requests at most this",
    )
    flag(
        parser,
        "--locust-workers",
        type=number(int, minimum=0),
        default=0,
        help="0: one Locust process; N: a local master and N worker processes",
    )
    flag(
        parser,
        "--start-server",
        action="store_true",
        help="start `xorserve serve` (plaintext, no tokens) on free ports for the run, ignoring --url and the "
        "TLS and token flags",
    )
    model_repository(parser, default=Path("models"), help="what --start-server serves")
    flag(parser, "--small-rows", type=number(int, minimum=1), default=1, help="rows of the small infer task")
    flag(parser, "--large-rows", type=number(int, minimum=1), default=64, help="rows of the large infer task")
    flag(parser, "--deadline-ms", type=number(float, above=0), default=1000.0, help="gRPC deadline of each call")
    security(parser)


def duration_s(text: str) -> int:
    """Seconds in a Locust-style duration: 30, 30s, 2m, 1h30m; at least one second."""
    match = _DURATION.match(text.strip())
    if not text.strip() or match is None:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}; expected e.g. 30s, 2m, 1h30m")
    seconds = sum(int(match.group(unit) or 0) * scale for unit, scale in (("h", 3600), ("m", 60), ("s", 1)))
    if seconds < 1:
        raise argparse.ArgumentTypeError(f"duration {text!r} is shorter than a second")
    return seconds


def out_folder(text: str) -> Path:
    """A folder that exists or can be made: neither it nor the nearest existing path above it is a file."""
    path = Path(text)
    for existing in (path, *path.parents):
        if existing.exists():
            if not existing.is_dir():
                raise argparse.ArgumentTypeError(f"{existing} exists and is not a folder")
            break
    return path


def run(args: argparse.Namespace) -> int:
    # SIGTERM (docker stop, a CI runner's timeout) unwinds like Ctrl-C, through the cleanups that stop
    # Locust and the --start-server server; its default action would leave both running.
    if threading.current_thread() is not threading.main_thread():
        return _run(args)
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return _run(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum: int, _frame) -> None:
    # The cleanup is bounded (each child gets SIGTERM, then SIGKILL); a second SIGTERM must not cut it short.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    log.warning("event=terminated signal=SIGTERM stopping=children")
    raise SystemExit(128 + signum)


def _run(args: argparse.Namespace) -> int:
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        log.error("event=bad_out out=%s error=%s", args.out, " ".join(str(error).split()))
        return USAGE
    # A previous run's results in the same folder must never pass for this run's.
    for stale in (_times_path(args), args.out / "summary.json"):
        stale.unlink(missing_ok=True)
    if not args.start_server:
        refused = _preflight(args)
        if refused is not None:
            return refused
        return _run_and_judge(args, args.url)

    from serving.client.launch import ServerProcess, ServerStartError

    try:
        server = ServerProcess.start(args.model_repository)
    except ServerStartError as error:
        log.error("event=server_start_failed error=%s", error)
        return UNREACHABLE
    with server:  # at once: a SIGTERM from here on stops the server too
        log.info("event=server_started url=%s startup_s=%.2f", server.url, server.startup_s)
        return _run_and_judge(args, server.url)


def _preflight(args: argparse.Namespace) -> int | None:
    """Before any load: the server answers health, and takes the token; else the exit status (one line)."""
    # gRPC's own log lines (a failed TLS handshake) would add to the one line of an error.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    from serving.client import InferenceClient, InferenceError
    from serving.client.connect import Security, SecurityError
    from serving.client.health import check

    try:
        secured = Security.from_args(args)
        status, message = check(args.url, timeout_s=5.0, security=secured)
    except SecurityError as error:
        print(f"xorserve loadtest: error: {error}", file=sys.stderr)
        return USAGE
    if status is None:
        log.error("event=server_unreachable url=%s error=%s", args.url, message)
        return UNREACHABLE
    # Health is open; a model call says whether the token is taken before Locust's users find out. Any
    # other error (an unknown model, a full queue) is left for the run to count.
    try:
        with InferenceClient(args.url, args.model, timeout_s=5.0, retries=0, security=secured) as client:
            client.metadata()
    except InferenceError as error:
        if error.code.name in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
            log.error("event=server_refused_credentials url=%s error=%s", args.url, error)
            return USAGE
    return None


def _run_and_judge(args: argparse.Namespace, url: str) -> int:
    if not run_locust(args, url):
        return USAGE
    times_path = _times_path(args)
    if not times_path.exists():
        log.error("event=no_results missing=%s log=%s", times_path, args.out / "locust.log")
        return USAGE
    recorded = json.loads(times_path.read_text())
    summary = summarize(ResponseTimes.from_dict(recorded["names"]), recorded["elapsed_s"])
    violations = objectives_missed(summary["total"], args.max_p99_ms, args.max_fail_ratio)
    summary.update(
        url=url,
        model=args.model,
        users=args.users,
        spawn_rate=_spawn_rate(args),
        duration_s=args.duration,
        workers=args.locust_workers,
        elapsed_s=round(recorded["elapsed_s"], 3),
        objectives={"max_p99_ms": args.max_p99_ms, "max_fail_ratio": args.max_fail_ratio},
        violations=violations,
        passed=not violations,
    )
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(format_table(summary))
    for violation in violations:
        print(f"objective missed: {violation}")
    print(f"{'PASS' if not violations else 'FAIL'}: results in {args.out}/ (summary.json, report.html, locust_*.csv)")
    return OK if not violations else CHECK_FAILED


def objectives_missed(total: dict, max_p99_ms: float | None, max_fail_ratio: float) -> list[str]:
    """What the run's total row says about the objectives: one sentence per objective missed.

    A run in which no call succeeded misses even without a latency objective: it measured nothing.
    """
    if total["requests"] == 0:
        return ["no request completed"]
    missed = []
    if total["fail_ratio"] > max_fail_ratio:
        missed.append(
            f"failure ratio {total['fail_ratio']:.4f} ({total['failures']} of {total['requests']}) "
            f"above {max_fail_ratio:g}"
        )
    if total["requests"] == total["failures"]:
        missed.append("no request succeeded: no latency measured")
    elif max_p99_ms is not None and total["p99_ms"] > max_p99_ms:
        missed.append(f"p99 {total['p99_ms']:.2f} ms above {max_p99_ms:g} ms")
    return missed


def format_table(summary: dict) -> str:
    """The summary as text: counts of all calls, then rate and percentiles of the successful ones."""
    header = (
        f"{'name':<22} {'requests':>9} {'failures':>9} {'fail %':>7} {'ok rps':>10} "
        f"{'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9}"
    )
    rows = [*summary["tasks"].items(), ("total", summary["total"])]

    def shown(value: float | None, row: dict, places: int) -> str:
        # "-": nothing succeeded, so there is no rate or latency to show (0.0 would read as a measurement).
        return "-" if value is None or row["requests"] == row["failures"] else f"{value:.{places}f}"

    lines = [header, "-" * len(header)]
    for name, row in rows:
        if name == "total":
            lines.append("-" * len(header))
        lines.append(
            f"{name:<22} {row['requests']:>9} {row['failures']:>9} {100 * row['fail_ratio']:>7.2f} "
            f"{shown(row['rps'], row, 1):>10} {shown(row['p50_ms'], row, 2):>9} {shown(row['p95_ms'], row, 2):>9} "
            f"{shown(row['p99_ms'], row, 2):>9}"
        )
    lines.append("(ok rps and percentiles: successful requests only)")
    return "\n".join(lines)


def _times_path(args: argparse.Namespace) -> Path:
    """Where the locustfile writes its exact histograms: beside Locust's CSV files."""
    return args.out / f"{CSV_PREFIX}_response_times.json"


def _spawn_rate(args: argparse.Namespace) -> float:
    return args.spawn_rate if args.spawn_rate is not None else float(args.users)


def locust_commands(args: argparse.Namespace, url: str, master_port: int | None = None) -> list[list[str]]:
    """The Locust command lines: [single process] or [master, worker, worker, ...]."""
    common = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--host", url, "--model", args.model]
    common += ["--small-rows", str(args.small_rows), "--large-rows", str(args.large_rows)]
    common += ["--deadline-ms", str(args.deadline_ms), "--loglevel", "INFO"]
    if not args.start_server:  # the server it starts is plaintext, without tokens
        for option, value in zip(
            LOCUST_SECURITY, (args.tls_ca, args.tls_cert, args.tls_key, args.token_file), strict=True
        ):
            if value is not None:
                common += [option, str(value)]
    # Locust exits 1 on any failure; this runner decides the outcome against the objectives instead.
    lead = [*common, "--headless", "--only-summary", "--exit-code-on-error", "0"]
    lead += ["--users", str(args.users), "--spawn-rate", str(_spawn_rate(args)), "--run-time", f"{args.duration}s"]
    lead += ["--csv", str(args.out / CSV_PREFIX), "--html", str(args.out / "report.html")]
    if not args.locust_workers:
        return [lead]
    master = [*lead, "--master", "--master-bind-host", "127.0.0.1", "--master-bind-port", str(master_port)]
    master += ["--expect-workers", str(args.locust_workers), "--expect-workers-max-wait", str(WORKER_CONNECT_S)]
    worker = [*common, "--worker", "--master-host", "127.0.0.1", "--master-port", str(master_port)]
    return [master] + [worker] * args.locust_workers


def run_locust(args: argparse.Namespace, url: str) -> bool:
    """Run Locust to completion within a bounded time; False when it failed or had to be stopped.

    However this returns or raises (SIGTERM, Ctrl-C), no Locust process outlives it.
    """
    commands = locust_commands(args, url, _free_port() if args.locust_workers else None)
    log.info("event=locust_start workers=%d command=%s", args.locust_workers, shlex.join(commands[0]))
    lead_log = (args.out / "locust.log").open("w", encoding="utf-8")
    worker_logs = [(args.out / f"locust-worker-{index}.log").open("w") for index in range(1, len(commands))]
    processes: list[subprocess.Popen] = []
    try:
        lead = subprocess.Popen(commands[0], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        processes.append(lead)
        for command, file in zip(commands[1:], worker_logs, strict=True):
            processes.append(subprocess.Popen(command, stdout=file, stderr=subprocess.STDOUT))
        log.info("event=locust_started pids=%s", ",".join(str(process.pid) for process in processes))
        pump = threading.Thread(target=_tee, args=(lead.stdout, lead_log, sys.stderr), daemon=True)
        pump.start()
        finished = _wait(lead, args.duration + OVERHEAD_S)
        for worker in processes[1:]:
            # Workers leave when the master quits; they only linger if it died first.
            finished = _wait(worker, WORKER_CONNECT_S) and finished
        pump.join()
    finally:
        for process in processes:
            _stop(process)  # only those still running: after an exception, or a master that never quit
        lead_log.close()
        for file in worker_logs:
            file.close()
    log.info("event=locust_done exit_code=%s finished=%s", lead.returncode, finished)
    # With --exit-code-on-error 0, any other exit code means Locust itself went wrong.
    return finished and lead.returncode == 0


def _wait(process: subprocess.Popen, timeout_s: float) -> bool:
    """Wait for a Locust process; past the timeout, stop it and return False."""
    try:
        process.wait(timeout_s)
        return True
    except subprocess.TimeoutExpired:
        log.error("event=locust_timeout pid=%d timeout_s=%.0f", process.pid, timeout_s)
    _stop(process)
    return False


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM (Locust still writes its reports), then SIGKILL if it is still there 15 s later."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _tee(source: TextIO, *sinks: TextIO) -> None:
    for line in source:
        for sink in sinks:
            sink.write(line)
            sink.flush()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
