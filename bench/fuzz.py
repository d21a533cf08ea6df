"""Fuzzing `xorserve serve` as a subprocess: 50,000 generated requests, malformed and valid, unary and streamed.

    .venv/bin/python bench/fuzz.py [--requests 50000] [--stream-share 0.4] [--seed 0]

The requests are those of tests/test_fuzz.py (tests/fuzzing.py: random bytes, protos with random names,
shapes, datatypes, contents and parameters, 100,000-character strings, huge declared shapes, messages
over the limit, valid XOR requests among them), sent one after another on one channel against
`xorserve serve --model-repository models --device cpu --max-message-bytes 1048576`; a share of them on
ModelStreamInfer streams of 10-14 messages. Prints the answers counted by kind and status code, the
server's resident memory (RSS) every 5,000 requests, the answers that broke a rule (a status code that
docs/serving.md does not list, an error message of 2,048 characters or more, a valid request answered
wrongly: there should be none), how many lines the server logged, and whether it is still live and
answering at the end. Exits 1 if any answer broke a rule or the server did not stay up.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import psutil
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from fuzzing import (  # noqa: E402
    MAX_MESSAGE_BYTES,
    check,
    check_stream,
    send_stream,
    send_unary,
    stream_cases,
    unary_cases,
)

from serving._proto import grpc_service_pb2 as pb  # noqa: E402
from serving._proto import grpc_service_pb2_grpc as pb_grpc  # noqa: E402
from serving.client.launch import ServerProcess  # noqa: E402
from serving.runtime import SessionSettings, open_session  # noqa: E402

MODEL = ROOT / "models" / "xor" / "1" / "model.onnx"
EXAMPLES_PER_RUN = 200  # Hypothesis examples per run; each run has its own seed
RSS_EVERY = 5000


class LogLines:
    """Counts the lines the server writes, from ServerProcess's `output` (which keeps the last 200): looked at
    after every few requests, the lines after the last one seen (the same object) are new."""

    def __init__(self, output) -> None:
        self.output = output
        self.last = output[-1] if output else None
        self.lines: list[str] = []

    def poll(self) -> None:
        kept = list(self.output)
        new = kept
        for index in range(len(kept) - 1, -1, -1):
            if kept[index] is self.last:
                new = kept[index + 1 :]
                break
        if new:
            self.lines += new
            self.last = new[-1]


class Fuzzer:
    def __init__(self, channel: grpc.Channel, pid: int, log: LogLines) -> None:
        self.channel, self.pid, self.log = channel, pid, log
        session = open_session(MODEL, SessionSettings(device="cpu"))
        names = [output.name for output in session.get_outputs()]
        self.reference = lambda x: dict(zip(names, session.run(names, {"input": x}), strict=True))
        self.counts: Counter = Counter()  # (kind, code) -> answers
        self.failures: list[str] = []
        self.sent = 0
        self.rss: list[tuple[int, float]] = [(0, self.rss_mb())]

    def rss_mb(self) -> float:
        return psutil.Process(self.pid).memory_info().rss / 2**20

    def sent_some(self, count: int) -> None:
        self.log.poll()
        before, self.sent = self.sent, self.sent + count
        if before // RSS_EVERY != self.sent // RSS_EVERY:
            self.rss.append((self.sent, self.rss_mb()))

    def unary(self, cases) -> None:
        for case in cases:
            answer = send_unary(self.channel, case)
            self.counts[(case.kind, answer.code)] += 1
            try:
                check(case, answer, self.reference)
            except AssertionError as error:
                self.failures.append(f"{case.method} {case.kind}: {str(error)[:300]}")
        self.sent_some(len(cases))

    def stream(self, cases) -> None:
        try:
            answers = send_stream(self.channel, cases)
        except grpc.RpcError as error:
            self.counts[("stream", error.code().name)] += 1
            self.failures.append(f"a stream ended {error.code().name}: {(error.details() or '')[:300]}")
            self.sent_some(len(cases))
            return
        for answer in answers:
            self.counts[("stream", answer.code)] += 1
        try:
            check_stream(cases, answers, self.reference)
        except AssertionError as error:
            self.failures.append(f"stream: {str(error)[:300]}")
        self.sent_some(len(cases))

    def run(self, strategy, send, until: int, first_seed: int) -> None:
        run_seed = first_seed
        while self.sent < until:

            @seed(run_seed)
            @settings(
                max_examples=EXAMPLES_PER_RUN,
                database=None,
                deadline=None,
                suppress_health_check=list(HealthCheck),
            )
            @given(strategy)
            def batch(cases):
                if self.sent < until:
                    send(cases)

            batch()
            run_seed += 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--stream-share", type=float, default=0.4, help="share of the requests sent on streams")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not MODEL.is_file():
        raise SystemExit(f"{MODEL} is missing: train and export the model first (README)")
    set_hypothesis_home_dir(ROOT / "out" / "hypothesis")  # Hypothesis's caches, not in the repository's root
    flags = ["--device", "cpu", "--max-message-bytes", str(MAX_MESSAGE_BYTES), "--log-level", "INFO"]
    with ServerProcess.start(ROOT / "models", flags) as server, grpc.insecure_channel(server.url) as channel:
        log = LogLines(server.output)
        fuzzer = Fuzzer(channel, server.process.pid, log)
        began = time.perf_counter()
        unary_part = round(args.requests * (1 - args.stream_share))
        fuzzer.run(st.lists(unary_cases(), min_size=4, max_size=6), fuzzer.unary, unary_part, args.seed)
        fuzzer.run(st.lists(stream_cases(), min_size=10, max_size=14), fuzzer.stream, args.requests, args.seed + 10**6)
        took = time.perf_counter() - began
        fuzzer.rss.append((fuzzer.sent, fuzzer.rss_mb()))
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        live = stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
        x = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], np.float32)
        tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[4, 2])
        request = pb.ModelInferRequest(model_name="xor", inputs=[tensor], raw_input_contents=[x.tobytes()])
        response = stub.ModelInfer(request, timeout=10)
        got = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(4, 1)
        answers = bool(np.allclose(got, fuzzer.reference(x)[response.outputs[0].name], rtol=1e-5, atol=1e-6))
        running = server.process.poll() is None
        log.poll()
    print(f"{fuzzer.sent} requests in {took:.0f} s ({fuzzer.sent / took:.0f}/s)")
    print("answers by kind and status code:")
    for (kind, code), count in sorted(fuzzer.counts.items()):
        print(f"  {kind:12s} {code:20s} {count:6d}")
    totals = Counter()
    for (_, code), count in fuzzer.counts.items():
        totals[code] += count
    print("by status code:", ", ".join(f"{code} {count}" for code, count in totals.most_common()))
    print("server RSS (requests: MB):", ", ".join(f"{n}: {mb:.1f}" for n, mb in fuzzer.rss))
    events = Counter(word for line in log.lines for word in line.split() if word.startswith("event="))
    tracebacks = sum(line.startswith("Traceback") for line in log.lines)
    print(f"server log lines during the run: {len(log.lines)}, tracebacks {tracebacks}; {dict(events)}")
    for line in log.lines[-4:]:
        print("  " + line[:240])
    print(f"rule breaks: {len(fuzzer.failures)}")
    for failure in fuzzer.failures[:20]:
        print("  " + failure)
    print(f"at the end: process running {running}, ServerLive {live}, a valid request answered correctly {answers}")
    return 0 if not fuzzer.failures and running and live and answers else 1


if __name__ == "__main__":
    sys.exit(main())
