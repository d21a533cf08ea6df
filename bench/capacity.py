"""Capacity inputs: what ONE pinned `xorserve serve --workers 1` process serves on one core, and at what latency.

One server from this tree (the shipped model repository `models/`, `--workers 1 --max-batch-size 16384`
as bench/serve_perf.py runs it, since perf_analyzer refuses requests above the reported max_batch_size;
1-row requests at c <= 64 never form batches above 64 rows either way) is started once, pinned to core 0
(`taskset -c 0`; pinned to one core its default --inline-max-us is 500, so batches run on the event loop).
Then, round after round, Triton's perf_analyzer, pinned to core 1, drives it through
../shared/bench/run_perf.sh: unary ModelInfer, 1-row requests at each `--concurrency`, and
`--big-rows`-row requests at `--big-concurrency`. Each point is run_perf.sh's 3 consecutive windows of
`--measure-ms` merged (200 warm-up requests first); the sweep's order reverses every round, so the
machine's drift does not always hit the same end. perf_analyzer's own CSV (kept under the output folder)
gives p50/p90/p95/p99, client side.

While each point runs, /proc is sampled every 0.5 s: the server process's CPU (utime + stime of all its
threads, in % of one core), each core's busy share and steal from /proc/stat, so that "per core" can be
checked (the server's core saturated; what else ran on it; whether perf_analyzer's core was the limit).
The medians over those 0.5 s intervals are recorded with the point.

    .venv/bin/python bench/capacity.py                                # 5 rounds, 3 s windows: ~8 minutes
    .venv/bin/python bench/capacity.py --rounds 3 --concurrency "1 4 16 64" --measure-ms 2000

It writes every point to `--csv` (default out/capacity/capacity.csv, with perf_analyzer's files in
out/capacity/pa/) and prints a markdown table of medians and min-max over rounds, and the highest
concurrency whose p99 stays under each `--slo-ms`. Needs ../shared/bench/setup.sh (perf_analyzer and
/tmp/venv-bench).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_perf import BENCH, ROOT, SERVE_FLAGS, Server, _pin, machine, start_server  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
FIELDS = (
    "round",
    "start_utc",
    "concurrency",
    "batch_rows",
    "req_per_s",
    "rows_per_s",
    "p50_us",
    "p90_us",
    "p95_us",
    "p99_us",
    "server_cpu_pct",
    "server_cpu_pct_max",
    "cpu_us_per_req",
    "core0_busy_pct",
    "core1_busy_pct",
    "steal_pct",
    "other_on_core0_pct",
    "loadavg1",
)


def start_logged(command: list[str], log: Path, timeout_s: float = 60.0) -> Server:
    """serve_perf.start_server, with the server's log (stderr) kept in `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as stderr:  # the child keeps its own descriptor
        return start_server(command, timeout_s=timeout_s, label=f"server (log: {log})", stderr=stderr)


def _process_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5)), all threads


def _cores() -> dict[str, list[int]]:
    cores = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if re.match(r"cpu\d+ ", line):
            name, *values = line.split()
            cores[name] = [int(v) for v in values]
    return cores


