"""Serving benchmark: xorserve against the no-model reference server, driven by Triton's perf_analyzer.

Each server runs pinned to core 0 (`taskset -c 0`) and perf_analyzer to core 1
(../shared/bench/run_perf.sh), one server under load at a time, at concurrency 1, 16 and 64 with 1-row
and 1,024-row requests, unary and streaming (xorserve; the reference server has no streaming RPC),
batching on and off (xorserve). The head-to-head points (unary, batching on, against the reference
server) run in `--rounds` rounds with both servers up: each point is measured on one server and at
once on the other, in alternating order, so that the shared machine's drifting load hits both alike;
the goals use the median over rounds of each pair's ratio. It also measures cold start (exec to the
READY line) and resident memory after warm-up, and, when `--workers` is served, one worker against two
(unpinned). It writes a CSV, a PNG plot and regenerates the tables of docs/benchmarks.md between the
serve_perf markers.

    .venv/bin/python bench/serve_perf.py            # the full run (about 5 minutes)
    .venv/bin/python bench/serve_perf.py --quick    # 1-row unary and streaming only, short windows
    .venv/bin/python bench/serve_perf.py --only-workers --concurrency "16 64"   # --workers 1 vs 2 only

Needs ../shared/bench/setup.sh to have installed perf_analyzer and /tmp/venv-bench.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import platform
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = (ROOT / ".." / "shared" / "bench").resolve()
VENV_BENCH = Path(os.environ.get("VENV_BENCH", "/tmp/venv-bench"))
READY = re.compile(r"^READY grpc=(?P<grpc>\S+) metrics=(?P<metrics>\S+) startup_s=(?P<startup>[0-9.]+)")
BEGIN, END = "<!-- serve_perf:begin -->", "<!-- serve_perf:end -->"
FIELDS = (
    "server",
    "api",
    "batching",
    "workers",
    "pinned",
    "round",
    "concurrency",
    "batch_rows",
    "infer_per_s",
    "p50_us",
    "p90_us",
    "p99_us",
)
# perf_analyzer refuses requests larger than the max_batch_size ModelConfig reports, so xorserve runs
# with room for 16 of the 1,024-row requests per batch (1-row requests form batches of at most 64, the
# concurrency). Pinned to one core, its default --inline-max-us (500) runs all of them on the event loop.
XORSERVE_MAX_BATCH = 16384


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    """A server child process in its own session, so that stopping it reaches its workers too."""

    process: subprocess.Popen
    port: int
    exec_to_ready_s: float
    reported_startup_s: float | None = None
    lines: list[str] = field(default_factory=list)

    def rss_mb(self) -> float:
        """Resident memory of the process and its children (workers), in MB."""
        pids = [self.process.pid]
        try:
            out = subprocess.run(["pgrep", "-s", str(self.process.pid)], capture_output=True, text=True).stdout
            pids = sorted({*pids, *(int(p) for p in out.split())})
        except OSError:
            pass
        total_kb = 0
        for pid in pids:
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total_kb += int(line.split()[1])
            except OSError:
                continue
        return total_kb / 1024

    def stop(self) -> int:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(40)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode


def _pin(cpus: str | None) -> list[str]:
    return ["taskset", "-c", cpus] if cpus else []


# The repository, and free ports (the server reports them on its READY line) on the loopback only.
SERVE_FLAGS = ["--model-repository", str(ROOT / "models"), "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"]


def start_xorserve(extra: list[str], cpus: str | None = "0", timeout_s: float = 60.0) -> Server:
    command = [str(ROOT / ".venv" / "bin" / "xorserve"), "serve", *SERVE_FLAGS]
    return start_server([*_pin(cpus), *command, *extra], timeout_s=timeout_s)


def start_server(
    command: list[str],
    timeout_s: float = 60.0,
    cwd: Path = ROOT,
    env: dict | None = None,
    label: str = "xorserve",
    stderr=subprocess.DEVNULL,
) -> Server:
    """Starts a command line that serves like `xorserve serve` and waits for its READY line; `stderr`: where
    its log goes (an open file to keep it)."""
    begin = time.perf_counter()
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=True, cwd=cwd, env=env
    )
    deadline = time.monotonic() + timeout_s
    lines = []
    for line in process.stdout:
        lines.append(line)
        match = READY.match(line)
        if match:
            took = time.perf_counter() - begin
            port = int(match["grpc"].rsplit(":", 1)[1])
            # The server prints one line only: no need to keep draining stdout.
            return Server(process, port, took, float(match["startup"]), lines)
        if time.monotonic() > deadline:
            break
    process.kill()
    raise RuntimeError(f"{label} did not print READY: {''.join(lines)[-2000:]}")


def start_null(cpus: str | None = "0", timeout_s: float = 60.0, mode: str = "null") -> Server:
    """../shared/bench/v2_server.py: `null` (no model: the ceiling) or `ort` (the shipped model run once per
    request in ONNX Runtime, no batching: the naive peer)."""
    port = free_port()
    command = [*_pin(cpus), str(VENV_BENCH / "bin" / "python"), str(BENCH / "v2_server.py"), "--mode", mode]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    if mode == "ort":
        command += ["--model", str(ROOT / "models" / "xor" / "1" / "model.onnx")]
    begin = time.perf_counter()
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True
    )
    line = process.stdout.readline()  # "v2_server mode=null listening on ..." once bound and started
    took = time.perf_counter() - begin
    if "listening" not in line:
        process.kill()
        raise RuntimeError(f"null server did not start: {line!r}")
    probe = [str(VENV_BENCH / "bin" / "python"), str(BENCH / "probe.py"), "--port", str(port), "--timeout", "1"]
    give_up = time.monotonic() + timeout_s
    while subprocess.run(probe, capture_output=True).returncode != 0:
        if time.monotonic() > give_up:
            process.kill()
            raise RuntimeError("null server never became ready")
    return Server(process, port, took)


def perf(port: int, concurrency: list[int], rows: int, streaming: bool, measure_ms: int, client_cpus: str | None):
    """run_perf.sh's CSV lines as dicts (infer_per_s counts rows)."""
    env = dict(os.environ, PEER="x", MEASURE_MS=str(measure_ms), WARMUP_REQS="200")
    if client_cpus:
        env["CLIENT_CPUS"] = client_cpus
    else:
        env.pop("CLIENT_CPUS", None)
    env["PA_EXTRA"] = "--streaming" if streaming else ""
    command = [str(BENCH / "run_perf.sh"), str(port), " ".join(map(str, concurrency)), str(rows)]
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    points = []
    for line in out.stdout.splitlines():
        parts = line.split(",")
        if len(parts) != 7 or parts[3] == "ERROR":
            print(f"  perf_analyzer failed: {line} {out.stderr[-500:]}", file=sys.stderr)
            continue
        _, c, r, ips, p50, p90, p99 = parts
        points.append(
            dict(
                concurrency=int(c),
                batch_rows=int(r),
                infer_per_s=float(ips),
                p50_us=int(p50),
                p90_us=int(p90),
                p99_us=int(p99),
            )
        )
    return points


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.platform()}"


