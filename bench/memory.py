"""The server's memory after large requests: resident memory (RSS) before, and after each of a few large ones.

    .venv/bin/python bench/memory.py [--rows 8388608] [--requests 3] [--pause-s 1] [--json] [-- SERVE_FLAGS...]

Starts `xorserve serve --model-repository models --device cpu --max-request-rows 0 --max-message-bytes
512MiB` (plus SERVE_FLAGS), sends `--requests` ModelInfer requests of `--rows` rows one after another
(8,388,608 rows: 64 MiB in, 64 MiB out), and prints the server's RSS before the first and `--pause-s` after
each: the memory the server keeps once a large request is answered. With ONNX Runtime's CPU arena and
glibc keeping freed memory, that was 300-400 MB more than before (docs/serving.md, "Memory").
Exits 1 if the RSS after the last request exceeds the one before the first by more than --max-growth-mb.
"""

from __future__ import annotations

import argparse
import json
import sys
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

MESSAGE_BYTES = 512 << 20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8 * 1024 * 1024)
    parser.add_argument("--requests", type=int, default=3)
    parser.add_argument("--pause-s", type=float, default=1.0)
    parser.add_argument("--max-growth-mb", type=float, default=32.0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("serve_flags", nargs="*", help="more `xorserve serve` flags (after --)")
    args = parser.parse_args()

    x = np.random.default_rng(0).random((args.rows, 2), dtype=np.float32)
    tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[args.rows, 2])
    request = pb.ModelInferRequest(model_name="xor", inputs=[tensor], raw_input_contents=[x.tobytes()])
    flags = ["--device", "cpu", "--max-request-rows", "0", "--max-message-bytes", str(MESSAGE_BYTES)]
    options = [("grpc.max_send_message_length", MESSAGE_BYTES), ("grpc.max_receive_message_length", MESSAGE_BYTES)]
    rss_mb = []
    with ServerProcess.start(ROOT / "models", [*flags, *args.serve_flags]) as server:
        process = psutil.Process(server.process.pid)
        with grpc.insecure_channel(server.url, options=options) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            small = pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, 2])
            warm = pb.ModelInferRequest(model_name="xor", inputs=[small], raw_input_contents=[bytes(8)])
            stub.ModelInfer(warm, timeout=10)  # (the channel and the handler warm first)
            time.sleep(args.pause_s)
            rss_mb.append(process.memory_info().rss / 2**20)
            for _ in range(args.requests):
                response = stub.ModelInfer(request, timeout=300)
                assert response.outputs[0].shape == [args.rows, 1], response.outputs[0].shape
                del response
                time.sleep(args.pause_s)
                rss_mb.append(process.memory_info().rss / 2**20)
    growth = rss_mb[-1] - rss_mb[0]
    if args.json:
        print(json.dumps({"rows": args.rows, "rss_mb": [round(r, 1) for r in rss_mb], "growth_mb": round(growth, 1)}))
    else:
        print(f"{args.requests} requests of {args.rows} rows; server RSS (MB) {args.pause_s} s after each")
        print(f"  before: {rss_mb[0]:.1f}")
        for index, rss in enumerate(rss_mb[1:], 1):
            print(f"  after {index}: {rss:.1f}")
        print(f"growth: {growth:+.1f} MB (limit {args.max_growth_mb})")
    return 1 if growth > args.max_growth_mb else 0


if __name__ == "__main__":
    sys.exit(main())