class Sampler(threading.Thread):
    """Every `period` s: the process's CPU in % of one core, each core's busy %, and steal % (all cores)."""

    def __init__(self, pid: int, period: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.period, self.stop_event = pid, period, threading.Event()
        self.samples: list[dict[str, float]] = []

    def run(self) -> None:
        last_t, last_p, last_c = time.monotonic(), _process_ticks(self.pid), _cores()
        while not self.stop_event.wait(self.period):
            now, proc, cores = time.monotonic(), _process_ticks(self.pid), _cores()
            sample = {"server": (proc - last_p) / TICKS / (now - last_t) * 100}
            steal = total_all = 0
            for name, values in cores.items():
                deltas = [a - b for a, b in zip(values, last_c[name], strict=False)]
                total = sum(deltas[:8]) or 1  # user nice system idle iowait irq softirq steal
                sample[name] = (total - deltas[3] - deltas[4]) / total * 100
                steal, total_all = steal + deltas[7], total_all + total
            sample["steal"] = steal / (total_all or 1) * 100
            self.samples.append(sample)
            last_t, last_p, last_c = now, proc, cores

    def medians(self) -> dict[str, float]:
        keys = self.samples[0].keys() if self.samples else ()
        found = {k: statistics.median(s[k] for s in self.samples) for k in keys}
        found["server_max"] = max((s["server"] for s in self.samples), default=float("nan"))
        return found


def point(server: Server, args, round_: int, concurrency: int, rows: int) -> dict | None:
    """One run_perf.sh point, with /proc sampled while it runs."""
    folder = args.csv.parent / "pa" / f"r{round_}-c{concurrency}-rows{rows}"
    folder.mkdir(parents=True, exist_ok=True)
    env = dict(
        os.environ,
        PEER="capacity",
        MEASURE_MS=str(args.measure_ms),
        WARMUP_REQS="200",
        CLIENT_CPUS=args.client_cpus,
        BENCH_RUN_DIR=str(folder),
        PA_EXTRA="",
    )
    command = [str(BENCH / "run_perf.sh"), str(server.port), str(concurrency), str(rows)]
    start = dt.datetime.now(dt.UTC)
    sampler = Sampler(server.process.pid)
    sampler.start()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    sampler.stop_event.set()
    sampler.join()
    found = list(folder.glob(f"pa-*-c{concurrency}-r{rows}.csv"))
    if done.returncode != 0 or not found:
        print(f"  perf_analyzer failed: {done.stdout[-300:]} {done.stderr[-500:]}", file=sys.stderr)
        return None
    row = next(csv.DictReader(found[0].open()))
    cpu = sampler.medians()
    req = float(row["Inferences/Second"]) / rows  # with `-b ROWS` perf_analyzer counts rows: ROWS per request
    server_cpu = cpu.get("server", float("nan"))
    core0, core1 = cpu.get(f"cpu{args.server_cpus}", float("nan")), cpu.get(f"cpu{args.client_cpus}", float("nan"))
    return dict(
        round=round_,
        start_utc=start.strftime("%Y-%m-%dT%H:%M:%SZ"),
        concurrency=concurrency,
        batch_rows=rows,
        req_per_s=req,
        rows_per_s=req * rows,
        p50_us=int(row["p50 latency"]),
        p90_us=int(row["p90 latency"]),
        p95_us=int(row["p95 latency"]),
        p99_us=int(row["p99 latency"]),
        server_cpu_pct=round(server_cpu, 1),
        server_cpu_pct_max=round(cpu.get("server_max", float("nan")), 1),
        cpu_us_per_req=round(server_cpu / 100 / req * 1e6, 1) if req else float("nan"),
        core0_busy_pct=round(core0, 1),
        core1_busy_pct=round(core1, 1),
        steal_pct=round(cpu.get("steal", float("nan")), 1),
        other_on_core0_pct=round(max(core0 - server_cpu, 0.0), 1),
        loadavg1=os.getloadavg()[0],
    )


def spread(values: list[float], fmt: str = "{:,.0f}") -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def table(points: list[dict], slos_ms: list[float]) -> str:
    keys = sorted({(p["batch_rows"], p["concurrency"]) for p in points})
    lines = [
        "Medians over rounds (min-max). Latencies client side, in us; CPU in % of one core, medians of 0.5 s samples.",
        "",
        "| rows | c | rounds | req/s | rows/s | p50 | p95 | p99 | server CPU % | CPU us/req | core 0 busy % "
        "| core 1 busy % |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for rows, c in keys:
        ps = [p for p in points if p["batch_rows"] == rows and p["concurrency"] == c]

        def col(key: str, ps: list[dict] = ps) -> str:
            return spread([p[key] for p in ps])

        lines.append(
            f"| {rows} | {c} | {len(ps)} | {col('req_per_s')} | {col('rows_per_s')} | {col('p50_us')} | "
            f"{col('p95_us')} | {col('p99_us')} | {col('server_cpu_pct')} | {col('cpu_us_per_req')} | "
            f"{col('core0_busy_pct')} | {col('core1_busy_pct')} |"
        )
    one_row = sorted({p["concurrency"] for p in points if p["batch_rows"] == 1})
    lines += ["", "Highest 1-row concurrency measured whose p99 stays under the SLO:", ""]
    for slo in slos_ms:
        for label, pick in (("median over rounds", statistics.median), ("every round", max)):
            ok = [
                c
                for c in one_row
                if pick([p["p99_us"] for p in points if p["batch_rows"] == 1 and p["concurrency"] == c]) < slo * 1000
            ]
            # the highest c below which every measured c also meets it
            best = None
            for c in one_row:
                if c not in ok:
                    break
                best = c
            lines.append(f"- p99 < {slo:g} ms ({label}): c = {best if best is not None else 'none measured'}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", default="1 4 8 16 32 64", help="1-row sweep")
    parser.add_argument("--big-rows", type=int, default=1024)
    parser.add_argument("--big-concurrency", default="16", help="concurrencies of the --big-rows point; '' for none")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--measure-ms", type=int, default=3000, help="perf_analyzer window (3 per point)")
    parser.add_argument("--server-cpus", default="0")
    parser.add_argument("--client-cpus", default="1")
    parser.add_argument("--max-batch-size", type=int, default=16384)
    parser.add_argument("--slo-ms", default="10 50", help="p99 objectives to bracket, in ms")
    parser.add_argument("--csv", type=Path, default=ROOT / "out" / "capacity" / "capacity.csv")
    args = parser.parse_args()
    plan = [(1, int(c)) for c in args.concurrency.split()]
    plan += [(args.big_rows, int(c)) for c in args.big_concurrency.split()]
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    command = [
        *_pin(args.server_cpus),
        str(ROOT / ".venv" / "bin" / "xorserve"),
        "serve",
        *SERVE_FLAGS,
        "--workers",
        "1",
        "--max-batch-size",
        str(args.max_batch_size),
    ]
    began, load_before = dt.datetime.now(dt.UTC), os.getloadavg()
    server = start_logged(command, args.csv.parent / "server.log")
    print(f"server pid {server.process.pid}: {' '.join(command)}", file=sys.stderr)
    points: list[dict] = []
    try:
        with args.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            writer.writeheader()
            for round_ in range(args.rounds):
                for rows, c in plan if round_ % 2 == 0 else plan[::-1]:
                    found = point(server, args, round_, c, rows)
                    if found is None:
                        continue
                    points.append(found)
                    writer.writerow(found)
                    f.flush()
                    print(
                        f"round {round_} rows={rows} c={c}: {found['req_per_s']:,.0f} req/s p99 {found['p99_us']} us "
                        f"server {found['server_cpu_pct']}% core0 {found['core0_busy_pct']}% "
                        f"core1 {found['core1_busy_pct']}% load {found['loadavg1']:.2f}",
                        file=sys.stderr,
                        flush=True,
                    )
    finally:
        code = server.stop()
    ended = dt.datetime.now(dt.UTC)
    log = (args.csv.parent / "server.log").read_text()
    serving = [line for line in log.splitlines() if "model_serving" in line]
    print(f"Run {began:%Y-%m-%d %H:%M}-{ended:%H:%M} UTC; {machine()}.")
    print(f"Load average before/after: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f}; server exit code {code}.")
    print(f"Server: `{' '.join(command)}`; perf_analyzer on core {args.client_cpus} via run_perf.sh,")
    print(f"{args.measure_ms} ms windows x 3 per point, {args.rounds} rounds.")
    print(f"Server log: {serving[-1] if serving else '-'}")
    print()
    print(table(points, [float(s) for s in args.slo_ms.split()]))
    print(f"\nRaw points: {args.csv}", file=sys.stderr)
    return 0 if points else 1


if __name__ == "__main__":
    sys.exit(main())
