"""The cost of ONNX Runtime's public `InferenceSession.run` against the private `_sess.run` it wraps, per 1-row call.

    .venv/bin/python bench/ort_run_cost.py

The server uses the public call; this measures what that costs (six alternating repetitions of 30,000
calls each on the shipped model, one intra-op thread, as the server opens it; run it pinned with taskset).
"""

import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

MODEL = Path(__file__).resolve().parent.parent / "models" / "xor" / "1" / "model.onnx"

options = ort.SessionOptions()
options.intra_op_num_threads = options.inter_op_num_threads = 1
options.add_session_config_entry("session.intra_op.allow_spinning", "0")
session = ort.InferenceSession(str(MODEL), options, providers=["CPUExecutionProvider"])
feeds, names = {"input": np.zeros((1, 2), np.float32)}, ["logits", "probability"]
calls = {
    "run (public)": lambda: session.run(names, feeds),
    "_sess.run (private)": lambda: session._sess.run(names, feeds, None),
}
times: dict[str, list[float]] = {name: [] for name in calls}
for _ in range(6):
    for name, call in calls.items():
        for _ in range(2000):
            call()
        start = time.perf_counter()
        for _ in range(30_000):
            call()
        times[name].append((time.perf_counter() - start) / 30_000 * 1e6)
for name, values in times.items():
    print(f"{name:<20} median {statistics.median(values):.2f} us per call ({' '.join(f'{v:.2f}' for v in values)})")
