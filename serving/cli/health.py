"""Ask a server's grpc.health.v1 Health service whether it (or one of its services) is SERVING.

    xorserve health --url 127.0.0.1:8001
    xorserve health --url 127.0.0.1:8001 --service xor

Prints one line: the status, or why there is none. Exit status: 0 SERVING; 1 answered, not SERVING
(NOT_SERVING, SERVICE_UNKNOWN, UNKNOWN); 3 no answer (the server could not be reached).
"""

from __future__ import annotations

import argparse

from serving.cli.flags import CHECK_FAILED, OK, UNREACHABLE, Parser, flag, timeout_s, url


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


def run(args: argparse.Namespace) -> int:
    from serving.client.health import check

    status, message = check(args.url, args.service, args.timeout_s)
    print(f"{args.url} {args.service or '(server)'}: {message}", flush=True)
    if status is None:
        return UNREACHABLE
    return OK if status == "SERVING" else CHECK_FAILED
