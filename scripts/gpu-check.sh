#!/usr/bin/env bash
# GPU check (issue 3, item 10): on a machine with an NVIDIA GPU and onnxruntime-gpu importable, in one
# command: the `gpu`-marked tests, parity on CUDA with TF32 off (gating) and on (information), parity
# through a CUDA server, and a short CPU-vs-CUDA latency table through the server. Every result goes
# to one folder.
#
#   scripts/gpu-check.sh [OUT_DIR]          (default: out/gpu-check)
#
# Environment:
#   PYTHON  interpreter that can import the project's dependencies (default: .venv/bin/python when it
#           exists, else python3); the repository root is put on PYTHONPATH.
#   MODEL   model folder (default: models/xor/1); its repository is the folder two levels up.
#   REQUESTS  requests per latency cell (default: 200)
#
# OUT_DIR receives: environment.txt, pytest-gpu.txt and .xml, parity-cuda.txt and .json,
# parity-served.txt and .json, latency.md (also printed), server-*.log and summary.txt.
# Exit status: 0 when every step passed, 1 when one failed, 2 when the machine cannot run the check
# (no GPU, no CUDA provider, a missing module); the steps run on after a failure.
# See ../shared/gpu/README.md for getting onnxruntime-gpu onto a machine without registry access.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/gpu-check}
MODEL=${MODEL:-models/xor/1}
REQUESTS=${REQUESTS:-200}
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
: >"$OUT/summary.txt"
status=0

record() {  # record NAME EXIT_CODE
  if [ "$2" -eq 0 ]; then echo "$1: passed" | tee -a "$OUT/summary.txt"
  else echo "$1: FAILED (exit $2)" | tee -a "$OUT/summary.txt"; status=1; fi
}

echo "== preflight"
{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  else echo "nvidia-smi: not found"; fi
  "$PY" - "$MODEL" <<'EOF'
import importlib, sys
missing = [m for m in ("numpy", "onnxruntime", "grpc", "grpc_health.v1.health", "grpc_reflection.v1alpha.reflection",
                       "prometheus_client", "pytest", "torch") if importlib.util.find_spec(m.split(".")[0]) is None]
if missing:
    print("missing modules:", ", ".join(missing)); sys.exit(2)
import onnxruntime as ort
from serving.devices import DeviceUnavailableError
from serving.runtime import SessionSettings, open_session
print("python", sys.version.split()[0], "onnxruntime", ort.__version__, "available", ort.get_available_providers())
try:
    session = open_session(f"{sys.argv[1]}/model.onnx", SessionSettings(device="cuda"))
except DeviceUnavailableError as exc:
    print("CUDA session: unavailable:", exc); sys.exit(2)
print("CUDA session providers:", session.get_providers())
EOF
} 2>&1 | tee "$OUT/environment.txt"
preflight=${PIPESTATUS[0]}
if [ "$preflight" -ne 0 ]; then
  echo "preflight: this machine cannot run the GPU check (see $OUT/environment.txt)" | tee -a "$OUT/summary.txt"
  exit 2
fi

echo "== gpu-marked tests"
"$PY" -m pytest -m gpu -q -rs -p no:cacheprovider --junitxml "$OUT/pytest-gpu.xml" >"$OUT/pytest-gpu.txt" 2>&1
code=$?
# On a GPU machine a gpu test that skips has not checked anything.
if [ "$code" -eq 0 ] && grep -q "SKIPPED" "$OUT/pytest-gpu.txt"; then code=3; fi
tail -n 5 "$OUT/pytest-gpu.txt"
record "gpu tests (no skips allowed)" "$code"

echo "== parity on CUDA, TF32 off (gating) and on (information)"
"$PY" -m serving.cli parity "$MODEL" --device cuda --json "$OUT/parity-cuda.json" >"$OUT/parity-cuda.txt" 2>&1
record "parity cuda" $?
tail -n 15 "$OUT/parity-cuda.txt"

echo "== parity through a CUDA server, and CPU-vs-CUDA latency through the server"
"$PY" - "$MODEL" "$OUT" "$REQUESTS" "$PY" <<'EOF'
import statistics, subprocess, sys, time
from pathlib import Path

import grpc
import numpy as np

from serving._proto import grpc_service_pb2 as pb, grpc_service_pb2_grpc as pb_grpc
from serving.client.launch import ServerProcess
from serving.runtime import SessionSettings, open_session

model, out, requests, python = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
repository, name = model.parent.parent, model.parent.name
ROWS = (1, 64, 4096, 65536)
rng = np.random.default_rng(0)
failed = False


def request(x):
    tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=list(x.shape))
    return pb.ModelInferRequest(model_name=name, inputs=[tensor], raw_input_contents=[x.tobytes()])


def served_ms(url, x):
    with grpc.insecure_channel(url) as channel:
        stub, message = pb_grpc.GRPCInferenceServiceStub(channel), request(x)
        for _ in range(10):
            stub.ModelInfer(message)
        times = []
        for _ in range(requests):
            start = time.perf_counter()
            stub.ModelInfer(message)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, np.percentile(times, 90) * 1e3


def session_us(device, x):
    session = open_session(model / "model.onnx", SessionSettings(device=device))
    for _ in range(10):
        session.run(None, {"input": x})
    times = []
    for _ in range(requests):
        start = time.perf_counter()
        session.run(None, {"input": x})
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


results = {}
for device in ("cpu", "cuda"):
    server = ServerProcess.start(repository, ["--device", device])
    try:
        for rows in ROWS:
            x = rng.uniform(-0.5, 1.5, size=(rows, 2)).astype(np.float32)
            results[(device, rows)] = (*served_ms(server.url, x), session_us(device, x))
        if device == "cuda":
            parity = subprocess.run(
                [python, "-m", "serving.cli", "parity", str(model), "--device", "cuda", "--url", server.url,
                 "--json", str(out / "parity-served.json")], capture_output=True, text=True)
            (out / "parity-served.txt").write_text(parity.stdout + parity.stderr)
            print(f"parity served cuda: {'passed' if parity.returncode == 0 else 'FAILED'} (exit {parity.returncode})")
            failed |= parity.returncode != 0
    finally:
        code = server.stop()
        (out / f"server-{device}.log").write_text("\n".join(server.output) + "\n")
        failed |= code != 0

lines = [
    "| rows per request | CPU served p50 ms | CPU served p90 ms | CUDA served p50 ms | CUDA served p90 ms "
    "| CPU session.run us | CUDA session.run us |",
    "|---:|---:|---:|---:|---:|---:|---:|",
]
for rows in ROWS:
    cpu, cuda = results[("cpu", rows)], results[("cuda", rows)]
    lines.append(f"| {rows:,} | {cpu[0]:.3f} | {cpu[1]:.3f} | {cuda[0]:.3f} | {cuda[1]:.3f} | {cpu[2]:.1f} | {cuda[2]:.1f} |")
table = "\n".join(lines)
(out / "latency.md").write_text(
    f"Sequential ModelInfer over gRPC on this machine, {requests} requests per cell after 10 warm-up ones; "
    "session.run: in-process ONNX Runtime on the same inputs.\n\n" + table + "\n")
print(table)
sys.exit(1 if failed else 0)
EOF
record "served parity and latency" $?

echo "== summary ($OUT)"
cat "$OUT/summary.txt"
exit $status
