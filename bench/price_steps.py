"""xorserve with DataPlane.infer cut down, to price each step of a request in situ (under load).

    .venv/bin/python bench/price_steps.py KIND [xorserve serve flags]  # KIND: const1|const|dec|decort|full

const answers a prebuilt response (the gRPC stack and our servicer only), const1 the same with the first
output only (the null server's payload: 4 KB instead of 8 KB at 1,024 rows), dec adds decoding the
input, decort adds one ONNX Runtime call per request (no batching), full is the real server. Driven by
bench/server_cpu.sh and bench/paired_perf.py (a measuring tool, not a server to run).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import serving.server.dataplane as dp  # noqa: E402
from serving._proto import grpc_service_pb2 as pb  # noqa: E402
from serving.cli import serve  # noqa: E402
from serving.cli.flags import Parser  # noqa: E402
from serving.server import codec  # noqa: E402


def main() -> int:
    kind, flags = sys.argv[1], sys.argv[2:]
    if kind not in ("const1", "const", "dec", "decort", "full"):
        sys.exit(f"unknown KIND {kind!r}; see the docstring")
    prebuilt: list[pb.ModelInferResponse] = []

    async def infer(self, request, time_remaining):
        served = self.resolve(request.model_name, request.model_version)
        session = served.loaded.sessions[0]
        if kind in ("dec", "decort"):
            arrays, _ = served.decoder.decode(request)
            if kind == "decort":
                session.run(list(served.output_names), arrays)
        if not prebuilt:  # the real answer to the first request, computed directly
            inputs, _ = served.decoder.decode(request)
            outputs = session.run(list(served.output_names), inputs)
            chosen = served.loaded.outputs[:1] if kind == "const1" else served.loaded.outputs
            prebuilt.append(
                codec.encode_response(
                    served.loaded.model,
                    served.loaded.version,
                    "",
                    chosen,
                    dict(zip(served.output_names, outputs, strict=True)),
                )
            )
        response = pb.ModelInferResponse()
        response.CopyFrom(prebuilt[0])
        response.id = request.id
        return response

    if kind != "full":
        dp.DataPlane.infer = infer
    parser = Parser(prog="price_steps")
    serve.add_arguments(parser)
    return serve.run(parser.parse_args(flags))


if __name__ == "__main__":
    sys.exit(main())
