"""Model lifecycle under measurement: the server's memory over load/unload cycles, and latency during swaps.

    .venv/bin/python bench/lifecycle.py [--cycles 200] [--swaps 20] [--clients 16]

1. Memory: `xorserve serve --model-control-mode explicit --load-model xor` on a copy of models/, then
   `--cycles` times RepositoryModelUnload + RepositoryModelLoad of the model, the server's resident memory
   (RSS) sampled every 10 cycles. Prints the samples, and the growth over the second half of the cycles
   (after the allocator has settled), and exits 1 if that growth is above --max-growth-mb.
2. Swaps: the same server, `--clients` threads calling ModelInfer (1 row) on the latest version back to
   back, first for --steady-s seconds, then while --swaps new versions (copies of models/xor/1) are put
   in the repository and loaded, one every --swap-every-s (a config.pbtxt keeps the latest version only).
   Prints the failures (there should be none) and p50/p99 latency of the answers that completed during a
   swap (from the load call to 50 ms after it returned) against those of the steady window.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from serving._proto import grpc_service_pb2 as pb  # noqa: E402
from serving._proto import grpc_service_pb2_grpc as pb_grpc  # noqa: E402
from serving.client.launch import ServerProcess  # noqa: E402

CONFIG = "max_batch_size: 64\ndynamic_batching {}\nversion_policy { latest { num_versions: 1 } }\n"


def request() -> pb.ModelInferRequest:
    x = np.array([[0.0, 1.0]], np.float32)
    tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, 2])
    return pb.ModelInferRequest(model_name="xor", inputs=[tensor], raw_input_contents=[x.tobytes()])


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def memory(stub, pid: int, cycles: int) -> list[tuple[int, float]]:
    samples = [(0, rss_mb(pid))]
    for cycle in range(1, cycles + 1):
        stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="xor"), timeout=60)
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="xor"), timeout=60)
        stub.ModelInfer(request(), timeout=10)
        if cycle % 10 == 0:
            samples.append((cycle, rss_mb(pid)))
    return samples


class Load:
    """Threads calling ModelInfer back to back; each answer's time and latency, and the failures."""

    def __init__(self, address: str, clients: int) -> None:
        self.address, self.stop = address, threading.Event()
        self.times: list[tuple[float, float]] = []
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(clients)]

    def run(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub, message = pb_grpc.GRPCInferenceServiceStub(channel), request()
            while not self.stop.is_set():
                start = time.perf_counter()
                try:
                    stub.ModelInfer(message, timeout=30)
                except grpc.RpcError as error:
                    with self.lock:
                        self.failures.append(error.code().name)
                    continue
                with self.lock:
                    self.times.append((time.monotonic(), time.perf_counter() - start))


def percentiles(latencies: list[float]) -> str:
    if not latencies:
        return "no answers"
    ms = sorted(1000 * v for v in latencies)
    p99 = ms[min(len(ms) - 1, int(0.99 * len(ms)))]
    return f"{len(ms)} answers, p50 {statistics.median(ms):.2f} ms, p99 {p99:.2f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--swaps", type=int, default=20)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--steady-s", type=float, default=5.0)
    parser.add_argument("--swap-every-s", type=float, default=0.5)
    parser.add_argument("--max-growth-mb", type=float, default=10.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="xorserve-lifecycle-") as tmp:
        repository = Path(tmp)
        (repository / "xor").mkdir()
        shutil.copy(ROOT / "models" / "xor" / "1" / "model.onnx", repository / "xor" / "model.onnx.source")
        (repository / "xor" / "1").mkdir()
        shutil.copy(ROOT / "models" / "xor" / "1" / "model.onnx", repository / "xor" / "1" / "model.onnx")
        flags = ["--model-control-mode", "explicit", "--load-model", "xor", "--device", "cpu", "--log-level", "WARNING"]
        with ServerProcess.start(repository, flags) as server, grpc.insecure_channel(server.url) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            pid = server.process.pid
            samples = memory(stub, pid, args.cycles)
            print("RSS over load/unload cycles (cycle: MB):", ", ".join(f"{c}: {mb:.1f}" for c, mb in samples))
            half = [mb for cycle, mb in samples if cycle >= args.cycles // 2]
            growth = half[-1] - half[0]
            print(
                f"RSS: {samples[0][1]:.1f} MB at start, {samples[1][1]:.1f} MB after 10 cycles, "
                f"{samples[-1][1]:.1f} MB after {args.cycles}; growth over the second half {growth:+.1f} MB"
            )
            (repository / "xor" / "config.pbtxt").write_text(CONFIG)
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="xor"), timeout=60)
            load = Load(server.url, args.clients)
            for thread in load.threads:
                thread.start()
            time.sleep(args.steady_s)
            swaps_began, windows = time.monotonic(), []
            for version in range(2, args.swaps + 2):
                folder = repository / "xor" / f".{version}.tmp"
                folder.mkdir()
                shutil.copy(repository / "xor" / "model.onnx.source", folder / "model.onnx")
                folder.rename(repository / "xor" / str(version))
                began = time.monotonic()
                stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="xor"), timeout=60)
                windows.append((began, time.monotonic() + 0.05))
                time.sleep(max(0.0, began + args.swap_every_s - time.monotonic()))
            swaps_ended = time.monotonic()
            load.stop.set()
            for thread in load.threads:
                thread.join(30)
        steady = [latency for t, latency in load.times if swaps_began - args.steady_s + 1 <= t < swaps_began]
        during = [latency for t, latency in load.times if any(a <= t <= b for a, b in windows)]
        took = statistics.median(b - a - 0.05 for a, b in windows)
        print(
            f"{args.swaps} swaps in {swaps_ended - swaps_began:.2f} s under {args.clients} clients (a load call took "
            f"{1000 * took:.0f} ms, median); failures: {len(load.failures)}"
        )
        print(f"steady state (the last {args.steady_s - 1:g} s before the swaps): {percentiles(steady)}")
        print(f"during the swaps: {percentiles(during)}")
    return 1 if growth > args.max_growth_mb or load.failures else 0


if __name__ == "__main__":
    sys.exit(main())
