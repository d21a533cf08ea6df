"""Serve a model repository over the Open Inference Protocol (KServe V2 gRPC) from ONNX Runtime.

Every `<model>/<version>/model.onnx` under --model-repository is loaded, warmed up and served with
dynamic batching, beside grpc.health.v1, server reflection and Prometheus metrics (GET /metrics on
--metrics-port). Once every model is ready it prints one line to stdout:

    READY grpc=HOST:PORT metrics=HOST:PORT startup_s=SECONDS

(NOT_READY ... failed=MODELS when a model failed to load: the server stays up, live and not ready).
SIGTERM or SIGINT drains: health turns NOT_SERVING at once; after --drain-delay-s, new calls are
refused UNAVAILABLE while every call already accepted is answered; the process exits 0 within
--grace-s (docs/serving.md, "Draining"). Exit 2: the server cannot start (a bad flag, a
port in use, --device cuda without CUDA); 1: a worker of --workers died while serving.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from serving.cli.flags import USAGE, Parser, device, flag, model_repository, number
from serving.devices import DeviceUnavailableError
from serving.protocol import OPEN_BY_DEFAULT

log = logging.getLogger(__name__)

MiB = 1024 * 1024
port = number(int, minimum=0, maximum=65535)
positive = number(int, minimum=1)


def names(text: str) -> tuple[str, ...]:
    """A comma-separated list (empty: none)."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


