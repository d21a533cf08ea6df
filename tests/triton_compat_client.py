"""Drives a server with the unmodified tritonclient[grpc] package and prints what it saw, as JSON.

    python tests/triton_compat_client.py HOST:PORT [--model xor]
    python tests/triton_compat_client.py HOST:PORT --repository MODEL   # the model-repository calls

Run as a separate process: tritonclient registers the same `inference.*` protobuf names as
serving._proto, so the two cannot share a process. tests/test_server_triton.py runs it once and checks
each part of the report; every float travels as a list of Python floats (exact for float32).
"""

from __future__ import annotations

import argparse
import json
import queue
import sys

import numpy as np
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

POINTS = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float32)


def tensor(x: np.ndarray, name: str = "input", datatype: str = "FP32") -> triton.InferInput:
    inp = triton.InferInput(name, list(x.shape), datatype)
    inp.set_data_from_numpy(x)
    return inp


def outputs(result: triton.InferResult) -> dict[str, list]:
    return {o.name: result.as_numpy(o.name).tolist() for o in result.get_response().outputs}


def error_of(call) -> dict:
    try:
        call()
    except InferenceServerException as exc:
        return {"status": str(exc.status()), "message": exc.message()}
    return {"status": "OK", "message": ""}


def error_cases(client: triton.InferenceServerClient, model: str) -> dict[str, dict]:
    def infer(*inputs, model_name=model, version=""):
        return lambda: client.infer(model_name, list(inputs), model_version=version)

    short = tensor(np.zeros((2, 2), np.float32))
    short.set_shape([3, 2])  # 16 bytes of data for a shape that needs 24
    return {
        "wrong_shape": error_of(infer(tensor(np.zeros((2, 3), np.float32)))),
        "wrong_datatype": error_of(infer(tensor(np.zeros((2, 2), np.float64), datatype="FP64"))),
        "wrong_byte_length": error_of(infer(short)),
        "wrong_input_name": error_of(infer(tensor(np.zeros((2, 2), np.float32), name="x"))),
        "empty_batch": error_of(infer(tensor(np.zeros((0, 2), np.float32)))),
        "nan": error_of(infer(tensor(np.array([[np.nan, 1]], np.float32)))),
        "inf": error_of(infer(tensor(np.array([[1, -np.inf]], np.float32)))),
        "unknown_model": error_of(infer(tensor(POINTS), model_name="nope")),
        "unknown_version": error_of(infer(tensor(POINTS), version="7")),
    }


def typed_contents(url: str, model: str) -> dict[str, list]:
    """ModelInfer with fp32_contents instead of raw bytes, through tritonclient's own generated stub."""
    import grpc

    request = service_pb2.ModelInferRequest(model_name=model)
    inp = request.inputs.add(name="input", datatype="FP32", shape=list(POINTS.shape))
    inp.contents.fp32_contents.extend(POINTS.ravel().tolist())
    with grpc.insecure_channel(url) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    return outputs(triton.InferResult(response))


def streaming(client: triton.InferenceServerClient, model: str, inputs: dict[str, np.ndarray]) -> dict[str, dict]:
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    for request_id, x in inputs.items():
        client.async_stream_infer(model, [tensor(x)], request_id=request_id)
    client.async_stream_infer(model, [tensor(np.zeros((1, 3), np.float32))], request_id="bad")
    client.stop_stream()  # waits for every answer
    seen = {}
    while not answers.empty():
        result, error = answers.get()
        if error is not None:
            seen[f"error{len(seen)}"] = {"error": error.message()}
        else:
            seen[result.get_response().id] = {"outputs": outputs(result)}
    return seen


def repository_calls(client: triton.InferenceServerClient, model: str) -> dict:
    """get_model_repository_index, load_model and unload_model, and what the server says after each."""

    def index() -> list[dict]:
        return client.get_model_repository_index(as_json=True).get("models", [])

    report = {"index_before": index(), "ready_before": client.is_model_ready(model)}
    report["load"] = error_of(lambda: client.load_model(model))
    report["ready_after_load"] = client.is_model_ready(model)
    report["index_after_load"] = index()
    report["infer_after_load"] = outputs(client.infer(model, [tensor(POINTS)]))
    report["unload"] = error_of(lambda: client.unload_model(model))
    report["ready_after_unload"] = client.is_model_ready(model)
    report["index_after_unload"] = index()
    report["infer_after_unload"] = error_of(lambda: client.infer(model, [tensor(POINTS)]))
    report["load_unknown"] = error_of(lambda: client.load_model("nope"))
    return report


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--model", default="xor")
    parser.add_argument("--repository", metavar="MODEL", help="exercise the model-repository calls on MODEL")
    args = parser.parse_args()
    client = triton.InferenceServerClient(args.url)
    if args.repository:
        json.dump(repository_calls(client, args.repository), sys.stdout)
        client.close()
        return 0
    model = args.model
    rng = np.random.default_rng(11)
    stream_inputs = {f"s{i}": rng.normal(size=(i + 1, 2)).astype(np.float32) for i in range(5)}
    report = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(model),
        "unknown_model_ready": client.is_model_ready("nope"),
        "server_metadata": client.get_server_metadata(as_json=True),
        "model_metadata": client.get_model_metadata(model, as_json=True),
        "model_config": client.get_model_config(model, as_json=True),
        "points": POINTS.tolist(),
        "infer_raw": outputs(client.infer(model, [tensor(POINTS)])),
        "infer_typed": typed_contents(args.url, model),
        "infer_subset": outputs(
            client.infer(model, [tensor(POINTS)], outputs=[triton.InferRequestedOutput("probability")])
        ),
        "errors": error_cases(client, model),
        "stream_inputs": {k: v.tolist() for k, v in stream_inputs.items()},
        "stream": streaming(client, model, stream_inputs),
    }
    report["ready_after_errors"] = client.is_server_ready()
    report["infer_after_errors"] = outputs(client.infer(model, [tensor(POINTS)]))
    client.close()
    json.dump(report, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
