"""Benchmark `xorserve score --engine ray` against `--engine local` on a folder of Parquet files.

    .venv/bin/python bench/ray_score.py [--rows 2000000] [--files 8] [--actors "1 2 4"] [--rounds 2] \
        [--rejected 0.5]

Generates `x1,x2` (float32, uniform in [-0.5, 1.5), seed 0) into `--files` Parquet files of row groups of
128 Ki rows in a temporary folder, starts one local Ray cluster (`ray start --head --num-cpus` = this
machine's cores), then, in each of `--rounds` rounds, runs `xorserve score` as a child process once with
`--engine local` and once with `--engine ray --ray-address` for each number of actors in `--actors`
(`--concurrency`). It reports rows/s twice, as bench/score_bench.py does: the scorer's own figure (from
its summary line: the data work, once the model is loaded and Ray reached) and over the child's whole
life; the median over rounds and the range. Each Ray run's output folder is compared with the local
engine's output, row for row and bit for bit, and its errors file with the local engine's, byte for
byte. `--rejected F` makes x1 NaN in a fraction F of the rows (chosen at random, seed 0), which both
engines reject: the errors file then holds F x rows lines, and the peak RSS column (the driver's,
`ru_maxrss`; Ray's workers are other processes) shows what gathering them costs. Joining a running
cluster leaves out Ray's start-up (`--engine ray` without `--ray-address` starts a local one: a few
more seconds, measured once, as `start-up`).
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from score_bench import run_scorer  # noqa: E402
from serve_perf import free_port  # noqa: E402

from serving.cli.score import default_errors_path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def generate(folder: Path, rows: int, files: int, rejected: float = 0.0, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    schema = pa.schema([("x1", pa.float32()), ("x2", pa.float32())])
    per_file = -(-rows // files)
    for k in range(files):
        n = min(per_file, rows - k * per_file)
        x = rng.uniform(-0.5, 1.5, size=(n, 2)).astype(np.float32)
        if rejected:  # (the rows of --rejected 0 are those of the runs before the option)
            x[rng.random(n) < rejected, 0] = np.nan
        pq.write_table(
            pa.table({"x1": x[:, 0], "x2": x[:, 1]}, schema=schema),
            folder / f"part-{k:03d}.parquet",
            row_group_size=128 * 1024,
        )


def same_rows(local: Path, ray_folder: Path) -> bool:
    expected = pq.read_table(local)
    got = pa.concat_tables([pq.read_table(p) for p in sorted(ray_folder.glob("*.parquet"))])
    errors = (default_errors_path(local), default_errors_path(ray_folder))
    same_errors = [p.read_bytes() if p.exists() else None for p in errors]
    return got.equals(expected) and same_errors[0] == same_errors[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--actors", default="1 2 4", help="--concurrency values of the Ray runs")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=65536)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "xor" / "1")
    parser.add_argument("--rejected", type=float, default=0.0, help="fraction of rows with x1 NaN")
    args = parser.parse_args(argv)
    actors = [int(a) for a in args.actors.split()]
    cores = os.cpu_count() or 1
    ray = str(Path(sys.executable).with_name("ray"))
    # The cluster starts with token authentication (Ray's default); its drivers share the token.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env = dict(os.environ)
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="ray-score-bench-") as tmp:
        tmp = Path(tmp)
        data = tmp / "in"
        data.mkdir()
        generate(data, args.rows, args.files, args.rejected)
        address = f"127.0.0.1:{free_port()}"
        subprocess.run(
            [
                ray,
                "start",
                "--head",
                f"--port={address.split(':')[1]}",
                f"--num-cpus={cores}",
                "--include-dashboard=false",
                f"--temp-dir={tmp / 'ray'}",
            ],
            check=True,
            capture_output=True,
            env=env,
        )
        try:
            base = [sys.executable, "-m", "serving.cli", "score", str(data)]
            common = ["--model-dir", str(args.model), "--device", "cpu", "--quiet", "--log-level", "WARNING"]
            for round_ in range(args.rounds):
                local_out = tmp / f"local-{round_}.parquet"
                results.setdefault("local (threads, --concurrency 4)", []).append(
                    run_scorer([*base, str(local_out), *common])
                )
                for n in actors:
                    out = tmp / f"ray-{n}-{round_}"
                    result = run_scorer(
                        [
                            *base,
                            str(out),
                            "--engine",
                            "ray",
                            "--ray-address",
                            address,
                            "--concurrency",
                            str(n),
                            "--batch-size",
                            str(args.batch_size),
                            *common,
                        ]
                    )
                    result["same"] = same_rows(local_out, out)
                    results.setdefault(f"ray, {n} actor{'s' if n > 1 else ''}", []).append(result)
        finally:
            subprocess.run([ray, "stop", "--force"], capture_output=True, env=env)
        started = time.perf_counter()
        own = run_scorer([*base, str(tmp / "ray-own"), "--engine", "ray", "--concurrency", "2", *common])
        own["wall_s"] = time.perf_counter() - started
    print(
        f"{args.rows:,} rows in {args.files} Parquet files, {cores} cores, {args.rounds} rounds, "
        f"batch size {args.batch_size}, {args.rejected:.0%} of rows rejected, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n"
    )
    print(
        "| engine | rows/s (scoring), median (range) | rows/s (whole process), median | peak RSS, max "
        "| same rows and errors as local |"
    )
    print("|---|---:|---:|---:|---|")
    for name, runs in results.items():
        rates = [r["rows_per_s"] for r in runs]
        whole = statistics.median(r["process_rows_per_s"] for r in runs)
        same = "-" if "same" not in runs[0] else ("yes" if all(r["same"] for r in runs) else "NO")
        print(
            f"| {name} | {statistics.median(rates) / 1e6:.2f} M ({min(rates) / 1e6:.2f}-{max(rates) / 1e6:.2f}) "
            f"| {whole / 1e6:.2f} M | {max(r['peak_rss_mib'] for r in runs):.0f} MiB | {same} |"
        )
    print(
        f"\nstart-up: --engine ray --concurrency 2 starting its own Ray: {own['wall_s']:.1f} s whole process, "
        f"{own['rows_per_s'] / 1e6:.2f} M rows/s (scoring)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
