"""What reading asyncio's ready queue buys: the server as it is, against its public fallback, in paired rounds.

    .venv/bin/python bench/coalesce_fallback.py [--concurrency "1 16 64"] [--rounds 4]

serving/server/batching.py reads asyncio's private `loop._ready` (on the Python versions it was tested
with) to tell whether more requests are on their way in this turn of the event loop. Without it, the
Coalescer falls back to public behaviour: it holds nothing (`fallback`). This starts both variants of
`xorserve serve` (1-row requests, the shipped model, pinned to core 0)
and drives each in turn with perf_analyzer on core 1 (../shared/bench/run_perf.sh), the order rotating
by round, and prints the median inferences/s per variant and concurrency, and each one's ratio to the
ready queue.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = (ROOT / ".." / "shared" / "bench").resolve()
SERVER = """
import sys
from pathlib import Path
import serving.server.batching as batching
if sys.argv[1] == "fallback":
    batching.ready_queue = lambda loop: None
from serving.server.app import ServerConfig, run_server
run_server(ServerConfig(model_repository=Path(sys.argv[3]), device="cpu", port=int(sys.argv[2]), max_batch_size=16384))
"""


def start(variant: str, port: int) -> subprocess.Popen:
    command = ["taskset", "-c", "0", sys.executable, "-c", SERVER, variant, str(port), str(ROOT / "models")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in process.stdout:
        if line.startswith("READY"):
            return process
    raise SystemExit(f"the {variant} server did not start")


def measure(port: int, concurrency: int) -> float:
    env = dict(os.environ, CLIENT_CPUS="1", MEASURE_MS="1000")
    out = subprocess.run(
        ["bash", str(BENCH / "run_perf.sh"), str(port), str(concurrency), "1"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    return float(out.strip().splitlines()[-1].split(",")[3])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1 16 64")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    variants = {"ready-queue": 18401, "fallback": 18402}
    servers = {name: start(name, port) for name, port in variants.items()}
    rates: dict[tuple[str, int], list[float]] = {}
    try:
        for round_number in range(args.rounds):
            shift = round_number % len(variants)
            order = list(variants)[shift:] + list(variants)[:shift]
            for concurrency in map(int, args.concurrency.split()):
                for name in order:
                    rate = measure(variants[name], concurrency)
                    rates.setdefault((name, concurrency), []).append(rate)
                    print(f"round {round_number} {name} c={concurrency}: {rate:,.0f}/s", flush=True)
    finally:
        for server in servers.values():
            server.terminate()
            server.wait(30)
    time.sleep(0.1)
    for concurrency in map(int, args.concurrency.split()):
        ready = rates[("ready-queue", concurrency)]
        line = f"c={concurrency}: ready queue {statistics.median(ready):,.0f}/s"
        for name in list(variants)[1:]:
            ratios = [other / base for other, base in zip(rates[(name, concurrency)], ready, strict=True)]
            line += (
                f"; {name} {statistics.median(rates[(name, concurrency)]):,.0f}/s, "
                f"{statistics.median(ratios):.2f}x (rounds {min(ratios):.2f}-{max(ratios):.2f})"
            )
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