def add_arguments(parser: Parser) -> None:
    model_repository(parser, required=True, help="folder of <model>/<version>/model.onnx")
    flag(parser, "--host", default="127.0.0.1", help="address to listen on")
    flag(parser, "--port", type=port, default=8001, help="gRPC port; 0 picks a free one")
    flag(parser, "--metrics-port", type=port, default=8002, help="Prometheus metrics HTTP port; 0 picks a free one")
    device(parser, help="auto: CUDA if available, else CPU with a warning; cuda: fail without CUDA")
    flag(parser, "--tf32", action="store_true", help="allow TF32 on CUDA")
    flag(parser, "--max-batch-size", type=positive, default=64, help="largest batch in rows; larger requests run alone")
    flag(
        parser,
        "--max-queue-delay-us",
        type=number(int, minimum=0),
        default=0,
        help="longest a batch waits to fill, in microseconds; 0: run queued requests as soon as the event loop "
        "has nothing else to do (a model run on the loop holds a request at most 2 ms while it is busy) or an "
        "instance is free",
    )
    flag(
        parser,
        "--instances",
        type=positive,
        default=1,
        help="ONNX Runtime sessions per model version, running batches concurrently",
    )
    flag(
        parser,
        "--max-queue-size",
        type=positive,
        default=1024,
        help="requests a model may have waiting; beyond it requests get UNAVAILABLE",
    )
    flag(parser, "--no-batching", action="store_true", help="run each request on its own")
    flag(
        parser,
        "--grace-s",
        type=number(float, minimum=0),
        default=30.0,
        help="on SIGTERM/SIGINT, seconds to answer the calls accepted and exit",
    )
    flag(
        parser,
        "--drain-delay-s",
        type=number(float, minimum=0),
        default=0.0,
        help="on SIGTERM/SIGINT, seconds to go on taking calls (health NOT_SERVING) before refusing new ones, "
        "while load balancers take the server out (Kubernetes: a few seconds); within --grace-s",
    )
    flag(
        parser,
        "--max-message-bytes",
        type=number(int, minimum=1024),
        default=64 * MiB,
        help="largest gRPC message received or sent; larger ones get RESOURCE_EXHAUSTED",
    )
    flag(
        parser,
        "--max-request-rows",
        type=number(int, minimum=0),
        default=1024 * 1024,
        help="most rows (batch-axis length) of one request; larger ones get RESOURCE_EXHAUSTED; 0: no limit",
    )
    flag(
        parser,
        "--inline-max-us",
        type=number(int, minimum=0),
        default=None,
        help="run a model's batches on the event loop instead of instance threads up to the largest size "
        "(--max-batch-size, halved until it fits) that runs within this many microseconds, measured at load; "
        "larger batches run in threads; 0: always threads. Default: 50 where the server may use several cores "
        "(a hand-over to a thread costs 40-75 us of CPU), 500 where it has one core",
    )
    flag(
        parser,
        "--model-control-mode",
        choices=("none", "poll", "explicit"),
        default="none",
        help="none: load every model at start-up, then change nothing; poll: also rescan the repository every "
        "--repository-poll-s (new versions load, removed ones unload, changed files reload); explicit: load "
        "only --load-model at start-up, then load and unload through the repository API",
    )
    flag(
        parser,
        "--repository-poll-s",
        type=number(float, above=0),
        default=15.0,
        help="with --model-control-mode poll: seconds between scans of the repository",
    )
    flag(
        parser,
        "--load-model",
        action="append",
        default=[],
        metavar="NAME",
        help="with --model-control-mode explicit: a model to load at start-up (repeat the flag for more; "
        "comma-separated in the variable)",
    )
    flag(
        parser,
        "--strict-readiness",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ready only when every model that is to be served has a version ready (Triton's default); "
        "--no-strict-readiness: ready once started",
    )
    flag(
        parser,
        "--tls-cert",
        env="SERVE_TLS_CERT",
        type=Path,
        help="serve TLS with this certificate (PEM; with --tls-key); replaced files are used for new connections",
    )
    flag(parser, "--tls-key", env="SERVE_TLS_KEY", type=Path, help="the private key (PEM) of --tls-cert")
    flag(
        parser,
        "--tls-client-ca",
        type=Path,
        help="require a client certificate signed by this CA (PEM): mutual TLS; needs --tls-cert",
    )
    flag(
        parser,
        "--auth-token-file",
        type=Path,
        help="require 'authorization: Bearer <token>' with a token from this file (one per line) on every RPC "
        "but --auth-open; the file is read again when it changes",
    )
    flag(
        parser,
        "--auth-open",
        type=names,
        default=",".join(OPEN_BY_DEFAULT),
        help="with --auth-token-file, the RPCs open without a token: methods of the inference service, "
        "Service/Method or whole services, comma-separated; empty: none",
    )
    flag(
        parser,
        "--metrics-host",
        help="host of the /metrics endpoint (plain HTTP); default: the gRPC --host",
    )
    flag(
        parser,
        "--workers",
        type=positive,
        default=1,
        help="server processes sharing the gRPC port (SO_REUSEPORT), each with its own sessions and batcher; "
        "metrics are summed over them",
    )


def config_from_args(args: argparse.Namespace):
    from serving.server.app import ServerConfig

    return ServerConfig(
        model_repository=Path(args.model_repository),
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        device=args.device,
        tf32=args.tf32,
        max_batch_size=args.max_batch_size,
        max_queue_delay_us=args.max_queue_delay_us,
        instances=args.instances,
        max_queue_size=args.max_queue_size,
        batching=not args.no_batching,
        grace_s=args.grace_s,
        drain_delay_s=args.drain_delay_s,
        max_message_bytes=args.max_message_bytes,
        max_request_rows=args.max_request_rows,
        inline_max_us=args.inline_max_us,
        model_control_mode=args.model_control_mode,
        repository_poll_s=args.repository_poll_s,
        load_models=tuple(args.load_model),
        strict_readiness=args.strict_readiness,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        auth_token_file=args.auth_token_file,
        auth_open=tuple(args.auth_open),
        metrics_host=args.metrics_host,
        workers=args.workers,
    )


def run(args: argparse.Namespace) -> int:
    from serving.server.app import run_server
    from serving.server.workers import serve_workers

    config = config_from_args(args)
    if config.workers > 1 and config.model_control_mode == "explicit":
        # Each worker is a server of its own: a load or unload would reach only the one that took the call.
        print(
            "xorserve serve: error: --model-control-mode explicit needs --workers 1 (each worker would load and "
            "unload on its own); use poll to change the models of several workers",
            file=sys.stderr,
        )
        return USAGE
    if config.workers > 1:
        return serve_workers(config, logging.getLogger().level)
    try:
        return run_server(config)
    except (DeviceUnavailableError, OSError, ValueError) as exc:
        log.error("event=startup_failed reason=%r", str(exc))
        print(f"xorserve serve: cannot start: {exc}", file=sys.stderr)
        return USAGE
