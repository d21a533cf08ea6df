"""Send points to a running server over gRPC and print each one's probability and label.

Example:
  xorserve predict --url 127.0.0.1:8001 0,0 0,1 1,0 1,1

Exit codes: 0 answered; 1 the server refused or could not be reached (one line on stderr);
2 a point could not be parsed.
"""

from __future__ import annotations

import argparse
import re
import sys

import numpy as np

from serving.cli import env_default


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # A point such as -0.5,1 is an argument, not an unknown option: argparse only recognises plain
    # negative numbers by itself.
    parser._negative_number_matcher = re.compile(r"^-\.?\d")
    parser.add_argument("points", nargs="+", metavar="X1,X2", help="points to classify, e.g. 0,1")
    parser.add_argument("--url", default=env_default("url", "127.0.0.1:8001"), help="server HOST:PORT (XORSERVE_URL)")
    parser.add_argument("--model", default=env_default("model", "xor"), help="model name (XORSERVE_MODEL)")
    parser.add_argument("--model-version", default=env_default("model_version", ""), help="version; empty = latest")
    parser.add_argument("--timeout-s", type=float, default=env_default("timeout_s", 10.0), help="per-call deadline")


def parse_points(texts: list[str]) -> np.ndarray:
    """'x1,x2' strings -> float32 [N, 2]; ValueError naming the first point that is not two numbers."""
    rows = []
    for text in texts:
        parts = text.split(",")
        try:
            if len(parts) != 2:
                raise ValueError
            rows.append([float(p) for p in parts])
        except ValueError:
            raise ValueError(f"point {text!r} is not two comma-separated numbers like 0,1") from None
    with np.errstate(over="ignore"):
        points = np.asarray(rows, dtype=np.float32)
    for text, point in zip(texts, points, strict=True):
        if not np.isfinite(point).all():
            raise ValueError(f"point {text!r} is not two finite numbers within float32's range")
    return points


def format_table(points: np.ndarray, probability: np.ndarray, label: np.ndarray) -> str:
    lines = [f"{'x1':>8} {'x2':>8} {'probability':>12} {'label':>5}"]
    for (x1, x2), p, y in zip(points, probability, label, strict=True):
        lines.append(f"{x1:8.4f} {x2:8.4f} {p:12.6f} {y:5d}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from serving.client import InferenceClient, InferenceError

    try:
        points = parse_points(args.points)
    except ValueError as exc:
        print(f"xorserve predict: {exc}", file=sys.stderr)
        return 2
    try:
        with InferenceClient(args.url, args.model, args.model_version, timeout_s=args.timeout_s) as client:
            prediction = client.predict(points)
    except InferenceError as exc:
        print(f"xorserve predict: {args.url}: {exc}", file=sys.stderr)
        return 1
    print(format_table(points, prediction.probability, prediction.label))
    return 0
