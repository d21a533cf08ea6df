"""Send points to a running server over gRPC and print each one's probability and label.

Example:
  xorserve predict --url 127.0.0.1:8001 0,0 0,1 1,0 1,1 -0.5,1
  xorserve predict --url server.example:8001 --tls-ca ca.pem --token-file token 0,1

A server that serves TLS needs --tls-ca (and --tls-cert with --tls-key when it requires a client
certificate); one that requires a bearer token needs --token-file.

Exit status (any error: one line on stderr): 0 answered; 2 a point could not be parsed, a bad flag or
a TLS or token file that cannot be read, the server refused the request as invalid, or refused its
credentials (UNAUTHENTICATED: no --token-file, or a token it does not accept); 3 the server or the
model could not be reached, also when this client and the server do not speak the same (plaintext at
a TLS server, TLS at a plaintext one, a certificate one side does not trust: the line says which).
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import numpy as np

from serving.cli.flags import USAGE, Parser, model, model_version, security, timeout_s, url

# A point such as -0.5,1 starts with "-": argparse takes it for an unknown option, and run() takes it back.
POINT = re.compile(r"^-?[0-9.]")


def add_arguments(parser: Parser) -> None:
    parser.add_argument("points", nargs="*", metavar="X1,X2", help="points to classify, e.g. 0,1 or -0.5,1")
    url(parser)
    model(parser)
    model_version(parser)
    timeout_s(parser, default=10.0)
    security(parser)


def parse_args(parser: Parser, argv: list[str]) -> argparse.Namespace:
    """argparse, with the points that start with "-" taken back from its unknown options, in argv's order."""
    args, unknown = parser.parse_known_args(argv)
    others = [word for word in unknown if not POINT.match(word)]
    if others:
        parser.error(f"unrecognized arguments: {' '.join(others)}")
    known, taken_back, ordered = list(args.points), list(unknown), []
    for word in argv:
        if known and word == known[0]:
            ordered.append(known.pop(0))
        elif taken_back and word == taken_back[0]:
            ordered.append(taken_back.pop(0))
    args.points = ordered + known + taken_back
    return args


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
    # gRPC's own log lines (a failed TLS handshake) would add to the one line of an error.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    from serving.client import InferenceClient, InferenceError
    from serving.client.connect import Security, SecurityError

    try:
        if not args.points:
            raise ValueError("give at least one point, e.g. 0,1")
        points = parse_points(args.points)
    except ValueError as exc:
        print(f"xorserve predict: error: {exc}", file=sys.stderr)
        return USAGE
    try:
        client = InferenceClient(
            args.url, args.model, args.model_version, timeout_s=args.timeout_s, security=Security.from_args(args)
        )
    except SecurityError as exc:
        print(f"xorserve predict: error: {exc}", file=sys.stderr)
        return USAGE
    try:
        with client:
            prediction = client.predict(points)
    except InferenceError as exc:
        print(f"xorserve predict: error: {exc.line(args.url)}", file=sys.stderr)
        return exc.exit_code
    print(format_table(points, prediction.probability, prediction.label))
    return 0
