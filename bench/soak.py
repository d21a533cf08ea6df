"""Soak: the server under a mixed load for MINUTES; its memory, file descriptors, threads and latency over time.

    .venv/bin/python bench/soak.py MINUTES [--clients 16] [--storm 4] [--sample-s 10] [--max-growth-mb 8]
                                   [--cancel-every 10] [--server-cpus 0] [--client-cpus 1] [--json]
                                   [-- SERVE_FLAGS...]

Starts `xorserve serve` on models/ (--device cpu, pinned to --server-cpus with taskset; this process,
the load, to --client-cpus) and runs, all at once, until MINUTES are over:
- `--clients` unary clients sending 1-row ModelInfer back to back, 10 s deadlines (their latency is the
  p99 reported);
- one ModelStreamInfer client (one request at a time, a new stream every 200 requests);
- `--storm` clients sending 64-row requests with 1 ms deadlines (most expire: DEADLINE_EXCEEDED), and
  every `--cancel-every`th of their calls (10; 0: none) a stream cancelled after its first answer. grpcio's
  asyncio server leaks about 100-200 bytes of native memory per stream a client cancels (grpc/grpc#43360;
  bench/grpc_leaks.py shows it without xorserve), which this load makes about 1.6 MB per 10 s;
- every 5 s, one 1 M-row request (8 MiB in, 8 MiB out).
Every --sample-s it records the server's RSS, open file descriptors and threads, the p99 latency of the
unary clients' answers in that interval, and the non-OK answers of the clients that must succeed (the
unary, stream and 1 M-row ones; the storm's are counted apart).

It fails (exit 1) on growth, judged after a warm-up of the first quarter of the samples (at least one):
RSS growing by more than --max-growth-mb from the warm-up's end to the end, a least-squares slope over
the samples after warm-up that would add more than --max-growth-mb over another run of the same length,
more file descriptors at the end than at any sample of the warm-up (threads: more than THREAD_SLACK
more), or any failure of the clients that must succeed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from serving._proto import grpc_service_pb2 as pb  # noqa: E402
from serving._proto import grpc_service_pb2_grpc as pb_grpc  # noqa: E402
from serving.client.launch import ServerProcess  # noqa: E402

BIG_ROWS = 1024 * 1024
BIG_EVERY_S = 5.0
STREAM_REQUESTS = 200
# gRPC's event engine adds a thread or two to its pool under load, at any time (a 90 s run without the
# storm went from 13 to 14 at 70 s); a leak of threads goes on growing.
THREAD_SLACK = 2


def request(rows: int, seed: int = 0) -> pb.ModelInferRequest:
    x = np.random.default_rng(seed).random((rows, 2), dtype=np.float32)
    tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[rows, 2])
    return pb.ModelInferRequest(model_name="xor", inputs=[tensor], raw_input_contents=[x.tobytes()])


@dataclass
class Sample:
    at_s: float
    rss_mb: float
    fds: int
    threads: int
    answers: int
    p99_ms: float | None
    failures: int


@dataclass
class Verdict:
    samples: list[Sample]
    storm: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    thread_names: dict[str, int] = field(default_factory=dict)  # the server's threads at the end, by name


def judge(samples: list[Sample], max_growth_mb: float) -> list[str]:
    """What grew: see the module docstring. Needs at least three samples."""
    if len(samples) < 3:
        return [f"only {len(samples)} samples: run longer or sample more often"]
    warm = max(1, len(samples) // 4)
    settled, after = samples[warm - 1], samples[warm - 1 :]
    problems = []
    growth = samples[-1].rss_mb - settled.rss_mb
    if growth > max_growth_mb:
        end = samples[-1].rss_mb
        problems.append(f"RSS grew {growth:+.1f} MB after the warm-up ({settled.rss_mb:.1f} -> {end:.1f})")
    t = np.array([s.at_s for s in after])
    rss = np.array([s.rss_mb for s in after])
    slope = float(np.polyfit(t, rss, 1)[0]) if len(after) >= 3 else 0.0  # MB per second
    span = samples[-1].at_s - samples[0].at_s
    if slope * span > max_growth_mb:
        problems.append(f"RSS trend {slope * 60:+.2f} MB/min after the warm-up: {slope * span:+.1f} MB in another run")
    for name, slack in (("fds", 0), ("threads", THREAD_SLACK)):
        most = max(getattr(s, name) for s in samples[:warm])
        if getattr(samples[-1], name) > most + slack:
            problems.append(f"{name}: {getattr(samples[-1], name)} at the end, at most {most} in the warm-up")
    failed = sum(s.failures for s in samples)
    if failed:
        problems.append(f"{failed} requests that must succeed failed")
    return problems


class Load:
    def __init__(self, address: str, cancel_every: int = 10) -> None:
        self.address = address
        self.cancel_every = cancel_every
        self.stop = asyncio.Event()
        self.latencies: list[float] = []
        self.answers = 0
        self.failures: Counter = Counter()
        self.storm: Counter = Counter()

    def fail(self, what: str, error: grpc.aio.AioRpcError) -> None:
        self.failures[f"{what}: {error.code().name}: {(error.details() or '')[:120]}"] += 1

    async def unary(self, channel: grpc.aio.Channel) -> None:
        stub, message = pb_grpc.GRPCInferenceServiceStub(channel), request(1)
        while not self.stop.is_set():
            start = time.perf_counter()
            try:
                await stub.ModelInfer(message, timeout=10)
            except grpc.aio.AioRpcError as error:
                self.fail("unary", error)
                continue
            self.latencies.append(time.perf_counter() - start)
            self.answers += 1

    async def stream(self, channel: grpc.aio.Channel) -> None:
        stub, message = pb_grpc.GRPCInferenceServiceStub(channel), request(1)
        while not self.stop.is_set():
            call = stub.ModelStreamInfer(timeout=600)
            try:
                for _ in range(STREAM_REQUESTS):
                    await call.write(message)
                    response = await call.read()
                    if response is grpc.aio.EOF or response.error_message:
                        self.failures[f"stream: {getattr(response, 'error_message', 'ended')[:120]}"] += 1
                        break
                await call.done_writing()
                await call.read()  # the end of the stream
            except grpc.aio.AioRpcError as error:
                self.fail("stream", error)

    async def storm_client(self, channel: grpc.aio.Channel) -> None:
        stub, message, small = pb_grpc.GRPCInferenceServiceStub(channel), request(64), request(1)
        calls = 0
        while not self.stop.is_set():
            calls += 1
            if self.cancel_every and calls % self.cancel_every == 0:
                call = stub.ModelStreamInfer(timeout=10)
                try:
                    for _ in range(5):
                        await call.write(small)
                    await call.read()
                    self.storm["stream cancelled"] += 1
                except grpc.aio.AioRpcError as error:
                    self.storm[f"stream {error.code().name}"] += 1
                call.cancel()
                continue
            try:
                await stub.ModelInfer(message, timeout=0.001)
                self.storm["OK"] += 1
            except grpc.aio.AioRpcError as error:
                self.storm[error.code().name] += 1

    async def big(self, channel: grpc.aio.Channel) -> None:
        stub, message = pb_grpc.GRPCInferenceServiceStub(channel), request(BIG_ROWS, seed=1)
        while not self.stop.is_set():
            try:
                await stub.ModelInfer(message, timeout=60)
            except grpc.aio.AioRpcError as error:
                self.fail("1M rows", error)
            with_timeout = asyncio.ensure_future(self.stop.wait())
            await asyncio.wait([with_timeout], timeout=BIG_EVERY_S)
            with_timeout.cancel()


async def soak(minutes, clients, storm, sample_s, flags, server_cpus, client_cpus, cancel_every=10):
    if client_cpus:
        os.sched_setaffinity(0, {int(c) for c in client_cpus.split(",")})
    extra = ["--device", "cpu", "--log-level", "WARNING", *flags]
    server = await asyncio.to_thread(ServerProcess.start, ROOT / "models", extra, 120.0, server_cpus)
    process = psutil.Process(server.process.pid)  # (taskset sets the affinity and execs the server in place)
    load = Load(server.url, cancel_every)
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    channels = [grpc.aio.insecure_channel(server.url, options=options) for _ in range(4)]
    tasks = [asyncio.ensure_future(load.unary(channels[i % 4])) for i in range(clients)]
    tasks.append(asyncio.ensure_future(load.stream(channels[0])))
    tasks += [asyncio.ensure_future(load.storm_client(channels[1 + i % 3])) for i in range(storm)]
    tasks.append(asyncio.ensure_future(load.big(channels[2])))
    samples: list[Sample] = []
    began = time.monotonic()
    failures_seen = 0
    names: Counter = Counter()
    try:
        while (elapsed := time.monotonic() - began) < minutes * 60:
            await asyncio.sleep(min(sample_s, minutes * 60 - elapsed))
            latencies, load.latencies = load.latencies, []
            p99 = float(np.percentile(latencies, 99)) * 1000 if latencies else None
            failures = sum(load.failures.values())
            memory = process.memory_info()
            samples.append(
                Sample(
                    round(time.monotonic() - began, 1),
                    round(memory.rss / 2**20, 1),
                    process.num_fds(),
                    process.num_threads(),
                    len(latencies),
                    round(p99, 2) if p99 is not None else None,
                    failures - failures_seen,
                )
            )
            failures_seen = failures
            print(json.dumps(asdict(samples[-1])), file=sys.stderr, flush=True)
        names = Counter(_thread_name(process.pid, thread.id) for thread in process.threads())
    finally:
        load.stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in channels:
            await channel.close()
        server.stop()
    return Verdict(samples, dict(load.storm), dict(load.failures), thread_names=dict(names))


def _thread_name(pid: int, tid: int) -> str:
    try:
        return Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
    except OSError:
        return "?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("minutes", type=float)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--storm", type=int, default=4)
    parser.add_argument("--sample-s", type=float, default=10.0)
    parser.add_argument("--max-growth-mb", type=float, default=8.0)
    parser.add_argument("--cancel-every", type=int, default=10)
    parser.add_argument("--server-cpus", default="0")
    parser.add_argument("--client-cpus", default="1")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("serve_flags", nargs="*", help="more `xorserve serve` flags (after --)")
    args = parser.parse_args()
    verdict = asyncio.run(
        soak(
            args.minutes,
            args.clients,
            args.storm,
            args.sample_s,
            args.serve_flags,
            args.server_cpus or None,
            args.client_cpus or None,
            args.cancel_every,
        )
    )
    verdict.problems = judge(verdict.samples, args.max_growth_mb)
    if args.json:
        print(json.dumps(asdict(verdict)))
    else:
        print("  at_s  rss_mb  fds  threads  answers  p99_ms  failures")
        for s in verdict.samples:
            p99 = f"{s.p99_ms:.2f}" if s.p99_ms is not None else "-"
            row = f"{s.at_s:6.0f}  {s.rss_mb:6.1f}  {s.fds:3d}  {s.threads:7d}  {s.answers:7d}  {p99:>6}"
            print(f"{row}  {s.failures:8d}")
        print(f"storm: {verdict.storm}")
        print(f"server threads at the end: {verdict.thread_names}")
        print(f"failures of the clients that must succeed: {verdict.failures or 'none'}")
        print("verdict:", "no growth" if not verdict.problems else "; ".join(verdict.problems))
    return 1 if verdict.problems else 0


if __name__ == "__main__":
    sys.exit(main())
