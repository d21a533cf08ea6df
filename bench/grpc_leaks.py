"""grpcio's asyncio server keeps native memory for calls that end early: shown without xorserve, and beside it.

    .venv/bin/python bench/grpc_leaks.py LOAD [--target bare|xorserve] [--seconds 60]

LOAD is one of bench/soak.py's two kinds of early endings:
- `streams`: 4 clients open a ModelStreamInfer stream, write 5 one-row requests, read one answer and
  cancel, over and over;
- `deadlines`: 16 clients send one-row ModelInfer back to back (10 s deadlines) while 4 send 64-row ones
  with 1 ms deadlines, most of which pass before the server gets to them (DEADLINE_EXCEEDED).
`--target bare` (the default) sends it to a server with no xorserve code at all: for `streams`, a bare
`grpc.aio` server echoing each message; for `deadlines`, ../shared/bench/v2_server.py --mode ort (a bare
`grpc.aio` server running the shipped model in ONNX Runtime for each request: the naive peer). `--target
xorserve` sends the same load to `xorserve serve --model-repository models --device cpu`. The server is
pinned to CPU 0, the clients to CPU 1. Prints the server's RSS every 10 s and, after the first 10 s, its
growth per early-ended call.

grpc/grpc#43360 (open as of grpcio 1.85.3) has a mechanism: a batch's `grpc_op` array is freed only when
the coroutine awaiting it reads its result, so one whose awaiter is cancelled (a read in flight when the
client cancels) or whose batch fails (a call that ended before the server read its message or sent its
status) is never freed. Nothing in a server's own code can free it; the fix is grpc/grpc#43361.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import sys
from collections import Counter
from pathlib import Path

import grpc
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from serve_perf import start_null  # noqa: E402
from soak import request  # noqa: E402

from serving._proto import grpc_service_pb2_grpc as pb_grpc  # noqa: E402
from serving.client.launch import ServerProcess  # noqa: E402

STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"


def bare_echo(ports: multiprocessing.Queue) -> None:
    """A grpc.aio server whose ModelStreamInfer echoes each message back (bytes in, bytes out)."""
    os.sched_setaffinity(0, {0})

    async def echo(requests, context):
        async for message in requests:
            await context.write(message)

    async def main() -> None:
        server = grpc.aio.server()
        service, method = STREAM_METHOD.strip("/").split("/")
        handler = grpc.stream_stream_rpc_method_handler(echo)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, {method: handler}),))
        ports.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


class Load:
    def __init__(self, address: str) -> None:
        self.channels = [grpc.aio.insecure_channel(address) for _ in range(4)]
        self.stop = False
        self.ended = Counter()

    async def cancelled_streams(self, channel: grpc.aio.Channel) -> None:
        method, message = channel.stream_stream(STREAM_METHOD), request(1).SerializeToString()
        while not self.stop:
            call = method()
            for _ in range(5):
                await call.write(message)
            await call.read()
            call.cancel()
            self.ended["stream cancelled"] += 1

    async def answered(self, channel: grpc.aio.Channel) -> None:
        stub, message = pb_grpc.GRPCInferenceServiceStub(channel), request(1)
        while not self.stop:
            try:
                await stub.ModelInfer(message, timeout=10)
                self.ended["answered"] += 1
            except grpc.aio.AioRpcError as error:
                self.ended[f"answered? {error.code().name}"] += 1

    async def expiring(self, channel: grpc.aio.Channel) -> None:
        stub, message = pb_grpc.GRPCInferenceServiceStub(channel), request(64)
        while not self.stop:
            try:
                await stub.ModelInfer(message, timeout=0.001)
                self.ended["1 ms deadline met"] += 1
            except grpc.aio.AioRpcError as error:
                self.ended[error.code().name] += 1

    def tasks(self, kind: str) -> list[asyncio.Future]:
        if kind == "streams":
            return [asyncio.ensure_future(self.cancelled_streams(self.channels[i % 4])) for i in range(4)]
        tasks = [asyncio.ensure_future(self.answered(self.channels[i % 4])) for i in range(16)]
        return tasks + [asyncio.ensure_future(self.expiring(self.channels[i])) for i in range(4)]

    def early(self) -> int:
        return sum(n for key, n in self.ended.items() if key not in ("answered", "1 ms deadline met"))


async def measure(kind: str, address: str, pid: int, seconds: float) -> None:
    os.sched_setaffinity(0, {1 % os.cpu_count()})
    server = psutil.Process(pid)
    load = Load(address)
    tasks = load.tasks(kind)
    rss, early = [], []
    for _ in range(max(2, int(seconds / 10))):
        await asyncio.sleep(10)
        rss.append(server.memory_info().rss / 2**20)
        early.append(load.early())
        print(f"{len(rss) * 10:4d} s: server RSS {rss[-1]:.1f} MB; calls ended early {early[-1]}", flush=True)
    load.stop = True
    await asyncio.gather(*tasks, return_exceptions=True)
    for channel in load.channels:
        await channel.close()
    per_call = (rss[-1] - rss[0]) * 2**20 / max(1, early[-1] - early[0])
    print(f"calls: {dict(load.ended)}")
    print(f"grew {rss[-1] - rss[0]:+.1f} MB after the first 10 s: {per_call:.0f} bytes per call ended early")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("load", choices=["streams", "deadlines"])
    parser.add_argument("--target", choices=["bare", "xorserve"], default="bare")
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    if args.target == "xorserve":
        flags = ["--device", "cpu", "--log-level", "WARNING"]
        with ServerProcess.start(ROOT / "models", flags, 120.0, "0") as server:
            # taskset sets the affinity and execs the server in place: its pid is the server's.
            asyncio.run(measure(args.load, server.url, server.process.pid, args.seconds))
    elif args.load == "deadlines":
        peer = start_null("0", mode="ort")
        try:
            asyncio.run(measure(args.load, f"127.0.0.1:{peer.port}", peer.process.pid, args.seconds))
        finally:
            peer.stop()
    else:
        ports: multiprocessing.Queue = multiprocessing.Queue()
        child = multiprocessing.Process(target=bare_echo, args=(ports,), daemon=True)
        child.start()
        try:
            asyncio.run(measure(args.load, f"127.0.0.1:{ports.get(timeout=30)}", child.pid, args.seconds))
        finally:
            child.kill()


if __name__ == "__main__":
    main()
