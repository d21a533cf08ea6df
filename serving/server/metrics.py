"""Prometheus metrics of the server, in a registry of its own, exposed over HTTP on --metrics-port.

Per model version: success and failure counters (failures by reason, the gRPC status name), request,
queue and compute duration histograms, a batch-size histogram in rows and one in requests, the queue
depth, and an info gauge whose `provider` label says which execution provider runs the model.
Children are bound once per model so the request path does no label lookups.

The request path does not touch prometheus_client: it counts into plain lists on the event loop
(`Tally`, `Observations`: a list append), which `Metrics.flush` adds to prometheus_client in bulk, every
FLUSH_S and before each scrape. prometheus_client has no public way to add many observations to a
histogram at once (`Histogram.observe` takes one, at 1 to 4 us: a lock and a Python loop over the
buckets, several per request), so the server counts its histograms' buckets itself: at flush, numpy
sorts the values into buckets, and one `Gauge.inc` per non-empty bucket adds them to a gauge family
`<histogram>_store` with an `le` label. `HistogramView`, the collector that /metrics shows, turns each
store back into a Prometheus histogram (`_bucket`, `_count`, `_sum`). Only public API: `Gauge.inc`,
custom collectors and `HistogramMetricFamily`.

With several worker processes (`multiprocess=True`), prometheus_client's multiprocess mode keeps the
values in files under PROMETHEUS_MULTIPROC_DIR (set before prometheus_client is first imported) and
the parent serves their sum through the same `HistogramView` (the stores are gauges in "sum" mode, so
a dead worker's observations stay counted); each worker flushes on its timer (the parent cannot ask it to before a
scrape), so a scrape may lag by FLUSH_S. Each worker also reports its own count of answered requests,
`xorserve_worker_inference_success{pid=...}` (a gauge, because counters are summed over processes).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
from collections.abc import Callable, Iterator
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, make_wsgi_app
from prometheus_client.core import HistogramMetricFamily, Metric

UNKNOWN_MODEL = "_unknown"
FLUSH_S = 0.1  # how stale the exposed values may be while a worker serves; scrapes of one process flush first
_SCRAPE_FLUSH_WAIT_S = 2.0
_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


STORE_SUFFIX = "_store"
SUM_LE = "sum"  # the store's child that holds a histogram's sum


def _power_of_two_buckets(largest: int) -> tuple[float, ...]:
    buckets, size = [], 1
    while size < largest:
        buckets.append(float(size))
        size *= 2
    buckets.append(float(max(largest, 1)))
    return tuple(buckets)


class Tally:
    """A counter incremented on the event loop and added to its Prometheus child at flush."""

    __slots__ = ("_child", "count")

    def __init__(self, child: Counter) -> None:
        self._child = child
        self.count = 0

    def inc(self, amount: int = 1) -> None:
        self.count += amount

    def flush(self) -> None:
        if self.count:
            count, self.count = self.count, 0
            self._child.inc(count)


def histograms(max_batch_size: int) -> dict[str, tuple[str, tuple[float, ...]]]:
    """The server's histograms: name -> (help, upper bounds of the buckets before +Inf)."""
    sizes = _power_of_two_buckets(max_batch_size)
    return {
        "xorserve_request_duration_seconds": (
            "ModelInfer time in the server, from decoding the request to encoding the response",
            _LATENCY_BUCKETS,
        ),
        "xorserve_queue_duration_seconds": ("Time a request waited in the batcher's queue", _LATENCY_BUCKETS),
        "xorserve_compute_duration_seconds": ("ONNX Runtime time per batch", _LATENCY_BUCKETS),
        "xorserve_batch_size_rows": ("Rows per batch run by ONNX Runtime", sizes),
        "xorserve_batch_size_requests": ("Requests combined into each batch", sizes),
    }


def bucket_labels(bounds: tuple[float, ...]) -> list[str]:
    """The `le` values of the buckets, as Prometheus writes them ("0.0001", "1.0", "+Inf")."""
    return [repr(float(bound)) for bound in bounds] + ["+Inf"]


