"""The clients of tests/test_isolation.py, run as a child process pinned beside the server:
`python tests/isolation_clients.py URL SECONDS` prints the outcome counts of the background clients and
of the storm as JSON (see that test for what each does and why)."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import Counter

import grpc
import numpy as np
from conftest import infer_request, outputs_of
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving._proto import grpc_service_pb2_grpc as pb_grpc

X = np.array([[0.0, 1.0], [1.0, 1.0]], np.float32)
EXPECTED_LABELS = [1.0, 0.0]


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: Counter = Counter()
        self.stop = threading.Event()

    def add(self, outcome: str) -> None:
        with self.lock:
            self.counts[outcome] += 1


def outcome_of(response) -> str:
    probability = outputs_of(response)["probability"].ravel()
    return "OK" if list((probability > 0.5).astype(np.float32)) == EXPECTED_LABELS else "WRONG ANSWER"


def background_unary(address: str, tally: Tally, index: int) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while not tally.stop.is_set():
            try:
                tally.add(outcome_of(stub.ModelInfer(infer_request(X, request_id=f"b{index}"), timeout=10)))
            except grpc.RpcError as error:
                tally.add(f"{error.code().name}: {error.details()[:100]}")


def background_stream(address: str, tally: Tally) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while not tally.stop.is_set():
            try:
                for response in stub.ModelStreamInfer(iter([infer_request(X)] * 200), timeout=10):
                    if response.error_message:
                        tally.add(f"in-band: {response.error_message[:100]}")
                    else:
                        tally.add(outcome_of(response.infer_response))
            except grpc.RpcError as error:
                tally.add(f"stream {error.code().name}: {error.details()[:100]}")


def background_health(address: str, tally: Tally) -> None:
    """What a Kubernetes probe does: a storm must not fail it (the pod would be restarted)."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        serving = health_pb2.HealthCheckResponse.SERVING
        while not tally.stop.is_set():
            try:
                response = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
                tally.add("OK" if response.status == serving else f"health {response.status}")
            except grpc.RpcError as error:
                tally.add(f"health {error.code().name}: {error.details()[:100]}")


def deadline_storm(address: str, tally: Tally) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while not tally.stop.is_set():
            try:
                stub.ModelInfer(infer_request(np.zeros((64, 2), np.float32)), timeout=0.001)
                tally.add("OK")
            except grpc.RpcError as error:
                tally.add(error.code().name)


def cancelled_streams(address: str, tally: Tally) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while not tally.stop.is_set():
            call = stub.ModelStreamInfer(iter([infer_request(X)] * 50), timeout=10)
            try:
                next(call)
                call.cancel()
                tally.add("cancelled stream")
            except grpc.RpcError as error:
                tally.add(f"stream {error.code().name}")


def storm(address: str, seconds: float) -> dict[str, dict[str, int]]:
    """Background clients beside the storm for `seconds`; the outcome counts of each."""
    background, stormy = Tally(), Tally()
    threads = [threading.Thread(target=background_unary, args=(address, background, i)) for i in range(4)]
    threads.append(threading.Thread(target=background_stream, args=(address, background)))
    threads.append(threading.Thread(target=background_health, args=(address, background)))
    threads += [threading.Thread(target=deadline_storm, args=(address, stormy)) for _ in range(8)]
    threads += [threading.Thread(target=cancelled_streams, args=(address, stormy)) for _ in range(2)]
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    background.stop.set()
    stormy.stop.set()
    for thread in threads:
        thread.join(30)
    return {"background": dict(background.counts), "storm": dict(stormy.counts)}


if __name__ == "__main__":
    print(json.dumps(storm(sys.argv[1], float(sys.argv[2]))))
