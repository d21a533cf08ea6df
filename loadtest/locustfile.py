"""Locust user for the Open Inference Protocol (KServe V2) gRPC API: 1-row and 64-row ModelInfer, ModelMetadata.

Follows Locust's documented pattern for gRPC: grpc is switched to gevent before any channel exists,
every call fires exactly one `request` event (response time in milliseconds to two decimals, not
Locust's whole milliseconds, response length, and the exception on failure), and errors are caught
in the task, so a dead server shows up as failures, not as a flood of tracebacks.

    locust -f loadtest/locustfile.py --host 127.0.0.1:8001 --headless -u 8 -r 8 -t 10s
    locust -f loadtest/locustfile.py --master ...      # and, elsewhere, --worker --master-host ...

Options (flags after the locustfile, or environment variables): --model (XORSERVE_MODEL),
--model-version, --input-name, --small-rows, --large-rows, --deadline-ms, and how to reach a server
that serves TLS or requires a bearer token: --grpc-tls-ca (XORSERVE_TLS_CA), --grpc-tls-cert and
--grpc-tls-key (XORSERVE_TLS_CERT, XORSERVE_TLS_KEY: mutual TLS), --grpc-token-file
(XORSERVE_TOKEN_FILE), the `xorserve` commands' --tls-ca ... by other names, since Locust's own
--tls-cert and --tls-key are its web UI's. Each user opens its channel with them and sends the token
with every call; files that cannot be read stop Locust at start. With --csv PREFIX, the
master (or the single process) also writes PREFIX_response_times.json: per request name, the count
of calls and failures and an exact 0.01-ms histogram of the successful calls' times (see
loadtest/timings.py), from which `xorserve loadtest` computes its rates and percentiles.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import grpc
import grpc.experimental.gevent as grpc_gevent

# Before any channel: grpc's own threads would otherwise block the gevent loop Locust runs on.
grpc_gevent.init_gevent()

import numpy as np  # noqa: E402
from locust import User, events, task  # noqa: E402
from locust.runners import WorkerRunner  # noqa: E402
from locust.stats import PERCENTILES_TO_REPORT, StatsCSV  # noqa: E402

from loadtest.timings import ResponseTimes  # noqa: E402
from serving._proto import grpc_service_pb2 as pb  # noqa: E402
from serving._proto import grpc_service_pb2_grpc as pb_grpc  # noqa: E402
from serving.client.connect import Security, SecurityError  # noqa: E402

REPORT_KEY = "xorserve_response_times"


class CallFailed(Exception):
    """A failed call, worded the same way every time so that Locust groups the failures by cause."""


@events.init_command_line_parser.add_listener
def add_options(parser) -> None:
    group = parser.add_argument_group("xorserve", "the Open Inference Protocol user (loadtest/locustfile.py)")
    group.add_argument("--model", default="xor", env_var="XORSERVE_MODEL", help="model name to call")
    group.add_argument("--model-version", default="", env_var="XORSERVE_MODEL_VERSION", help="empty: latest")
    group.add_argument("--input-name", default="input", env_var="XORSERVE_INPUT_NAME", help="the model's input")
    group.add_argument("--small-rows", type=int, default=1, env_var="XORSERVE_SMALL_ROWS", help="rows, small infer")
    group.add_argument("--large-rows", type=int, default=64, env_var="XORSERVE_LARGE_ROWS", help="rows, large infer")
    group.add_argument(
        "--deadline-ms", type=float, default=1000.0, env_var="XORSERVE_DEADLINE_MS", help="per-call gRPC deadline"
    )
    group.add_argument(
        "--grpc-tls-ca", default=None, env_var="XORSERVE_TLS_CA", help="CA (PEM) of the server's certificate: TLS"
    )
    group.add_argument(
        "--grpc-tls-cert", default=None, env_var="XORSERVE_TLS_CERT", help="client certificate (PEM), mutual TLS"
    )
    group.add_argument("--grpc-tls-key", default=None, env_var="XORSERVE_TLS_KEY", help="its private key (PEM)")
    group.add_argument(
        "--grpc-token-file", default=None, env_var="XORSERVE_TOKEN_FILE", help="bearer token to send (a file)"
    )


def security(options) -> Security:
    """How the users reach the server (serving.client.connect); SecurityError when the options do not work."""

    def path(value: str | None) -> Path | None:
        return Path(value) if value else None

    return Security(
        path(options.grpc_tls_ca),
        path(options.grpc_tls_cert),
        path(options.grpc_tls_key),
        path(options.grpc_token_file),
    )


@events.init.add_listener
def check_security(environment, **_kwargs) -> None:
    """Files that cannot be read stop Locust now, in one line, not every user with a traceback."""
    options = environment.parsed_options
    if options is None:
        return
    try:
        secured = security(options)
        secured.metadata()
        if secured.tls:
            secured.credentials()
    except SecurityError as error:
        raise SystemExit(f"loadtest/locustfile.py: {error}") from None


@events.init.add_listener
def record_exact_times(environment, **_kwargs) -> None:
    ExactTimes(environment)


class ExactTimes:
    """Collects every call's time in a 0.01-ms histogram; workers ship theirs to the master with each report."""

    def __init__(self, environment) -> None:
        self.environment = environment
        self.times = ResponseTimes()
        environment.events.request.add_listener(self.on_request)
        environment.events.report_to_master.add_listener(self.on_report_to_master)
        environment.events.worker_report.add_listener(self.on_worker_report)
        environment.events.quitting.add_listener(self.on_quitting)

    def on_request(self, name: str, response_time: float, exception: BaseException | None = None, **_kwargs) -> None:
        self.times.record(name, response_time, exception is not None)

    def on_report_to_master(self, client_id: str, data: dict) -> None:
        data[REPORT_KEY] = self.times.drain()

    def on_worker_report(self, client_id: str, data: dict) -> None:
        self.times.merge(ResponseTimes.from_dict(data.get(REPORT_KEY, {})))

    def on_quitting(self, environment, **_kwargs) -> None:
        prefix = environment.parsed_options.csv_prefix if environment.parsed_options else None
        if prefix is None or isinstance(environment.runner, WorkerRunner):
            return
        stats = environment.stats
        elapsed_s = (stats.last_request_timestamp or 0.0) - (stats.start_time or 0.0)
        with open(f"{prefix}_response_times.json", "w", encoding="utf-8") as file:
            json.dump({"elapsed_s": max(elapsed_s, 0.0), "names": self.times.to_dict()}, file)
        # Locust's CSV writer runs on a one-second timer and can miss the run's last moments
        # (locust issues #1806, #2299); write the final tables once more, now that the run is over.
        writer = StatsCSV(environment, PERCENTILES_TO_REPORT)
        with open(f"{prefix}_stats.csv", "w", newline="", encoding="utf-8") as file:
            writer.requests_csv(csv.writer(file))
        with open(f"{prefix}_failures.csv", "w", newline="", encoding="utf-8") as file:
            writer.failures_csv(csv.writer(file))


