"""The whole pipeline, end to end, each step a real `xorserve` command:

1. train a fresh model (train -> export -> parity) and compare it with the shipped models/xor/1: the
   reproducibility contract promises the same bytes on every x86-64 CPU
2. serve a copy of the shipped model repository on free ports, polling it for new versions
3. predict the four corners of the XOR square over gRPC
4. parity through the server (bit-identical to in-process ONNX Runtime)
5. score a generated sample CSV through the server
6. a 20-second, 8-user Locust load test, while version 2 trains into the served repository: the server
   swaps to it under load, and the load test counts its failures (none)
7. stop the server (SIGTERM: drain, exit 0)
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from serving.cli.flags import CHECK_FAILED, Parser, flag, model_repository, number


def add_arguments(parser: Parser) -> None:
    flag(parser, "--out", env="DEMO_OUT", default="out/demo", help="where the demo writes")
    model_repository(parser, default=Path("models"), help="the shipped model repository to serve")
    flag(parser, "--sample-rows", type=number(int, minimum=1), default=100_000, help="rows in the generated sample CSV")
    flag(
        parser,
        "--loadtest-duration",
        default="20s",
        help="Locust run time, e.g. 20s (long enough for version 2 to train meanwhile)",
    )
    flag(parser, "--loadtest-users", type=number(int, minimum=1), default=8, help="Locust users")


def _step(number: int, title: str) -> None:
    print(f"\n=== {number}. {title}", flush=True)


def _xorserve(*args: str) -> None:
    print("$ xorserve " + " ".join(args), flush=True)
    code = subprocess.call([sys.executable, "-m", "serving.cli", *args])
    if code != 0:
        print(f"xorserve demo: `xorserve {args[0]}` exited {code}", file=sys.stderr)
        raise SystemExit(CHECK_FAILED)


def write_sample_csv(path: Path, rows: int, seed: int = 7) -> None:
    """Noisy XOR points, the notes' distribution, as x1,x2 columns."""
    rng = np.random.default_rng(seed)
    corners = rng.integers(0, 2, size=(rows, 2)).astype(np.float32)
    points = corners + rng.normal(0.0, 0.1, size=(rows, 2)).astype(np.float32)
    np.savetxt(path, points, delimiter=",", header="x1,x2", comments="", fmt="%.6f")


IDENTICAL = "fresh state_dict.pt and model.onnx are byte-identical to"


def ulps_apart(a: np.ndarray, b: np.ndarray) -> int:
    """The largest distance, in units in the last place, between matching float32 values."""

    def ordered(x: np.ndarray) -> np.ndarray:  # float32 bits as integers in the order of the floats
        bits = np.ascontiguousarray(x, dtype=np.float32).view(np.int32).astype(np.int64)
        return np.where(bits < 0, -(bits & 0x7FFFFFFF), bits)

    return int(np.abs(ordered(a) - ordered(b)).max()) if a.size else 0


def compare_with_shipped(fresh: Path, shipped: Path) -> str:
    """One line: the fresh model files are the shipped ones byte for byte, or how far their weights are apart."""
    names = ("state_dict.pt", "model.onnx")
    differing = [name for name in names if (fresh / name).read_bytes() != (shipped / name).read_bytes()]
    if not differing:
        return f"{IDENTICAL} the shipped {shipped}/"
    import onnx
    from onnx import numpy_helper

    weights = [
        {t.name: numpy_helper.to_array(t) for t in onnx.load(folder / "model.onnx").graph.initializer}
        for folder in (fresh, shipped)
    ]
    if weights[0].keys() != weights[1].keys() or any(weights[0][k].shape != weights[1][k].shape for k in weights[0]):
        return f"fresh {' and '.join(differing)} DIFFER from the shipped {shipped}/: the graphs' weights do not match"
    abs_error = max(float(np.abs(weights[0][k] - weights[1][k]).max()) for k in weights[0])
    ulps = max(ulps_apart(weights[0][k], weights[1][k]) for k in weights[0])
    return (
        f"fresh {' and '.join(differing)} DIFFER from the shipped {shipped}/: weights up to {ulps} ulps apart "
        f"(max abs {abs_error:.3g}); the contract promises identical bytes, so please report this CPU"
    )


def _wait_for_version(url: str, version: str, timeout_s: float = 60.0) -> str:
    """The latest version the server answers from, once it is `version` (polling ModelMetadata)."""
    from serving.client import InferenceClient

    give_up = time.monotonic() + timeout_s
    with InferenceClient(url, timeout_s=5) as client:
        while True:
            latest = client.metadata()["parameters"].get("version", "")
            if latest == version or time.monotonic() > give_up:
                return latest
            time.sleep(0.2)