class Observations:
    """Histogram observations collected on the event loop and added, in bulk at flush, to a histogram's store.

    `observe` only appends to a list; flush sorts the values into the buckets with numpy and adds each
    bucket's count (and the sum) to the store's children.
    """

    __slots__ = ("_bounds", "_children", "_sum", "_values", "observe")

    def __init__(self, store: Gauge, bounds: tuple[float, ...], labels: tuple[str, ...]) -> None:
        self._bounds = np.asarray(bounds, dtype=np.float64)
        self._children = [store.labels(*labels, le) for le in bucket_labels(bounds)]
        self._sum = store.labels(*labels, SUM_LE)
        self._values: list[float] = []
        self.observe = self._values.append

    def flush(self) -> None:
        values = self._values
        if not values:
            return
        self._values = []
        self.observe = self._values.append
        array = np.asarray(values, dtype=np.float64)
        # The first bucket whose upper bound is >= the value, as Prometheus's `le` means; past the last, +Inf.
        counts = np.bincount(np.searchsorted(self._bounds, array, side="left"), minlength=len(self._children))
        for child, count in zip(self._children, counts.tolist(), strict=True):
            if count:
                child.inc(count)
        self._sum.inc(float(array.sum()))


class HistogramView:
    """A collector that passes every metric of `source` through, except each histogram's store, which it shows
    as the Prometheus histogram it counts: cumulative `_bucket`s, `_count` and `_sum`, labelled as before."""

    def __init__(self, source: CollectorRegistry, specs: dict[str, tuple[str, tuple[float, ...]]]) -> None:
        self._source = source
        self._specs = {
            name + STORE_SUFFIX: (name, help_text, bucket_labels(bounds)) for name, (help_text, bounds) in specs.items()
        }

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator[Metric]:
        for family in self._source.collect():
            spec = self._specs.get(family.name)
            yield family if spec is None else self._histogram(family, *spec)

    @staticmethod
    def _histogram(store: Metric, name: str, help_text: str, les: list[str]) -> HistogramMetricFamily:
        series: dict[tuple[tuple[str, str], ...], dict[str, float]] = {}
        for sample in store.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
            series.setdefault(labels, {})[sample.labels["le"]] = sample.value
        names = [k for k, _ in next(iter(series))] if series else ["model", "version"]
        family = HistogramMetricFamily(name, help_text, labels=names)
        for labels, values in series.items():
            cumulative, buckets = 0.0, []
            for le in les:
                cumulative += values.get(le, 0.0)
                buckets.append((le, cumulative))
            family.add_metric([v for _, v in labels], buckets, sum_value=values.get(SUM_LE, 0.0))
        return family


class ModelMetrics:
    """The metrics of one model version, bound to its labels; record on the event loop only."""

    def __init__(self, metrics: Metrics, labels: tuple[str, str]) -> None:
        m = metrics
        self.success = Tally(m.successes.labels(*labels))
        self.request_seconds = m.observations("xorserve_request_duration_seconds", labels)
        self.queue_seconds = m.observations("xorserve_queue_duration_seconds", labels)
        self.compute_seconds = m.observations("xorserve_compute_duration_seconds", labels)
        self.batch_rows = m.observations("xorserve_batch_size_rows", labels)
        self.batch_requests = m.observations("xorserve_batch_size_requests", labels)
        self._parts = (
            self.success,
            self.request_seconds,
            self.queue_seconds,
            self.compute_seconds,
            self.batch_rows,
            self.batch_requests,
        )
        self._queue_depth_gauge = m.queue_depth.labels(*labels)
        self._multiprocess = m.multiprocess
        self._worker_success = m.worker_successes.labels(*labels) if m.worker_successes is not None else None
        self._answered = 0
        self._queue_depth: Callable[[], int] | None = None
        self._failures = m.failures
        self.labels = labels

    def failure(self, reason: str) -> None:
        self._failures.labels(*self.labels, reason).inc()

    def ran_alone(self, rows: int, compute_s: float) -> None:
        """A request run at once, without waiting in the queue: a batch of one."""
        self.queue_seconds.observe(0.0)
        self.batch_requests.observe(1)
        self.batch_rows.observe(rows)
        self.compute_seconds.observe(compute_s)

    def batch(self, requests: int, rows: int, compute_s: float) -> None:
        self.batch_requests.observe(requests)
        self.batch_rows.observe(rows)
        self.compute_seconds.observe(compute_s)

    def track_queue_depth(self, depth: Callable[[], int]) -> None:
        """Reports `depth()` as the queue depth (read at scrape time; at flush with several workers)."""
        self._queue_depth = depth
        if not self._multiprocess:
            self._queue_depth_gauge.set_function(depth)

    def flush(self) -> None:
        if self._worker_success is not None and self.success.count:
            self._answered += self.success.count
            self._worker_success.set(self._answered)
        for part in self._parts:
            part.flush()
        if self._multiprocess and self._queue_depth is not None:
            self._queue_depth_gauge.set(self._queue_depth())


