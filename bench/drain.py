"""Drain under load: SIGTERM while clients are calling, and what became of every request.

    .venv/bin/python bench/drain.py [--workers 1] [--rounds 5] [--clients 32] [--streams 3]
                                    [--signal-after 0.5,1.0,1.5] [--grace-s 10] [--backoff-s 0.01]
                                    [--json] [-- SERVE_FLAGS...]

Each round starts `xorserve serve` on models/ (a subprocess, --device cpu), runs `--clients` unary
clients (ModelInfer, 1 row, back to back, each on its own channel) and `--streams` ModelStreamInfer
clients (one request, then its answer, then the next) for `--signal-after` seconds (a list: round i
takes item i modulo its length, so the signal lands at several points), sends SIGTERM, and lets the
clients go on sending until the server exited. A client whose call failed waits --backoff-s (10 ms)
before its next one, as a real client would back off; 0 is a client that keeps sending regardless.

Every request is recorded with the time it was sent and how it ended. The promises (docs/serving.md,
"Draining"):
- every request sent before the signal is answered OK;
- a request sent after it is answered OK or refused UNAVAILABLE (retryable), never anything else;
- the server exits 0 within --grace-s of the signal, although the clients keep sending.

Prints one line per round (`sent before SIGTERM`, `failed`, the codes after it, exit code and time)
and exits 1 when a promise was broken in any round. `--json` prints the rounds as JSON instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from serving._proto import grpc_service_pb2 as pb  # noqa: E402
from serving._proto import grpc_service_pb2_grpc as pb_grpc  # noqa: E402
from serving.client.launch import ServerProcess  # noqa: E402

BACKOFF_S = 0.01
CALL_TIMEOUT_S = 30.0
ALLOWED_AFTER = {"OK", "UNAVAILABLE"}


@dataclass
class Round:
    workers: int
    signal_after_s: float
    sent_before: int = 0
    failed_before: int = 0
    failed_before_codes: dict[str, int] = field(default_factory=dict)
    after: dict[str, int] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)
    exit_code: int | None = None
    exit_after_s: float | None = None
    grace_s: float = 0.0

    @property
    def broken(self) -> list[str]:
        problems = []
        if self.failed_before:
            problems.append(f"{self.failed_before} requests sent before the signal failed: {self.failed_before_codes}")
        wrong = {code: n for code, n in self.after.items() if code not in ALLOWED_AFTER}
        if wrong:
            examples = {code: self.examples.get(code, "") for code in wrong}
            problems.append(f"requests sent after the signal ended neither OK nor UNAVAILABLE: {wrong} {examples}")
        if self.exit_code != 0:
            problems.append(f"exit code {self.exit_code}")
        if self.exit_after_s is None or self.exit_after_s > self.grace_s:
            problems.append(f"exit {self.exit_after_s} s after the signal, --grace-s {self.grace_s}")
        return problems


def request() -> pb.ModelInferRequest:
    x = np.array([[0.0, 1.0]], np.float32)
    tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, 2])
    return pb.ModelInferRequest(model_name="xor", inputs=[tensor], raw_input_contents=[x.tobytes()])


class Clients:
    """Unary and streaming clients; `records` holds (sent at, how it ended) for every request."""

    def __init__(self, address: str, backoff_s: float = BACKOFF_S) -> None:
        self.address = address
        self.backoff_s = backoff_s
        self.records: list[tuple[float, str]] = []
        self.examples: dict[str, str] = {}  # a status code's first details
        self.stop = threading.Event()
        self.message = request()

    def failed(self, sent: float, code: str, details: str | None, kind: str = "unary") -> None:
        self.records.append((sent, code))
        self.examples.setdefault(code, f"{kind}: {(details or '')[:200]}")

    async def unary(self) -> None:
        loop = asyncio.get_running_loop()
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            while not self.stop.is_set():
                sent = loop.time()
                try:
                    await stub.ModelInfer(self.message, timeout=CALL_TIMEOUT_S)
                    self.records.append((sent, "OK"))
                except grpc.aio.AioRpcError as error:
                    self.failed(sent, error.code().name, error.details())
                    await asyncio.sleep(self.backoff_s)

    def stream(self) -> None:
        """A thread: one ModelStreamInfer request at a time, new streams while the server is up.

        grpc's synchronous client, because its asyncio client reports a write that meets the end of a
        stream as INTERNAL "Internal error from Core" instead of the status the server sent
        (grpc/grpc#36066)."""
        with grpc.insecure_channel(self.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            while not self.stop.is_set():
                outbox: queue.Queue = queue.Queue()
                responses = stub.ModelStreamInfer(iter(outbox.get, None), timeout=CALL_TIMEOUT_S)
                try:
                    while not self.stop.is_set():
                        sent = time.monotonic()
                        outbox.put(self.message)
                        response = next(responses)
                        if response.error_message:  # in-band: it starts with its status code's name
                            self.failed(sent, response.error_message.split(":", 1)[0], response.error_message, "stream")
                        else:
                            self.records.append((sent, "OK"))
                except StopIteration:  # the server ended the stream OK: the request was not answered
                    self.failed(sent, "OK_WITHOUT_ANSWER", "", "stream")
                except grpc.RpcError as error:
                    self.failed(sent, error.code().name, error.details(), "stream")
                outbox.put(None)
                responses.cancel()
                time.sleep(self.backoff_s)


async def one_round(
    workers: int, clients: int, streams: int, signal_after_s: float, grace_s: float, backoff_s: float, extra: list[str]
) -> Round:
    flags = [*extra, "--device", "cpu", "--workers", str(workers), "--grace-s", str(grace_s), "--log-level", "WARNING"]
    server = await asyncio.to_thread(ServerProcess.start, ROOT / "models", flags)
    result = Round(workers, signal_after_s, grace_s=grace_s)
    load = Clients(server.url, backoff_s)
    tasks = [asyncio.ensure_future(load.unary()) for _ in range(clients)]
    streamers = [threading.Thread(target=load.stream, daemon=True) for _ in range(streams)]
    for thread in streamers:
        thread.start()
    loop = asyncio.get_running_loop()
    try:
        await asyncio.sleep(signal_after_s)
        signalled = loop.time()
        os.kill(server.process.pid, signal.SIGTERM)
        try:
            exit_code = await asyncio.to_thread(server.process.wait, grace_s + 30)
            result.exit_code, result.exit_after_s = exit_code, round(loop.time() - signalled, 3)
        except Exception:
            server.process.kill()
        await asyncio.sleep(0.2)  # the clients see the port closed
    finally:
        load.stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for thread in streamers:
            await asyncio.to_thread(thread.join)
        server.stop(5)
    before = [code for sent, code in load.records if sent < signalled]
    result.sent_before = len(before)
    failed = Counter(code for code in before if code != "OK")
    result.failed_before, result.failed_before_codes = sum(failed.values()), dict(failed)
    result.after = dict(Counter(code for sent, code in load.records if sent >= signalled))
    result.examples = load.examples
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--streams", type=int, default=3)
    parser.add_argument("--signal-after", default="0.5,1.0,1.5", help="seconds of load before SIGTERM, a list")
    parser.add_argument("--grace-s", type=float, default=10.0)
    parser.add_argument("--backoff-s", type=float, default=BACKOFF_S, help="a client's pause after a failed call")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("serve_flags", nargs="*", help="more `xorserve serve` flags (after --)")
    args = parser.parse_args()
    points = [float(v) for v in args.signal_after.split(",")]
    rounds = []
    for index in range(args.rounds):
        started = time.monotonic()
        result = asyncio.run(
            one_round(
                args.workers,
                args.clients,
                args.streams,
                points[index % len(points)],
                args.grace_s,
                args.backoff_s,
                args.serve_flags,
            )
        )
        rounds.append(result)
        if not args.json:
            print(
                f"round {index + 1}: workers {result.workers}, SIGTERM after {result.signal_after_s} s of load: "
                f"sent before {result.sent_before}, failed {result.failed_before} {result.failed_before_codes or ''}; "
                f"after: {result.after}; exit {result.exit_code} after {result.exit_after_s} s "
                f"(round {time.monotonic() - started:.1f} s)",
                flush=True,
            )
    broken = [f"round {i + 1}: {problem}" for i, r in enumerate(rounds) for problem in r.broken]
    if args.json:
        print(json.dumps([dict(asdict(r), broken=r.broken) for r in rounds]))
    else:
        total = sum(r.sent_before for r in rounds)
        failed = sum(r.failed_before for r in rounds)
        print(f"total: {failed} of {total} requests sent before SIGTERM failed; promises broken: {len(broken)}")
        for line in broken:
            print("  " + line)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