def _exit_on_sigterm(signum, frame) -> None:
    # Unwinds through the `with` blocks, so the server the demo started is stopped too.
    raise SystemExit(128 + signum)


def run(args: argparse.Namespace) -> int:
    from serving.client.launch import ServerProcess

    signal.signal(signal.SIGTERM, _exit_on_sigterm)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    repository = Path(args.model_repository)
    shipped = repository / "xor" / "1"

    _step(1, "train -> export -> parity (a fresh model, default seed)")
    fresh = out / "models" / "xor" / "1"
    _xorserve("train", "--out", str(fresh))
    report = json.loads((fresh / "report.json").read_text())
    print(f"test accuracy: {100 * report['test_accuracy']:.2f}%")
    print(f"artifacts: {fresh}/ (model.onnx, state_dict.pt, report.json, plots/)")
    print(
        "reproducibility contract: the same seed gives the same state_dict.pt and model.onnx, byte for byte, "
        f"on every x86-64 CPU (numerics {report['numerics']['mode']}, "
        f"ATen kernels {report['numerics']['cpu_capability']}, MKL_CBWR={report['numerics']['mkl_cbwr'] or 'unset'})"
    )
    kept = compare_with_shipped(fresh, shipped)
    print(kept)

    served = out / "repository"
    _step(2, f"serve a copy of {repository}/ ({served}/) on free ports, polling it for new versions")
    shutil.rmtree(served, ignore_errors=True)
    shutil.copytree(repository, served)
    poll = ["--model-control-mode", "poll", "--repository-poll-s", "0.5"]
    with ServerProcess.start(served, poll) as server:
        print(
            f"server ready on {server.url} (metrics on http://{server.metrics_url}/metrics) in {server.startup_s:.2f} s"
        )

        _step(3, "predict the four corners over gRPC")
        _xorserve("predict", "--url", server.url, "0,0", "0,1", "1,0", "1,1")

        _step(4, "parity through the server")
        _xorserve("parity", str(shipped), "--url", server.url, "--json", str(out / "parity.json"))

        _step(5, f"score a generated {args.sample_rows:,}-row CSV through the server")
        sample = out / "sample.csv"
        write_sample_csv(sample, args.sample_rows)
        _xorserve("score", str(sample), str(out / "scored.csv"), "--url", server.url, "--quiet")

        _step(
            6,
            f"load test: {args.loadtest_users} users for {args.loadtest_duration}, while version 2 trains into "
            f"{served}/",
        )
        loadtest = [
            "loadtest",
            "--url",
            server.url,
            "--users",
            str(args.loadtest_users),
            "--spawn-rate",
            str(args.loadtest_users),
            "--duration",
            args.loadtest_duration,
            "--out",
            str(out / "loadtest"),
        ]
        print("$ xorserve " + " ".join(loadtest) + " &", flush=True)
        started = time.monotonic()
        running = subprocess.Popen([sys.executable, "-m", "serving.cli", *loadtest])
        try:
            _xorserve("train", "--out", str(served / "xor" / "2"), "--seed", "1", "--epochs", "30", "--no-plots")
            latest = _wait_for_version(server.url, "2")
            print(
                f"the server now answers from version {latest} (it answered from 1), "
                f"{time.monotonic() - started:.1f} s into the load test"
                + ("" if running.poll() is None else ", after it ended"),
                flush=True,
            )
            code = running.wait()
        finally:
            if running.poll() is None:
                running.terminate()
                running.wait()
        summary = json.loads((out / "loadtest" / "summary.json").read_text())
        total = summary["total"]
        print(
            f"load test across the swap: {total['requests']} requests, {total['failures']} failed (exit {code})",
            flush=True,
        )
        if code != 0 or total["failures"]:
            print("xorserve demo: the load test failed across the swap", file=sys.stderr)
            return CHECK_FAILED

        _step(7, "stop the server (SIGTERM)")
        code = server.stop()
        print(f"server exited {code}")
        if code != 0:
            return CHECK_FAILED
    print(f"\ndemo done: everything is under {out}/")
    if not kept.startswith(IDENTICAL):
        print(f"but step 1 broke the reproducibility contract: {kept}", file=sys.stderr)
        return CHECK_FAILED
    return 0