class _FlushBeforeScrape:
    """Registered first in the registry: a scrape asks the event loop to flush before anything is read."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> list:
        return []

    def collect(self) -> list:
        self._metrics.flush_from_any_thread()
        return []


class Metrics:
    """The server's metrics; `serve(host, port)` exposes them as text on GET /metrics."""

    def __init__(self, max_batch_size: int, multiprocess: bool = False) -> None:
        if multiprocess and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            raise ValueError(
                "multiprocess metrics need PROMETHEUS_MULTIPROC_DIR set before prometheus_client is imported"
            )
        # What the metrics are kept in, and what /metrics shows: the stores turned back into histograms.
        self.store = CollectorRegistry()
        self.specs = histograms(max_batch_size)
        self.registry = CollectorRegistry()
        self.registry.register(_FlushBeforeScrape(self))
        self.registry.register(HistogramView(self.store, self.specs))
        self.multiprocess = multiprocess
        self._models: list[ModelMetrics] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        labels = ("model", "version")
        self.successes = Counter(
            "xorserve_inference_success", "Inference requests answered OK", labels, registry=self.store
        )
        self.failures = Counter(
            "xorserve_inference_failure",
            "Inference requests answered with an error, by gRPC status",
            (*labels, "reason"),
            registry=self.store,
        )
        # "sum": with several workers, the parent adds up every worker's counts, a dead one's included.
        self.stores = {
            name: Gauge(name + STORE_SUFFIX, help_text, (*labels, "le"), registry=self.store, multiprocess_mode="sum")
            for name, (help_text, _) in self.specs.items()
        }
        self.queue_depth = Gauge(
            "xorserve_queue_depth",
            "Requests waiting in the batcher's queue",
            labels,
            registry=self.store,
            multiprocess_mode="livesum",
        )
        self.info = Gauge(
            "xorserve_model_info",
            "1 for each loaded model version; the provider label is the execution provider running it",
            (*labels, "provider"),
            registry=self.store,
            multiprocess_mode="livemax",
        )
        self.loads = Counter(
            "xorserve_model_loads",
            "Loads of model versions, by result (ok, failed)",
            ("model", "version", "result"),
            registry=self.store,
        )
        self.unloads = Counter(
            "xorserve_model_unloads",
            "Model versions unloaded (replaced, removed or unloaded)",
            labels,
            registry=self.store,
        )
        self.loaded = Gauge(
            "xorserve_loaded_versions",
            "Versions of the model loaded and serving",
            ("model",),
            registry=self.store,
            multiprocess_mode="livemax",
        )
        # Per worker (the multiprocess collector adds a pid label); a dead worker's series goes, its
        # requests stay counted in xorserve_inference_success.
        self.worker_successes = (
            Gauge(
                "xorserve_worker_inference_success",
                "Inference requests this worker process answered OK (pid label; with --workers > 1 only)",
                labels,
                registry=self.store,
                multiprocess_mode="liveall",
            )
            if multiprocess
            else None
        )
        self.auth_failures = Counter(
            "xorserve_auth_failures",
            "RPCs refused UNAUTHENTICATED (--auth-token-file), by reason: missing, malformed or wrong token",
            ("reason",),
            registry=self.store,
        )
        self._http: WSGIServer | None = None

    def auth_failure(self, reason: str) -> None:
        self.auth_failures.labels(reason).inc()

    def observations(self, histogram: str, labels: tuple[str, ...]) -> Observations:
        """The request path's collector of one histogram's observations for one model version."""
        return Observations(self.stores[histogram], self.specs[histogram][1], labels)

    def for_model(self, model: str, version: str, provider: str) -> ModelMetrics:
        self.info.labels(model, version, provider).set(1)
        metrics = ModelMetrics(self, (model, version))
        self._models.append(metrics)
        return metrics

    def model_load(self, model: str, version: str, ok: bool) -> None:
        self.loads.labels(model, version, "ok" if ok else "failed").inc()

    def model_unload(self, metrics: ModelMetrics, model: str, version: str, provider: str) -> None:
        """A version left: its last counts are flushed, and its info and queue depth series go."""
        metrics.flush()
        self._models.remove(metrics)
        self.unloads.labels(model, version).inc()
        if not any(m.labels == (model, version) for m in self._models):  # not reloaded under the same labels
            with contextlib.suppress(KeyError):
                self.info.remove(model, version, provider)
            with contextlib.suppress(KeyError):
                self.queue_depth.remove(model, version)

    def loaded_versions(self, model: str, count: int) -> None:
        self.loaded.labels(model).set(count)

    def start(self) -> None:
        """Flushes on the running event loop every FLUSH_S from now on (and on demand before scrapes)."""
        self._loop = asyncio.get_running_loop()
        self._timer = self._loop.call_later(FLUSH_S, self._tick)

    def _tick(self) -> None:
        self.flush()
        self._timer = self._loop.call_later(FLUSH_S, self._tick)

    def flush(self) -> None:
        """Adds what the request path counted to the Prometheus metrics; on the event loop only."""
        for metrics in self._models:
            metrics.flush()

    def flush_from_any_thread(self) -> None:
        """Has the event loop flush, and waits for it (briefly: a scrape must not hang on a busy loop)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            if asyncio.get_running_loop() is loop:
                self.flush()
                return
        except RuntimeError:
            pass  # not on a loop: the usual case, the HTTP server's thread
        done = threading.Event()

        def flush() -> None:
            try:
                self.flush()
            finally:
                done.set()

        try:
            loop.call_soon_threadsafe(flush)
        except RuntimeError:  # the loop closed meanwhile
            return
        done.wait(_SCRAPE_FLUSH_WAIT_S)

    def failure(self, model: str, version: str, reason: str) -> None:
        """A failure not tied to a loaded model version (unknown model or version, not loaded)."""
        self.failures.labels(model, version, reason).inc()

    def serve(self, host: str, port: int) -> int:
        """Starts the HTTP endpoint in a daemon thread; returns the port it listens on."""
        self._http = serve_metrics(host, port, self.registry)
        return self._http.server_port

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._loop is not None and not self._loop.is_closed():
            self.flush()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


METRICS_PATH = "/metrics"


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args) -> None:
        pass  # a line on stderr per scrape would flood the log


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


def serve_metrics(host: str, port: int, registry: CollectorRegistry) -> WSGIServer:
    """Serves `registry` at GET /metrics (with prometheus_client's `name[]=` filter) in a daemon thread,
    and 404 at any other path; stop it with `.shutdown()` and `.server_close()`.

    prometheus_client's own start_http_server answers the metrics page for every path, which makes
    `/../../etc/passwd` look served to a scanner."""
    metrics_page = make_wsgi_app(registry)

    def app(environ, start_response):
        if environ.get("PATH_INFO") != METRICS_PATH:
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [f"not found: the metrics are at {METRICS_PATH}\n".encode()]
        return metrics_page(environ, start_response)

    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]  # IPv6 hosts too
    server_class = type("MetricsServer", (_ThreadingWSGIServer,), {"address_family": family})
    server = make_server(host, port, app, server_class, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
