"""The `xorserve` console script: global options, then one command, whose module is imported only when it runs.

    xorserve [--log-level LEVEL] [--version] COMMAND [ARGS ...]

Each command is a module with `add_arguments(parser)` and `run(args) -> int` (and, optionally,
`parse_args(parser, argv)`). Only the chosen module is
imported, so `xorserve serve` never loads torch. The trainer's commands (train, export, parity) and the
load test live in their own packages; this table names them by module path and imports none of them.
Global options may come before or after the command. Exit codes: serving.cli.flags.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from importlib import metadata

from serving.cli.flags import USAGE, Parser, UsageError, flag

# name -> (module, one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("trainer.pipeline", "train the XOR classifier, export it to ONNX and check parity"),
    "export": ("trainer.export", "export a saved state_dict to ONNX"),
    "parity": ("trainer.parity", "compare PyTorch with ONNX Runtime (and a running server)"),
    "serve": ("serving.cli.serve", "serve a model repository over the Open Inference Protocol (gRPC)"),
    "predict": ("serving.cli.predict", "send points to a running server and print the predictions"),
    "score": ("serving.cli.score", "score a CSV or Parquet file, through a server or in-process"),
    "loadtest": ("loadtest.runner", "run a headless Locust load test against a server"),
    "health": ("serving.cli.health", "ask a server's grpc.health.v1 service whether it is SERVING"),
    "demo": ("serving.cli.demo", "the whole pipeline on the shipped model: train, serve, use, load-test"),
}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
USAGE_LINE = "xorserve [--log-level LEVEL] [--version] COMMAND [ARGS ...]"


def version() -> str:
    try:
        return metadata.version("xorserve")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def log_level(text: str) -> str:
    if text.upper() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(LOG_LEVELS)}")
    return text.upper()


def add_global_options(parser: Parser) -> None:
    flag(parser, "--log-level", type=log_level, default="INFO", help="logging level, for every command")


def top_parser() -> Parser:
    epilog = "commands:\n" + "\n".join(f"  {name:<9} {summary}" for name, (_, summary) in COMMANDS.items())
    parser = Parser(
        prog="xorserve",
        usage=USAGE_LINE,
        description="Train, export, serve and measure the XOR classifier of the course notes.",
        epilog=epilog + "\n\n`xorserve COMMAND --help` describes each command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_global_options(parser)
    parser.add_argument("--version", action="version", version=f"xorserve {version()}")
    return parser


def command_parser(command: str) -> tuple[Parser, object]:
    """The argument parser of one command and its module (imported here, and only here).

    Raises UsageError when an environment variable holds a value its flag refuses."""
    module_name, summary = COMMANDS[command]
    module = importlib.import_module(module_name)
    parser = Parser(
        prog=f"xorserve {command}",
        description=(module.__doc__ or summary).strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_global_options(parser)
    module.add_arguments(parser)
    return parser, module


def _split(argv: list[str]) -> tuple[list[str], str | None, list[str]]:
    """(global options, the command, its arguments): the command is the first word that names one."""
    for index, word in enumerate(argv):
        if word in COMMANDS and not (index and argv[index - 1] == "--log-level"):
            return argv[:index], word, argv[index + 1 :]
    return argv, None, []


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    before, command, rest = _split(argv)
    words = [w for i, w in enumerate(before) if not w.startswith("-") and (i == 0 or before[i - 1] != "--log-level")]
    if command is None and words:
        print(f"xorserve: error: unknown command {words[0]!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return USAGE
    try:
        top = top_parser().parse_args(before)  # --help and --version exit here
        if command is None:
            print(f"usage: {USAGE_LINE}\ncommands: {', '.join(COMMANDS)}", file=sys.stderr)
            return USAGE
        parser, module = command_parser(command)
    except UsageError as exc:
        print(f"xorserve{' ' + command if command else ''}: error: {exc}", file=sys.stderr)
        return USAGE
    parser.set_defaults(log_level=top.log_level)  # given before the command; one given after it wins
    # A command may parse its own way (predict takes points such as -0.5,1 that argparse takes for options).
    args = module.parse_args(parser, rest) if hasattr(module, "parse_args") else parser.parse_args(rest)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
        stream=sys.stderr,
    )
    return int(module.run(args) or 0)
