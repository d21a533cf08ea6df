"""One client's cancellation, deadline or disconnect never touches another's request.

Background clients (10 s deadlines: unary inference, a stream, and grpc.health.v1 checks) call the
server beside a storm: clients whose 1 ms deadlines pass while their 64-row requests are decoded,
queued, batched or run, and clients that open streams, send 50 requests and cancel after the first
answer. Every background call must be answered OK, whether the server runs batches inline (the
default), on its instance threads (--inline-max-us 0), one request at a time (--no-batching), or holds
them for a queue delay so that they share batches with the storm's (--max-queue-delay-us).

The server runs on one core and the clients (a child process: gRPC's own client threads included) on
another, as the benchmarks pin them. There, grpcio 1.85's aio server, serving methods registered with
`add_registered_method_handlers` (as generated code does), cancelled fresh calls of other clients before
they reached a handler: on 2026-12-02, 8 of 8 parameter runs failed, 4 to 23 CANCELLED of about 4,200 to
5,200 background calls each; with serving.server.servicer.GenericOnly (every service registered
generically) 12 of 12 passed. With the server and the clients on ONE core both registrations still lose
0.1 to 1.1 % of the background calls that way: a residual, not fixed, in docs/serving.md ("Inside the
server") with the commands that reproduce it (ISOLATION_SERVER_CORE and ISOLATION_CLIENT_CORE choose
the cores).
The clients are tests/isolation_clients.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from serving.client.launch import ServerProcess

STORM_S = 6.0
CLIENTS = Path(__file__).with_name("isolation_clients.py")


def cores() -> tuple[str, str]:
    """The server's core (the last this process may use: away from core 0's interrupts on most machines)
    and the clients' (another), unless ISOLATION_SERVER_CORE / ISOLATION_CLIENT_CORE say otherwise."""
    allowed = sorted(os.sched_getaffinity(0))
    server = os.environ.get("ISOLATION_SERVER_CORE", str(allowed[-1]))
    others = [str(c) for c in allowed if str(c) != server]
    clients = os.environ.get("ISOLATION_CLIENT_CORE", others[0] if others else "")
    if not clients:
        pytest.skip("needs two cores: one for the server, one for its clients")
    return server, clients


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags", [[], ["--inline-max-us", "0"], ["--no-batching"], ["--max-queue-delay-us", "500"]], ids=" ".join
)
def test_a_storm_of_expiring_and_cancelled_calls_fails_no_other_clients_request(model_repository, flags):
    server_core, client_core = cores()
    with ServerProcess.start(model_repository, ["--device", "cpu", *flags], cpus=server_core) as server:
        clients = subprocess.run(
            ["taskset", "-c", client_core, sys.executable, str(CLIENTS), server.url, str(STORM_S)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=CLIENTS.parent,
        )
        log = "\n".join(server.output)
    assert clients.returncode == 0, clients.stderr[-3000:]
    counts = json.loads(clients.stdout.splitlines()[-1])
    background, stormy = Counter(counts["background"]), Counter(counts["storm"])
    assert set(background) == {"OK"}, background
    assert background["OK"] > 200, background
    # The storm happened: deadlines passed and streams were cancelled.
    assert stormy["DEADLINE_EXCEEDED"] > 50, stormy
    assert stormy["cancelled stream"] > 10, stormy
    assert "Traceback" not in log and "ExecuteBatchError" not in log, log[-3000:]
