"""What ONNX Runtime's CPU memory arena saves on small runs: the shipped model, with and without it.

    taskset -c 1 .venv/bin/python bench/arena_cost.py [--rounds 7]

Two sessions of models/xor/1 (one intra-op thread, no spinning, as serving.runtime opens them), one with
the arena (ONNX Runtime's default) and one without (xorserve's choice: the arena keeps the peak of every
run for the session's life; docs/serving.md, "Memory"). For 1, 64 and 4,096 rows, rounds alternate the two
sessions; prints the median time per run of each and their ratio. Pin it to one core: the ratio, not the
times, carries over to another machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

MODEL = Path(__file__).resolve().parent.parent / "models" / "xor" / "1" / "model.onnx"


def session(arena: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.enable_cpu_mem_arena = arena
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(str(MODEL), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    sessions = {arena: session(arena) for arena in (True, False)}
    for rows in (1, 64, 4096):
        x = np.random.default_rng(0).random((rows, 2), dtype=np.float32)
        runs = 20000 if rows < 1000 else 2000
        times: dict[bool, list[float]] = {True: [], False: []}
        for round_ in range(args.rounds):
            for arena in (True, False) if round_ % 2 == 0 else (False, True):
                run = sessions[arena].run
                start = time.perf_counter()
                for _ in range(runs):
                    run(None, {"input": x})
                times[arena].append((time.perf_counter() - start) / runs * 1e6)
        on, off = statistics.median(times[True]), statistics.median(times[False])
        print(f"{rows:5d} rows: arena {on:6.2f} us, no arena {off:6.2f} us per run; without/with {off / on:.3f}")


if __name__ == "__main__":
    main()
