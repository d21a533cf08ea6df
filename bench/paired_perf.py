"""Paired A/B/... throughput of server variants that are all up at once, measured in alternation.

    .venv/bin/python bench/paired_perf.py "VARIANT ..." [--concurrency 16] [--rows 1024] [--rounds 6]

Every variant starts before the first measurement, pinned to core 0 (`--server-cpus`); then, round
after round, each is driven in turn by perf_analyzer on core 1 (../shared/bench/run_perf.sh), the order
rotating every round. On a shared machine whose speed drifts by 10-20 % within minutes, the ratio of
two points measured back to back is far steadier than either point: this prints every point, then per
variant the median rows/s and the median over rounds of its ratio to the first variant.

Variants (idle ones wait in epoll and cost nothing measurable):
    null                      ../shared/bench v2_server.py --mode null, the Python gRPC ceiling
    ort                       v2_server.py --mode ort: models/xor/1 in ONNX Runtime once per request (the naive peer)
    new[:FLAG,FLAG...]        xorserve from this tree with extra `serve` flags, e.g. new:--max-batch-size=4096
    tls[:FLAGS]               as new, serving TLS (a certificate from a trustme CA made for the run; perf_analyzer
                              is given --ssl-grpc-use-ssl and the CA): what TLS costs, paired with `new`
    token[:FLAGS]             as new, requiring a bearer token (--auth-token-file; perf_analyzer sends it with -H)
    base[:FLAGS]              xorserve from $BASE_DIR (default /tmp/ab-base; `git archive HEAD serving`
                              unpacked there when missing)
    xs:KIND[:FLAGS]           bench/price_steps.py KIND (const1, const, dec, decort, full)
Every xorserve variant runs with `--max-batch-size 1024` unless its flags say otherwise.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_perf import BENCH, ROOT, SERVE_FLAGS, Server, _pin, perf, start_null, start_server  # noqa: E402

PYTHON = str(ROOT / ".venv" / "bin" / "python")


def start_variant(spec: str, cpus: str) -> Server:
    if spec in ("null", "ort"):
        return start_null(cpus, mode=spec)
    name, _, rest = spec.partition(":")
    if name == "xs":
        kind, _, rest = rest.partition(":")
    flags = ["--max-batch-size", "1024", *(f.replace("=", " ", 1) for f in rest.split(",") if f)]
    flags = [part for flag in flags for part in flag.split(" ", 1)]
    if name == "tls":
        cert, key, _ = tls_files()
        flags += ["--tls-cert", str(cert), "--tls-key", str(key)]
        return start_server([*_pin(cpus), PYTHON, "-m", "serving.cli", "serve", *SERVE_FLAGS, *flags], label=spec)
    if name == "token":
        flags += ["--auth-token-file", str(tls_files()[0].parent / "token")]
        return start_server([*_pin(cpus), PYTHON, "-m", "serving.cli", "serve", *SERVE_FLAGS, *flags], label=spec)
    if name == "new":
        return start_server([*_pin(cpus), PYTHON, "-m", "serving.cli", "serve", *SERVE_FLAGS, *flags], label=spec)
    if name == "base":
        base = Path(os.environ.get("BASE_DIR", "/tmp/ab-base"))
        if not (base / "serving").is_dir():
            base.mkdir(parents=True, exist_ok=True)
            archive = subprocess.run(
                ["git", "-C", str(ROOT), "archive", "HEAD", "serving"], capture_output=True, check=True
            )
            subprocess.run(["tar", "-x", "-C", str(base)], input=archive.stdout, check=True)
        command = [*_pin(cpus), PYTHON, "-m", "serving.cli", "serve", *SERVE_FLAGS, *flags]
        return start_server(command, cwd=base, env=dict(os.environ, PYTHONPATH=str(base)), label=spec)
    if name == "xs":
        command = [*_pin(cpus), PYTHON, str(ROOT / "bench" / "price_steps.py"), kind, *SERVE_FLAGS, *flags]
        return start_server(command, label=spec)
    raise SystemExit(f"unknown variant {spec!r}; see the docstring")


def tls_files() -> tuple[Path, Path, Path]:
    """A server certificate for 127.0.0.1 and localhost, its key, and the CA that signed it (made once per run)."""
    import tempfile

    import trustme

    folder = Path(tempfile.gettempdir()) / f"xorserve-bench-tls-{os.getpid()}"
    cert, key, ca_file = folder / "server.pem", folder / "server.key", folder / "ca.pem"
    if not ca_file.exists():
        folder.mkdir(exist_ok=True)
        ca = trustme.CA()
        issued = ca.issue_cert("127.0.0.1", "localhost")
        issued.cert_chain_pems[0].write_to_path(str(cert))
        issued.private_key_pem.write_to_path(str(key))
        ca.cert_pem.write_to_path(str(ca_file))
        (folder / "token").write_text(os.urandom(16).hex() + "\n")
    return cert, key, ca_file


def perf_arguments(spec: str) -> tuple[str, ...]:
    """The perf_analyzer arguments a variant needs (TLS: use it, and trust the run's CA; token: send it)."""
    kind = spec.partition(":")[0]
    if kind == "token":
        return ("-H", "authorization:Bearer " + (tls_files()[0].parent / "token").read_text().strip())
    if kind != "tls":
        return ()
    return ("--ssl-grpc-use-ssl", "true", "--ssl-grpc-root-certifications-file", str(tls_files()[2]))


def perf_direct(port: int, concurrency: int, rows: int, measure_ms: int, client_cpus: str, extra: tuple[str, ...]):
    """perf_analyzer as run_perf.sh runs it (3 windows of measure_ms, 200 warm-up requests, `-b ROWS --shape
    input:2`: xorserve's max_batch_size is above 0), called directly: run_perf.sh first asks the server for
    its max_batch_size in plaintext, which a TLS server cannot answer. Used for every variant of a run that
    has a TLS one, so that both sides are measured the same way."""
    import csv
    import tempfile

    with tempfile.TemporaryDirectory(prefix="paired-perf-") as folder:
        out = Path(folder) / "pa.csv"
        command = [str(BENCH / "pa.sh"), "-m", "xor", "-i", "grpc", "-u", f"127.0.0.1:{port}", "-b", str(rows)]
        command += ["--shape", "input:2", "--concurrency-range", f"{concurrency}:{concurrency}"]
        command += ["--measurement-mode", "time_windows", "--measurement-interval", str(measure_ms)]
        command += ["--stability-percentage", "999", "--max-trials", "3", "--warmup-request-count", "200"]
        command += ["-f", str(out), *extra]
        env = dict(os.environ, CLIENT_CPUS=client_cpus) if client_cpus else dict(os.environ)
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0 or not out.exists():
            print(f"  perf_analyzer failed: {(done.stdout + done.stderr)[-500:]}", file=sys.stderr)
            return []
        row = next(csv.DictReader(out.open()))
    return [
        dict(
            concurrency=concurrency,
            batch_rows=rows,
            infer_per_s=float(row["Inferences/Second"]),
            p50_us=int(row["p50 latency"]),
            p90_us=int(row["p90 latency"]),
            p99_us=int(row["p99 latency"]),
        )
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("variants", help="space-separated variants; ratios are to the first")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--measure-ms", type=int, default=1000, help="perf_analyzer window (3 per point)")
    parser.add_argument("--streaming", action="store_true", help="perf_analyzer --streaming (xorserve variants only)")
    parser.add_argument("--server-cpus", default="0")
    parser.add_argument("--client-cpus", default="1")
    args = parser.parse_args()
    specs = args.variants.split()
    servers: dict[str, Server] = {}
    direct = any(spec.partition(":")[0] in ("tls", "token") for spec in specs)
    if direct and args.streaming:
        raise SystemExit("--streaming is not measured with a tls variant")
    rates: dict[str, dict[int, float]] = {spec: {} for spec in specs}
    try:
        for spec in specs:
            servers[spec] = start_variant(spec, args.server_cpus)
        print("variant,round,concurrency,rows,infer_per_s,p50_us,p90_us,p99_us", flush=True)
        for round_ in range(args.rounds):
            shift = round_ % len(specs)
            for spec in specs[shift:] + specs[:shift]:
                if direct:
                    points = perf_direct(
                        servers[spec].port,
                        args.concurrency,
                        args.rows,
                        args.measure_ms,
                        args.client_cpus,
                        perf_arguments(spec),
                    )
                else:
                    points = perf(
                        servers[spec].port,
                        [args.concurrency],
                        args.rows,
                        args.streaming,
                        args.measure_ms,
                        args.client_cpus,
                    )
                for p in points:
                    rates[spec][round_] = p["infer_per_s"]
                    print(
                        f"{spec},{round_},{p['concurrency']},{p['batch_rows']},{p['infer_per_s']:.0f},"
                        f"{p['p50_us']},{p['p90_us']},{p['p99_us']}",
                        flush=True,
                    )
    finally:
        for server in servers.values():
            server.stop()
    first = rates[specs[0]]
    print(f"\nmedians over {args.rounds} rounds, c={args.concurrency}, rows={args.rows}:")
    for spec in specs:
        rounds = sorted(set(first) & set(rates[spec]))
        if not rates[spec] or not rounds:
            print(f"  {spec}: not measured")
            continue
        ratios = [rates[spec][r] / first[r] for r in rounds]
        print(
            f"  {spec}: {statistics.median(rates[spec].values()):,.0f}/s; vs {specs[0]}: "
            f"median {statistics.median(ratios):.3f}x (rounds {min(ratios):.3f}-{max(ratios):.3f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
