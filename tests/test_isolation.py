"""One client's cancellation, deadline or disconnect never touches another's request.

Background clients (10 s deadlines: unary inference, a stream, and grpc.health.v1 checks) call the
server beside a storm: clients whose 1 ms deadlines pass while their 64-row requests are decoded,
queued, batched or run, and clients that open streams, send 50 requests and cancel after the first
answer. Every background call must be answered OK, whether the server runs batches inline (the
default), on its instance threads (--inline-max-us 0), one request at a time (--no-batching), or holds
them for a queue delay so that they share batches with the storm's (--max-queue-delay-us).

The server and the clients (a child process: gRPC's own client threads included) share one CPU core,
so that on any machine the storm outruns the server's event loop. That is when grpcio 1.85's aio
server, serving methods registered with `add_registered_method_handlers` (as generated code does),
cancelled fresh calls of other clients before they reached a handler: 6 to 24 of about 2,000 background
requests per 8 s on one core, 3 of 2,036 on the CI machine's cores. serving.server.servicer.GenericOnly
makes every service register its handlers generically instead. A residual that this test still meets
beside other processes' heavy work (grpc core cancels a fresh call whose initial metadata it fails to
receive) is in docs/serving.md, "Inside the server", with the commands that reproduce it.
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


def one_core() -> str:
    """A core this process may run on (the last: away from core 0's interrupts on most machines)."""
    return str(max(os.sched_getaffinity(0)))


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags", [[], ["--inline-max-us", "0"], ["--no-batching"], ["--max-queue-delay-us", "500"]], ids=" ".join
)
def test_a_storm_of_expiring_and_cancelled_calls_fails_no_other_clients_request(model_repository, flags):
    core = one_core()
    with ServerProcess.start(model_repository, ["--device", "cpu", *flags], cpus=core) as server:
        clients = subprocess.run(
            ["taskset", "-c", core, sys.executable, str(CLIENTS), server.url, str(STORM_S)],
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
