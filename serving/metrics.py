"""Prometheus metrics of the server, in a registry of its own, exposed over HTTP on --metrics-port.

Per model version: success and failure counters (failures by reason, the gRPC status name), request,
queue and compute duration histograms, a batch-size histogram in rows and one in requests, the queue
depth, and an info gauge whose `provider` label says which execution provider runs the model.
Children are bound once per model so the request path does no label lookups.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

UNKNOWN_MODEL = "_unknown"
_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def _power_of_two_buckets(largest: int) -> tuple[float, ...]:
    buckets, size = [], 1
    while size < largest:
        buckets.append(float(size))
        size *= 2
    buckets.append(float(max(largest, 1)))
    return tuple(buckets)


@dataclass
class ModelMetrics:
    """The metric children of one model version, bound to its labels."""

    success: Counter
    request_seconds: Histogram
    queue_seconds: Histogram
    compute_seconds: Histogram
    batch_rows: Histogram
    batch_requests: Histogram
    queue_depth: Gauge
    _failures: Counter
    _labels: tuple[str, str]

    def failure(self, reason: str) -> None:
        self._failures.labels(*self._labels, reason).inc()


class Metrics:
    """The server's metrics; `serve(host, port)` exposes them as text on GET /metrics."""

    def __init__(self, max_batch_size: int) -> None:
        self.registry = CollectorRegistry()
        labels = ("model", "version")
        self._success = Counter(
            "xorserve_inference_success", "Inference requests answered OK", labels, registry=self.registry
        )
        self._failure = Counter(
            "xorserve_inference_failure",
            "Inference requests answered with an error, by gRPC status",
            (*labels, "reason"),
            registry=self.registry,
        )
        self._request = Histogram(
            "xorserve_request_duration_seconds",
            "ModelInfer time in the server, from decoding the request to encoding the response",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._queue = Histogram(
            "xorserve_queue_duration_seconds",
            "Time a request waited in the batcher's queue",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._compute = Histogram(
            "xorserve_compute_duration_seconds",
            "ONNX Runtime time per batch",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._batch_rows = Histogram(
            "xorserve_batch_size_rows",
            "Rows per batch run by ONNX Runtime",
            labels,
            buckets=_power_of_two_buckets(max_batch_size),
            registry=self.registry,
        )
        self._batch_requests = Histogram(
            "xorserve_batch_size_requests",
            "Requests combined into each batch",
            labels,
            buckets=_power_of_two_buckets(max_batch_size),
            registry=self.registry,
        )
        self._queue_depth = Gauge(
            "xorserve_queue_depth", "Requests waiting in the batcher's queue", labels, registry=self.registry
        )
        self._info = Gauge(
            "xorserve_model_info",
            "1 for each loaded model version; the provider label is the execution provider running it",
            (*labels, "provider"),
            registry=self.registry,
        )
        self._http = None
        self._thread: threading.Thread | None = None

    def for_model(self, model: str, version: str, provider: str) -> ModelMetrics:
        self._info.labels(model, version, provider).set(1)
        labels = (model, version)
        return ModelMetrics(
            success=self._success.labels(*labels),
            request_seconds=self._request.labels(*labels),
            queue_seconds=self._queue.labels(*labels),
            compute_seconds=self._compute.labels(*labels),
            batch_rows=self._batch_rows.labels(*labels),
            batch_requests=self._batch_requests.labels(*labels),
            queue_depth=self._queue_depth.labels(*labels),
            _failures=self._failure,
            _labels=labels,
        )

    def failure(self, model: str, version: str, reason: str) -> None:
        """A failure not tied to a loaded model version (unknown model or version, not loaded)."""
        self._failure.labels(model, version, reason).inc()

    def serve(self, host: str, port: int) -> int:
        """Starts the HTTP endpoint in a daemon thread; returns the port it listens on."""
        self._http, self._thread = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
