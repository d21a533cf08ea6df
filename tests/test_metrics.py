"""The server's histograms: counted in bulk by the server, shown exactly as prometheus_client's own would be."""

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from serving.server.metrics import Metrics, histograms


def samples(registry: CollectorRegistry, family: str) -> dict:
    text = generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for parsed in text_string_to_metric_families(text)
        if parsed.name == family
        for sample in parsed.samples
        if not sample.name.endswith("_created")
    }


@pytest.mark.parametrize("name", sorted(histograms(64)))
def test_a_histogram_reads_as_prometheus_clients_own_for_the_same_observations(name):
    values = np.random.default_rng(3).lognormal(-6, 3, size=500).tolist() + [0.0, 1.0, 2.5, 64.0, 1e9]
    metrics = Metrics(max_batch_size=64)
    observations = metrics.observations(name, ("xor", "1"))
    for value in values[:300]:
        observations.observe(value)
    observations.flush()  # two flushes: the counts add up
    for value in values[300:]:
        observations.observe(value)
    observations.flush()

    reference = CollectorRegistry()
    help_text, bounds = histograms(64)[name]
    histogram = Histogram(name, help_text, ["model", "version"], buckets=bounds, registry=reference)
    for value in values:
        histogram.labels("xor", "1").observe(value)

    got, want = samples(metrics.registry, name), samples(reference, name)
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-12), key


def test_the_stores_behind_the_histograms_are_not_shown():
    metrics = Metrics(max_batch_size=64)
    metrics.observations("xorserve_queue_duration_seconds", ("xor", "1")).observe(0.001)
    text = generate_latest(metrics.registry).decode()
    assert "_store" not in text
    assert "# TYPE xorserve_queue_duration_seconds histogram" in text


@pytest.mark.parametrize("path", ["/", "/../../etc/passwd", "/metricsx", "/metrics/..", "/favicon.ico"])
def test_the_metrics_endpoint_answers_404_off_metrics(path):
    import http.client

    from serving.server.metrics import serve_metrics

    registry = CollectorRegistry()
    Histogram("xorserve_probe_seconds", "a probe", registry=registry).observe(0.5)
    server = serve_metrics("127.0.0.1", 0, registry)
    try:
        connection = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=10)
        connection.request("GET", path)
        response = connection.getresponse()
        assert response.status == 404
        assert b"xorserve_probe" not in response.read()
        connection.request("GET", "/metrics")
        page = connection.getresponse()
        assert page.status == 200
        assert b"xorserve_probe_seconds_count 1.0" in page.read()
    finally:
        server.shutdown()
        server.server_close()