def measure_workers(args: argparse.Namespace, extra: list[str], rss: dict[str, float]) -> list[dict]:
    """xorserve --workers 1, then 2, both unpinned (as is perf_analyzer): 1-row unary requests."""
    points = []
    for n in (1, 2):
        server = start_xorserve([*extra, "--workers", str(n)], cpus=None)
        print(f"xorserve --workers {n} unary rows=1 (unpinned) ...", file=sys.stderr, flush=True)
        try:
            for point in perf(server.port, [int(c) for c in args.concurrency.split()], 1, False, args.measure_ms, None):
                points.append(dict(server="xorserve", api="unary", batching="on", workers=n, pinned=False, **point))
                print(f"  c={point['concurrency']} {point['infer_per_s']:.0f}/s", file=sys.stderr, flush=True)
            rss[f"xorserve workers={n}"] = server.rss_mb()
        finally:
            code = server.stop()
            if code != 0:
                print(f"xorserve --workers {n} exited {code}", file=sys.stderr)
    return points


def workers_markdown(points: list[dict], rss: dict[str, float], command: str, load: tuple) -> str:
    """The --only-workers result: a table for the "Worker processes" section of docs/benchmarks.md."""
    lines = [
        f"Generated by `{command}` on {dt.date.today().isoformat()}.",
        "",
        f"Machine: {machine()}. Load average before/after: {load[0][0]:.2f} / {load[1][0]:.2f}.",
        "",
        "| workers | c | infer/s | p50 | p90 | p99 |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in points:
        lines.append(
            f"| {r['workers']} | {r['concurrency']} | {r['infer_per_s']:,.0f} | {r['p50_us']:,} | {r['p90_us']:,} "
            f"| {r['p99_us']:,} |"
        )
    lines += ["", "Resident memory (VmRSS, all processes): " + ", ".join(f"{k} {v:.0f} MB" for k, v in rss.items())]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    rows_list = [1] if args.quick else [1, 1024]
    concs = [int(c) for c in args.concurrency.split()]
    results: list[dict] = []
    extra = {
        "on": ["--max-batch-size", str(XORSERVE_MAX_BATCH)],
        "off": ["--max-batch-size", str(XORSERVE_MAX_BATCH), "--no-batching"],
    }
    load_before = os.getloadavg()

    def measure(server: Server, name: str, batching: str, api: str, rows: int, concurrency: list[int], round_=0):
        print(f"{name} batching={batching} {api} rows={rows} round={round_} ...", file=sys.stderr, flush=True)
        for point in perf(server.port, concurrency, rows, api == "streaming", args.measure_ms, args.client_cpus):
            results.append(dict(server=name, api=api, batching=batching, workers=1, pinned=True, round=round_, **point))
            print(f"  c={point['concurrency']} {point['infer_per_s']:.0f}/s p50={point['p50_us']}us", file=sys.stderr)

    rss: dict[str, float] = {}
    null = start_null(args.server_cpus)
    try:
        server = start_xorserve(extra["on"], args.server_cpus)
        try:
            pair = [(null, "null", "-"), (server, "xorserve", "on")]
            for round_ in range(args.rounds):
                for rows in rows_list:
                    for c in concs:
                        for peer, name, batching in pair if round_ % 2 == 0 else pair[::-1]:
                            measure(peer, name, batching, "unary", rows, [c], round_)
            rss["null"] = null.rss_mb()
            for rows in rows_list:
                measure(server, "xorserve", "on", "streaming", rows, concs)
            rss["xorserve batching=on"] = server.rss_mb()
        finally:
            code = server.stop()
            if code != 0:
                print(f"xorserve exited {code}", file=sys.stderr)
    finally:
        null.stop()
    if not args.quick:
        server = start_xorserve(extra["off"], args.server_cpus)
        try:
            for api in ("unary", "streaming"):
                for rows in rows_list:
                    measure(server, "xorserve", "off", api, rows, concs)
            rss["xorserve batching=off"] = server.rss_mb()
        finally:
            code = server.stop()
            if code != 0:
                print(f"xorserve --no-batching exited {code}", file=sys.stderr)

    if args.workers:
        results += measure_workers(args, extra["on"], rss)

    starts = []
    for _ in range(args.cold_starts):
        server = start_xorserve(extra["on"], args.server_cpus)
        starts.append((server.exec_to_ready_s, server.reported_startup_s))
        server.stop()
    return dict(results=results, rss=rss, starts=starts, load=(load_before, os.getloadavg()))


def matching(results, **match) -> list[dict]:
    return [r for r in results if all(r[k] == v for k, v in match.items())]


def median_point(results, **match) -> dict | None:
    """The median over rounds of each measured figure of the points matching `match`."""
    found = matching(results, **match)
    if not found:
        return None
    point = dict(found[0])
    for key in ("infer_per_s", "p50_us", "p90_us", "p99_us"):
        point[key] = statistics.median(r[key] for r in found)
    point["rounds"] = len(found)
    return point


def paired_ratio(results, key: str, **match) -> tuple[tuple[float, float, float], dict, dict] | None:
    """xorserve / null for the unary points matching `match`, measured back to back in each round: the
    (median, lowest, highest) over rounds, with the median points of both."""
    xs = {r["round"]: r for r in matching(results, server="xorserve", api="unary", batching="on", **match)}
    ns = {r["round"]: r for r in matching(results, server="null", **match)}
    rounds = sorted(set(xs) & set(ns))
    if not rounds:
        return None
    ratios = [xs[i][key] / ns[i][key] for i in rounds]
    both = dict(api="unary", pinned=True, **match)
    return (
        (statistics.median(ratios), min(ratios), max(ratios)),
        median_point(results, server="xorserve", batching="on", **both),
        median_point(results, server="null", **both),
    )


def goals(data: dict) -> list[tuple[str, str, str, str]]:
    res = [r for r in data["results"] if r["pinned"]]
    rows = []

    def verdict(target: str, value: float, higher: bool) -> str:
        if target == "report":
            return "-"
        limit = float(target.split()[1].rstrip("x"))
        return "met" if (value >= limit if higher else value <= limit) else "MISSED"

    def row(goal, target, found, key="infer_per_s", higher=True, what=""):
        if found is None:
            rows.append((goal, target, "not measured", "-"))
            return
        value, xs, ns = found
        spread = ""
        if isinstance(value, tuple):  # paired rounds: (median, lowest, highest) ratio
            value, low, high = value
            spread = f"; rounds {low:.2f}-{high:.2f}x"
        shown = f"{value:.2f}x (medians {xs[key]:,.0f} vs {ns[key]:,.0f}{what}{spread})"
        rows.append((goal, target, shown, verdict(target, value, higher)))

    for c in (16, 64):
        row(
            f"(a) 1-row unary, c={c}, inferences/s vs null",
            ">= 0.95x",
            paired_ratio(res, "infer_per_s", concurrency=c, batch_rows=1),
        )
    row(
        "(a) 1-row unary, c=1, p50 latency vs null",
        "<= 1.1x",
        paired_ratio(res, "p50_us", concurrency=1, batch_rows=1),
        key="p50_us",
        higher=False,
        what=" us",
    )
    for c in (1, 16, 64):
        row(
            f"(b) 1,024-row unary, c={c}, rows/s vs null",
            ">= 0.95x",
            paired_ratio(res, "infer_per_s", concurrency=c, batch_rows=1024),
        )
    streaming = median_point(res, server="xorserve", api="streaming", batching="on", concurrency=16, batch_rows=1)
    unary = median_point(res, server="null", concurrency=16, batch_rows=1)
    row(
        "(c) 1-row streaming, c=16, vs null unary",
        ">= 1.5x",
        None
        if streaming is None or unary is None
        else (streaming["infer_per_s"] / unary["infer_per_s"], streaming, unary),
    )
    unpinned = [r for r in data["results"] if not r["pinned"]]
    for c in (16, 64):
        two, one = median_point(unpinned, workers=2, concurrency=c), median_point(unpinned, workers=1, concurrency=c)
        row(
            f"(d) --workers 2 vs 1, unpinned, 1-row unary, c={c}",
            "report",
            None if two is None or one is None else (two["infer_per_s"] / one["infer_per_s"], two, one),
        )
    starts = data["starts"]
    if starts:
        med = statistics.median(s[0] for s in starts)
        rows.append(
            ("(e) cold start, exec to READY (median)", "<= 0.5 s", f"{med:.3f} s", "met" if med <= 0.5 else "MISSED")
        )
    for name, mb in data["rss"].items():
        if name.startswith("xorserve batching=on"):
            rows.append(("(e) RSS after warm-up", "<= 150 MB", f"{mb:.0f} MB", "met" if mb <= 150 else "MISSED"))
    return rows


def markdown(data: dict, command: str, csv_path: Path, png_path: Path | None) -> str:
    lines = [
        BEGIN,
        "",
        f"Generated by `{command}` on {data['date']}.",
        "",
        f"Machine: {data['machine']}. Load average before/after: "
        f"{data['load'][0][0]:.2f} / {data['load'][1][0]:.2f} (a shared machine: compare ratios within the run).",
        f"Servers pinned to core {data['server_cpus']}, perf_analyzer to core {data['client_cpus']}; "
        f"{data['measure_ms']} ms windows, 3 per point. xorserve runs `--max-batch-size {XORSERVE_MAX_BATCH}` "
        "(perf_analyzer refuses requests larger than the reported maximum). "
        f"Unary xorserve (batching on) and null points: {data['rounds']} rounds, each point measured on both "
        "servers back to back; goals are medians of the per-round ratios, tables show medians over rounds. "
        f"Raw points: `{_shown(csv_path)}`.",
        "",
        "### Goals",
        "",
        "| goal | target | measured | |",
        "|---|---|---|---|",
    ]
    lines += [f"| {g} | {t} | {m} | {ok} |" for g, t, m, ok in goals(data)]
    lines += [
        "",
        "### Throughput and latency",
        "",
        "`infer/s` counts rows (1,024 per request in the 1,024-row rows); latencies in microseconds, client side.",
        "",
        "| server | api | batching | rows | c | rounds | infer/s | p50 | p90 | p99 |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summary(data["results"]):
        lines.append(
            f"| {r['server']} | {r['api']} | {r['batching']} | {r['batch_rows']} | {r['concurrency']} | "
            f"{r['rounds']} | {r['infer_per_s']:,.0f} | {r['p50_us']:,.0f} | {r['p90_us']:,.0f} | {r['p99_us']:,.0f} |"
        )
    worker_points = [r for r in data["results"] if not r["pinned"]]
    if worker_points:
        lines += [
            "",
            "### Worker processes (unpinned, both cores shared with perf_analyzer)",
            "",
            "| workers | c | infer/s | p50 | p99 |",
            "|---:|---:|---:|---:|---:|",
        ]
        for r in worker_points:
            lines.append(
                f"| {r['workers']} | {r['concurrency']} | {r['infer_per_s']:,.0f} | {r['p50_us']:,} | {r['p99_us']:,} |"
            )
    lines += ["", "### Cold start and memory", ""]
    if data["starts"]:
        lines.append(
            "Exec to READY (wall clock measured by the benchmark; `startup_s` the server reports): "
            + ", ".join(f"{a:.3f} s ({b:.3f} s)" for a, b in data["starts"])
            + "."
        )
    lines.append("")
    lines.append(
        "Resident memory after the measurements (VmRSS, all processes of the server): "
        + ", ".join(f"{name} {mb:.0f} MB" for name, mb in data["rss"].items())
        + "."
    )
    if png_path is not None:
        lines += ["", f"![inferences/s and p99 against concurrency]({os.path.relpath(png_path, ROOT / 'docs')})"]
    lines += ["", END]
    return "\n".join(lines)


def summary(results: list[dict]) -> list[dict]:
    """One median point per (server, api, batching, rows, concurrency) of the pinned results, in run order."""
    keys = dict.fromkeys(
        (r["server"], r["api"], r["batching"], r["batch_rows"], r["concurrency"]) for r in results if r["pinned"]
    )
    names = ("server", "api", "batching", "batch_rows", "concurrency")
    return [median_point(results, pinned=True, **dict(zip(names, key, strict=True))) for key in keys]


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    series: dict[tuple, list] = {}
    for r in summary(data["results"]):
        key = (
            r["batch_rows"],
            f"{r['server']} {r['api']}" + (f" batching {r['batching']}" if r["server"] != "null" else ""),
        )
        series.setdefault(key, []).append(r)
    for (rows, label), points in series.items():
        col = 0 if rows == 1 else 1
        points = sorted(points, key=lambda p: p["concurrency"])
        xs = [p["concurrency"] for p in points]
        axes[0][col].plot(xs, [p["infer_per_s"] for p in points], marker="o", label=label)
        axes[1][col].plot(xs, [p["p99_us"] / 1000 for p in points], marker="o", label=label)
    for col, rows in enumerate((1, 1024)):
        axes[0][col].set_title(f"{rows}-row requests")
        axes[0][col].set_ylabel("inferences/s (rows)")
        axes[1][col].set_ylabel("p99 latency (ms)")
        for row in (0, 1):
            axes[row][col].set_xscale("log", base=2)
            axes[row][col].set_xlabel("concurrency")
            axes[row][col].grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"xorserve vs the no-model reference server, {data['date']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1-row requests, batching on only, no cold starts")
    parser.add_argument("--concurrency", default="1 16 64")
    parser.add_argument("--measure-ms", type=int, default=1000, help="perf_analyzer window (3 per point)")
    parser.add_argument("--cold-starts", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the paired xorserve/null unary points")
    parser.add_argument("--no-workers", dest="workers", action="store_false", help="skip --workers 1 vs 2")
    parser.add_argument(
        "--only-workers",
        action="store_true",
        help="measure only --workers 1 vs 2; writes --workers-csv and prints a table; --csv, --plot, --doc untouched",
    )
    parser.add_argument("--workers-csv", type=Path, default=ROOT / "docs" / "bench" / "serve_perf_workers.csv")
    parser.add_argument("--server-cpus", default="0")
    parser.add_argument("--client-cpus", default="1")
    parser.add_argument("--csv", type=Path, default=ROOT / "docs" / "bench" / "serve_perf.csv")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "bench" / "serve_perf.png")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--no-doc", action="store_true", help="print the tables instead of editing --doc")
    args = parser.parse_args()
    if args.quick:
        args.cold_starts = min(args.cold_starts, 1)
        args.workers = False
        args.rounds = 1
    command = (
        "make bench" if os.environ.get("MAKELEVEL") else shlex.join(["python", "bench/serve_perf.py", *sys.argv[1:]])
    )
    begin = time.monotonic()
    if args.only_workers:
        rss: dict[str, float] = {}
        load_before = os.getloadavg()
        points = measure_workers(args, ["--max-batch-size", str(XORSERVE_MAX_BATCH)], rss)
        args.workers_csv.parent.mkdir(parents=True, exist_ok=True)
        with args.workers_csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(points)
        print(workers_markdown(points, rss, command, (load_before, os.getloadavg())))
        print(f"took {time.monotonic() - begin:.0f} s; wrote {args.workers_csv}", file=sys.stderr)
        return 0
    data = run(args)
    data.update(
        date=dt.date.today().isoformat(),
        machine=machine(),
        server_cpus=args.server_cpus,
        client_cpus=args.client_cpus,
        measure_ms=args.measure_ms,
        rounds=args.rounds,
    )
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with args.csv.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(data["results"])
    plot(data, args.plot)
    text = markdown(data, command, args.csv, args.plot)
    if args.no_doc:
        print(text)
    else:
        doc = args.doc.read_text()
        if BEGIN in doc and END in doc:
            doc = doc[: doc.index(BEGIN)] + text + doc[doc.index(END) + len(END) :]
        else:
            doc = doc.rstrip("\n") + "\n\n## Serving benchmark (bench/serve_perf.py)\n\n" + text + "\n"
        args.doc.write_text(doc)
    print(text)
    wrote = [args.csv, args.plot] + ([] if args.no_doc else [args.doc])
    print(f"took {time.monotonic() - begin:.0f} s; wrote {', '.join(map(str, wrote))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
