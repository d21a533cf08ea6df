"""Exact response times of a Locust run: per-request histograms at 0.01 ms, mergeable across workers.

Locust buckets response times to whole milliseconds (and coarser above 100 ms) before it computes
percentiles, which says nothing about a service that answers in well under a millisecond. The
locustfile reports every call's time to two decimals, so a histogram keyed by hundredths of a
millisecond loses nothing: percentiles computed from it are exact at that resolution.

Only successful calls are timed. A failed call is counted, not timed: against a dead server every
call fails in a fraction of a millisecond, and mixing those times in would report a fast service (a
low p99, a high rate) where there is none. So the percentiles, the mean and `rps` describe the calls
that succeeded; `requests`, `failures` and `fail_ratio` count them all, as Locust's own tables do.
This module does not import Locust, so the runner can read the histograms without gevent's
monkey-patching.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

HUNDREDTHS_PER_MS = 100
PERCENTILES = {"p50_ms": 0.50, "p95_ms": 0.95, "p99_ms": 0.99}


@dataclass
class Histogram:
    """Calls of one request name: counts, failures, and the successful calls' times in hundredths of a millisecond."""

    requests: int = 0
    failures: int = 0
    hundredths: Counter[int] = field(default_factory=Counter)

    def record(self, response_time_ms: float, failed: bool) -> None:
        self.requests += 1
        if failed:
            self.failures += 1
        else:
            self.hundredths[round(response_time_ms * HUNDREDTHS_PER_MS)] += 1

    @property
    def successes(self) -> int:
        return self.requests - self.failures

    def merge(self, other: Histogram) -> None:
        self.requests += other.requests
        self.failures += other.failures
        self.hundredths.update(other.hundredths)

    def percentile_ms(self, q: float) -> float | None:
        """Nearest-rank percentile of the successful calls: the smallest time that at least a fraction q of
        them did not exceed; None without any."""
        if self.successes == 0:
            return None
        rank = max(1, math.ceil(q * self.successes))
        seen = 0
        for key in sorted(self.hundredths):
            seen += self.hundredths[key]
            if seen >= rank:
                return key / HUNDREDTHS_PER_MS
        raise ValueError(f"histogram holds {seen} times but counts {self.successes} successful requests")

    def to_dict(self) -> dict:
        return {"requests": self.requests, "failures": self.failures, "hundredths": dict(self.hundredths)}

    @classmethod
    def from_dict(cls, data: dict) -> Histogram:
        # JSON turns the integer keys into strings; msgpack (Locust's worker reports) keeps them.
        hundredths = Counter({int(key): int(count) for key, count in data["hundredths"].items()})
        return cls(int(data["requests"]), int(data["failures"]), hundredths)


@dataclass
class ResponseTimes:
    """Histograms by request name, as one Locust process (or a master, merged from its workers) saw them."""

    by_name: dict[str, Histogram] = field(default_factory=dict)

    def record(self, name: str, response_time_ms: float, failed: bool) -> None:
        self.by_name.setdefault(name, Histogram()).record(response_time_ms, failed)

    def merge(self, other: ResponseTimes) -> None:
        for name, histogram in other.by_name.items():
            self.by_name.setdefault(name, Histogram()).merge(histogram)

    def total(self) -> Histogram:
        total = Histogram()
        for histogram in self.by_name.values():
            total.merge(histogram)
        return total

    def drain(self) -> dict:
        """Everything recorded since the last drain, as a dict (a worker's share of one report)."""
        data = self.to_dict()
        self.by_name = {}
        return data

    def to_dict(self) -> dict:
        return {name: histogram.to_dict() for name, histogram in self.by_name.items()}

    @classmethod
    def from_dict(cls, data: dict) -> ResponseTimes:
        return cls({name: Histogram.from_dict(histogram) for name, histogram in data.items()})


def row(histogram: Histogram, elapsed_s: float) -> dict:
    """One summary row: counts of all calls; rate and exact times (in milliseconds) of the successful ones."""
    total_ms = sum(key * count for key, count in histogram.hundredths.items()) / HUNDREDTHS_PER_MS
    ok = histogram.successes
    summary = {
        "requests": histogram.requests,
        "failures": histogram.failures,
        "fail_ratio": histogram.failures / histogram.requests if histogram.requests else 0.0,
        "successes": ok,
        "rps": round(ok / elapsed_s, 2) if elapsed_s > 0 else 0.0,  # successful calls per second
        "mean_ms": round(total_ms / ok, 3) if ok else None,
    }
    summary.update({key: histogram.percentile_ms(q) for key, q in PERCENTILES.items()})
    summary["max_ms"] = max(histogram.hundredths) / HUNDREDTHS_PER_MS if histogram.hundredths else None
    return summary


def summarize(times: ResponseTimes, elapsed_s: float) -> dict:
    """Per-task rows (by request name) and the total row."""
    return {
        "tasks": {name: row(times.by_name[name], elapsed_s) for name in sorted(times.by_name)},
        "total": row(times.total(), elapsed_s),
    }
