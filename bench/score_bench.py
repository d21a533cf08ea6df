"""Benchmark `xorserve score`: N generated rows, Parquet -> Parquet, in-process and through a local server.

    .venv/bin/python bench/score_bench.py [--rows 10000000] [--chunk-rows 65536] [--concurrency 4]

Generates `x1,x2` (float32, uniform in [-0.5, 1.5), seed 0) into a temporary folder, then runs
`xorserve score` as a child process twice:
  1. in-process: `--model MODEL --device cpu`, on all cores;
  2. through a server: `xorserve serve --device cpu` started here and `--url`; with two or more
     cores and `taskset` present, the server is pinned to core 0 and the scorer to core 1.
For each it reports rows/s twice: the scorer's own figure from its summary line (first chunk read
to output closed and renamed, with the model loaded or the server reached: the throughput the goals
are about), and over the child's whole life (interpreter start-up and imports too: what a user
waits for); and the child's peak RSS (`os.wait4`). It then checks that the two outputs hold the same
bits and prints the goals (in-process >= 10 M rows/s, server >= 3 M rows/s, peak RSS <= 1 GiB) as met
or missed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
GOALS = {"in-process": 10e6, "server": 3e6}
RSS_GOAL_MIB = 1024


def generate(path: Path, rows: int, seed: int = 0, row_group: int = 1 << 20) -> None:
    """`rows` random points, written one row group at a time so the generator's memory stays small."""
    rng = np.random.default_rng(seed)
    schema = pa.schema([("x1", pa.float32()), ("x2", pa.float32())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, row_group):
            x = rng.uniform(-0.5, 1.5, size=(min(row_group, rows - start), 2)).astype(np.float32)
            writer.write_table(pa.table({"x1": x[:, 0], "x2": x[:, 1]}, schema=schema))


def pinned(cores: str | None, command: list[str]) -> list[str]:
    return ["taskset", "-c", cores, *command] if cores else command


def run_scorer(command: list[str]) -> dict:
    """Runs one `xorserve score`; its wall time, peak RSS and summary line. Exit 1 (rows rejected) is a
    success here."""
    started = time.perf_counter()
    child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = _drain(child)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    if code not in (0, 1):
        raise SystemExit(f"scorer exited {code}: {stderr.strip()}")
    summary = dict(item.split("=", 1) for item in stdout.split())
    return {
        "rows": int(summary["rows_scored"]),
        "wall_s": wall,
        "process_rows_per_s": int(summary["rows_scored"]) / wall,
        "rows_per_s": float(summary["rows_per_s"]),
        "peak_rss_mib": usage.ru_maxrss / 1024,  # Linux reports KiB
    }


def _drain(child: subprocess.Popen) -> tuple[str, str]:
    # Read both pipes without waiting for the exit, so that os.wait4 can collect the child's usage.
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.append(child.stderr.read()), daemon=True)
    reader.start()
    stdout = child.stdout.read()
    reader.join()
    return stdout, out[0]


class Server:
    """`xorserve serve` as a child process, ready once it prints its READY line."""

    def __init__(self, repository: Path, cores: str | None):
        command = [sys.executable, "-m", "serving.cli", "serve", "--model-repository", str(repository)]
        command += ["--port", "0", "--metrics-port", "0", "--device", "cpu", "--log-level", "WARNING"]
        self.process = subprocess.Popen(pinned(cores, command), cwd=ROOT, stdout=subprocess.PIPE, text=True)
        watchdog = threading.Timer(120, self.process.kill)  # a server that never gets ready
        watchdog.start()
        try:
            for line in self.process.stdout:
                if line.startswith("READY "):
                    self.address = dict(item.split("=", 1) for item in line.split()[1:])["grpc"]
                    return
                if line.startswith("NOT_READY"):
                    break
            raise SystemExit(f"server did not get ready: {line.strip() if line else 'it exited'}")
        finally:
            watchdog.cancel()

    def stop(self) -> float:
        """Stops the server; its peak RSS in MiB."""
        self.process.send_signal(signal.SIGTERM)
        self.process.stdout.read()
        _, _, usage = os.wait4(self.process.pid, 0)
        return usage.ru_maxrss / 1024


