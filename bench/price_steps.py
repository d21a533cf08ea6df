"""xorserve with DataPlane.start_infer cut down, to price each step of a request in situ (under load).

    .venv/bin/python bench/price_steps.py KIND PORT    # KIND: const | dec | decort | full

const answers a prebuilt response (the gRPC stack and our servicer only), dec adds decoding the input,
decort adds the ONNX Runtime call, full is the real server. Driven by bench/server_cpu.sh (a measuring
tool, not a server to run).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import serving.dataplane as dp  # noqa: E402
from serving import server  # noqa: E402
from serving._proto import grpc_service_pb2 as pb  # noqa: E402


def main() -> int:
    kind, port = sys.argv[1], sys.argv[2]
    prebuilt: list[pb.ModelInferResponse] = []

    def start_infer(self, request, time_remaining):
        served = self.resolve(request.model_name, request.model_version)
        if kind in ("dec", "decort"):
            arrays, _ = served.decoder.decode(request)
            if kind == "decort":
                served.batcher._run_first(served.batcher._output_names, arrays, None)
        if not prebuilt:  # the real answer to the first request, computed directly
            inputs, _ = served.decoder.decode(request)
            outputs = served.batcher._run_first(served.batcher._output_names, inputs, None)
            results = dict(zip(served.output_names, outputs, strict=True))
            prebuilt.append(served.encoder.encode("", served.loaded.outputs, results))
        response = pb.ModelInferResponse()
        response.CopyFrom(prebuilt[0])
        response.id = request.id
        return response

    if kind != "full":
        dp.DataPlane.start_infer = start_infer
    parser = argparse.ArgumentParser()
    server.add_arguments(parser)
    flags = ["--model-repository", str(ROOT / "models"), "--port", port, "--metrics-port", "0"]
    return server.run(parser.parse_args([*flags, "--max-batch-size", "1024"]))


if __name__ == "__main__":
    sys.exit(main())