def _target(host: str) -> str:
    """HOST:PORT, also when given as a URL (Locust's --host and web form invite one)."""
    return host.split("://", 1)[-1].rstrip("/")


def _infer_request(options, rows: int, rng: np.random.Generator) -> pb.ModelInferRequest:
    points = rng.random((rows, 2), dtype=np.float32).astype("<f4")
    tensor = pb.ModelInferRequest.InferInputTensor(name=options.input_name, datatype="FP32", shape=list(points.shape))
    return pb.ModelInferRequest(
        model_name=options.model,
        model_version=options.model_version,
        inputs=[tensor],
        raw_input_contents=[points.tobytes()],
    )


class InferenceUser(User):
    """One client with its own channel, calling the server back to back (no think time: a throughput test)."""

    host = "127.0.0.1:8001"

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.deadline_s = options.deadline_ms / 1000.0
        secured = security(options)
        self.channel = secured.channel(_target(self.host))
        self.call_metadata = secured.metadata() or None  # read once: the token file is not read per call
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        # Payloads are built once: the load generator should spend its CPU on calls, not on numpy.
        rng = np.random.default_rng()
        self.small = (options.small_rows, _infer_request(options, options.small_rows, rng))
        self.large = (options.large_rows, _infer_request(options, options.large_rows, rng))
        self.metadata_request = pb.ModelMetadataRequest(name=options.model, version=options.model_version)

    def on_stop(self) -> None:
        self.channel.close()

    @task(8)
    def infer_small(self) -> None:
        self._infer(*self.small)

    @task(2)
    def infer_large(self) -> None:
        self._infer(*self.large)

    @task(1)
    def model_metadata(self) -> None:
        def check(response: pb.ModelMetadataResponse) -> None:
            if response.name != self.metadata_request.name:
                raise CallFailed(f"metadata names model {response.name!r}, asked for {self.metadata_request.name!r}")

        self._call("ModelMetadata", self.stub.ModelMetadata, self.metadata_request, check)

    def _infer(self, rows: int, request: pb.ModelInferRequest) -> None:
        def check(response: pb.ModelInferResponse) -> None:
            if not response.outputs or len(response.raw_output_contents) != len(response.outputs):
                raise CallFailed(
                    f"{len(response.outputs)} outputs with {len(response.raw_output_contents)} raw contents"
                )
            for output in response.outputs:
                if not output.shape or output.shape[0] != rows:
                    raise CallFailed(f"output {output.name!r} has shape {list(output.shape)} for {rows} rows")

        self._call(f"ModelInfer[{rows}]", self.stub.ModelInfer, request, check)

    def _call(self, name: str, method, request, check) -> None:
        """One call, one request event; a failure is recorded, never raised."""
        start = time.perf_counter()
        response_length = 0
        exception: Exception | None = None
        try:
            response = method(request, timeout=self.deadline_s, metadata=self.call_metadata)
            response_time = (time.perf_counter() - start) * 1000.0
            response_length = response.ByteSize()
            check(response)
        except grpc.RpcError as error:
            response_time = (time.perf_counter() - start) * 1000.0
            exception = CallFailed(f"{error.code().name}: {error.details()}")
        except CallFailed as error:
            exception = error
        self.environment.events.request.fire(
            request_type="grpc",
            name=name,
            response_time=round(response_time, 2),
            response_length=response_length,
            exception=exception,
            context={},
        )
