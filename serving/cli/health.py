"""Ask a server's grpc.health.v1 Health service whether it (or one of its services) is SERVING.

    xorserve health --url 127.0.0.1:8001
    xorserve health --url 127.0.0.1:8001 --service xor
    xorserve health --url server.example:8001 --tls-ca ca.pem     # a server that serves TLS

Health needs no token (the server leaves it open); --tls-ca, and --tls-cert with --tls-key for mutual
TLS, say how to reach a server that serves TLS; --token-file's token is sent when given.

Prints one line: the status, or why there is none (for a TLS mismatch, which: e.g. the server serves
TLS and this client plaintext). Exit status: 0 SERVING; 1 answered, not SERVING (NOT_SERVING,
SERVICE_UNKNOWN, UNKNOWN); 2 a bad flag or a TLS or token file that cannot be read (one line on
stderr), or the server refused the credentials (UNAUTHENTICATED: it does not leave health open and the
token is missing or wrong); 3 no answer (the server could not be reached, a TLS mismatch too).
"""

from __future__ import annotations

import argparse
import os
import sys

from serving.cli.flags import CHECK_FAILED, OK, UNREACHABLE, USAGE, Parser, flag, security, timeout_s, url


def add_arguments(parser: Parser) -> None:
    url(parser)
    flag(
        parser,
        "--service",
        env="HEALTH_SERVICE",
        default="",
        help="service to ask about: a model name, inference.GRPCInferenceService, or empty for the server",
    )
    timeout_s(parser, default=3.0, help="seconds to wait for the answer")
    security(parser)


def run(args: argparse.Namespace) -> int:
    # gRPC's own log lines (a failed TLS handshake) would add to the one line this command prints.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    from serving.client.connect import Security, SecurityError
    from serving.client.health import check

    try:
        status, message = check(args.url, args.service, args.timeout_s, Security.from_args(args))
    except SecurityError as exc:
        print(f"xorserve health: error: {exc}", file=sys.stderr)
        return USAGE
    # A TLS mismatch's explanation begins with the URL, which the line begins with already.
    if message.startswith(args.url):
        message = message[len(args.url) :].lstrip(": ")
    print(f"{args.url} {args.service or '(server)'}: {message}", flush=True)
    if status is None:
        return USAGE if message.startswith("UNAUTHENTICATED:") else UNREACHABLE
    return OK if status == "SERVING" else CHECK_FAILED
