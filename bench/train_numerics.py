"""What pinned numerics cost in training time: `train()` with the notes' settings (100 epochs), pinned vs native.

Each run is a fresh process (ATen and MKL choose their kernels once per process); the two modes alternate
in order over the rounds, and the result is the median of the per-round ratios pinned / native, with the
range, as docs/benchmarks.md asks of every figure on this shared machine.

    .venv/bin/python bench/train_numerics.py [--rounds 7] [--epochs 100] [--native-threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

TIMED = """
import json, sys, time
import torch
from trainer.train import TrainSettings, train
if sys.argv[3] != "0":
    torch.set_num_threads(int(sys.argv[3]))  # for native; pinned sets one thread itself
settings = TrainSettings(epochs=int(sys.argv[2]))
train(TrainSettings(epochs=1), device="cpu", progress=False, numerics_mode=sys.argv[1])  # imports, first calls
start = time.perf_counter()
result = train(settings, device="cpu", progress=False, numerics_mode=sys.argv[1])
print(json.dumps({"seconds": time.perf_counter() - start, **result.numerics}))
"""


def timed_run(mode: str, epochs: int, threads: int) -> dict:
    output = subprocess.run(
        [sys.executable, "-c", TIMED, mode, str(epochs), str(threads)], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument(
        "--native-threads", type=int, default=0, help="intra-op threads of the native runs (0: torch's default)"
    )
    args = parser.parse_args()
    ratios, seconds = [], {"pinned": [], "native": []}
    for round_number in range(args.rounds):
        order = ("pinned", "native") if round_number % 2 == 0 else ("native", "pinned")
        runs = {mode: timed_run(mode, args.epochs, args.native_threads if mode == "native" else 0) for mode in order}
        for mode, run in runs.items():
            seconds[mode].append(run["seconds"])
        ratios.append(runs["pinned"]["seconds"] / runs["native"]["seconds"])
        print(
            f"round {round_number + 1}: pinned {runs['pinned']['seconds']:.3f} s "
            f"({runs['pinned']['cpu_capability']}, {runs['pinned']['threads']} thread) | native "
            f"{runs['native']['seconds']:.3f} s ({runs['native']['cpu_capability']}, {runs['native']['threads']} "
            f"threads) | ratio {ratios[-1]:.3f}",
            flush=True,
        )
    print(
        f"pinned / native training time: median {statistics.median(ratios):.3f} "
        f"(range {min(ratios):.3f}-{max(ratios):.3f}, {args.rounds} rounds); median seconds pinned "
        f"{statistics.median(seconds['pinned']):.3f}, native {statistics.median(seconds['native']):.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