def same_probabilities(a: Path, b: Path) -> bool:
    left, right = pq.ParquetFile(a), pq.ParquetFile(b)
    if left.metadata.num_rows != right.metadata.num_rows:
        return False
    batches = zip(left.iter_batches(columns=["probability"]), right.iter_batches(columns=["probability"]), strict=True)
    for x, y in batches:
        if not np.array_equal(x.column(0).to_numpy().view(np.uint32), y.column(0).to_numpy().view(np.uint32)):
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--chunk-rows", type=int, default=65536)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "xor" / "1", help="folder with model.onnx")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    model = args.model / "model.onnx"
    if not model.is_file():
        raise SystemExit(f"no model at {model}: train and export it first (xorserve train)")
    pin = (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None

    with tempfile.TemporaryDirectory(prefix="score-bench-") as tmp:
        tmp = Path(tmp)
        began = time.perf_counter()
        generate(tmp / "in.parquet", args.rows)
        print(f"generated {args.rows:,} rows in {time.perf_counter() - began:.1f} s", file=sys.stderr)
        repository = tmp / "repository" / "xor" / "1"
        repository.mkdir(parents=True)
        shutil.copy(model, repository / "model.onnx")
        score = [sys.executable, "-m", "serving.cli", "score", str(tmp / "in.parquet")]
        tuning = ["--chunk-rows", str(args.chunk_rows), "--concurrency", str(args.concurrency), "--quiet"]
        tuning += ["--log-level", "WARNING"]

        results = {}
        command = [*score, str(tmp / "local.parquet"), "--model-dir", str(args.model), "--device", "cpu", *tuning]
        results["in-process"] = run_scorer(command)
        results["in-process"]["pinning"] = "none (all cores)"
        server = Server(tmp / "repository", "0" if pin else None)
        try:
            command = [*score, str(tmp / "remote.parquet"), "--url", server.address, *tuning]
            results["server"] = run_scorer(pinned("1" if pin else None, command))
        finally:
            server_rss = server.stop()
        results["server"]["server_peak_rss_mib"] = server_rss
        results["server"]["pinning"] = "server core 0, scorer core 1" if pin else "none"
        identical = same_probabilities(tmp / "local.parquet", tmp / "remote.parquet")

    print(f"\n{args.rows:,} rows, Parquet -> Parquet, --chunk-rows {args.chunk_rows} --concurrency {args.concurrency}")
    print("| path | rows/s (scoring) | rows/s (whole process) | peak RSS | pinning |")
    print("|---|---:|---:|---:|---|")
    for name, r in results.items():
        rss = f"{r['peak_rss_mib']:.0f} MiB"
        if "server_peak_rss_mib" in r:
            rss += f" (server {r['server_peak_rss_mib']:.0f} MiB)"
        rates = f"{r['rows_per_s'] / 1e6:.2f} M | {r['process_rows_per_s'] / 1e6:.2f} M ({r['wall_s']:.2f} s)"
        print(f"| {name} | {rates} | {rss} | {r['pinning']} |")
    print(f"\nprobabilities bit-identical between the two paths: {'yes' if identical else 'NO'}")
    missed = 0
    for name, goal in GOALS.items():
        r = results[name]
        for label, ok in (
            (f"{name} >= {goal / 1e6:.0f} M rows/s", r["rows_per_s"] >= goal),
            (f"{name} peak RSS <= {RSS_GOAL_MIB} MiB", r["peak_rss_mib"] <= RSS_GOAL_MIB),
        ):
            print(f"goal {label}: {'met' if ok else 'MISSED'}")
            missed += not ok
    if args.json:
        args.json.write_text(json.dumps({"rows": args.rows, "identical": identical, **results}, indent=2) + "\n")
    return 1 if missed or not identical else 0


if __name__ == "__main__":
    sys.exit(main())
