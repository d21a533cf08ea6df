"""Draining under load (docs/serving.md, "Draining"): SIGTERM while 32 unary clients and 3 streams are
calling, at several points of the load, with one worker and with two.

Each round is bench/drain.py's: every request is recorded with the time it was sent and how it ended.
None sent before the signal may fail; one sent after it is answered or refused UNAVAILABLE, never
CANCELLED or INTERNAL; the server exits 0 within --grace-s although the clients keep sending.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def drain_rounds(*args: str) -> list[dict]:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "drain.py"), "--json", *args],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert done.stdout.strip(), done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_under_load_fails_no_request_sent_before_it_and_refuses_later_ones_unavailable(workers):
    # The signal lands at three points of the load; the clients back off 10 ms after a refusal, but
    # the last round's do not pause at all.
    rounds = drain_rounds("--workers", str(workers), "--rounds", "3", "--signal-after", "0.3,0.8,1.3", "--grace-s", "8")
    rounds += drain_rounds("--workers", str(workers), "--rounds", "1", "--signal-after", "0.6", "--backoff-s", "0")
    for result in rounds:
        assert result["broken"] == [], result
        assert result["sent_before"] > 100, result  # the load was under way
        assert result["after"].get("OK", 0) > 0, result  # requests sent just after the signal are served...
        assert result["after"].get("UNAVAILABLE", 0) > 0, result  # ...and the clients that went on were refused
        assert result["exit_code"] == 0 and result["exit_after_s"] < result["grace_s"], result


@pytest.mark.slow
def test_drain_delay_keeps_serving_before_refusing():
    # --drain-delay-s 1: for the first second after SIGTERM every request is served (the load balancer's
    # time to take the server out); only then are new ones refused, and the server exits within --grace-s.
    (result,) = drain_rounds("--rounds", "1", "--signal-after", "0.3", "--grace-s", "5", "--", "--drain-delay-s", "1")
    assert result["broken"] == [], result
    assert result["exit_after_s"] > 1.0, result
    assert result["after"]["OK"] > result["after"].get("UNAVAILABLE", 0), result
