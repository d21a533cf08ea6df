"""The `xorserve` console script: one subcommand per job, each imported only when it runs.

Each subcommand lives in its own module, which provides `add_arguments(parser)` and
`run(args) -> int`. Only the chosen module is imported, so `xorserve serve` never loads torch.
Every flag can also be set through an environment variable (see `env_default`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import os
import sys
from collections.abc import Callable

# name -> (module, one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("trainer.pipeline", "train the XOR classifier, export it to ONNX and check parity"),
    "export": ("trainer.export", "export a saved state_dict to ONNX"),
    "parity": ("trainer.parity", "compare PyTorch with ONNX Runtime (and a running server)"),
    "serve": ("serving.server", "serve a model repository over the Open Inference Protocol (gRPC)"),
    "predict": ("serving.predict", "send points to a running server and print the predictions"),
    "score": ("serving.score", "score a CSV or Parquet file, through a server or in-process"),
    "loadtest": ("loadtest.runner", "run a headless Locust load test against a server"),
    "demo": ("serving.demo", "the whole pipeline on the shipped model: train, serve, use, load-test"),
}


def env_default(name: str, default):
    """The value of XORSERVE_<NAME> if set (converted to the default's type), else the default."""
    raw = os.environ.get("XORSERVE_" + name.upper().replace("-", "_"))
    if raw is None:
        return default
    if isinstance(default, bool):
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if default is None:
        return raw
    return type(default)(raw)


def number(
    kind: type, minimum: float | None = None, above: float | None = None, maximum: float | None = None
) -> Callable[[str], int | float]:
    """An argparse type: a finite `kind` (int or float) within the bounds, else a one-line error naming them.

    Give numeric defaults as text (`env_default("users", "32")`): argparse converts and checks only
    string defaults, so a value from the environment is then checked like one on the command line.
    """

    def shown(bound: float) -> str:
        return f"{bound:g}" if isinstance(bound, float) else str(bound)

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {shown(minimum)}, not {text}")
        if above is not None and not value > above:
            raise argparse.ArgumentTypeError(f"must be more than {shown(above)}, not {text}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {shown(maximum)}, not {text}")
        return value

    parse.__name__ = kind.__name__  # what argparse calls the type in its own messages
    return parse


def _top_parser() -> argparse.ArgumentParser:
    epilog = "commands:\n" + "\n".join(f"  {name:<9} {summary}" for name, (_, summary) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="xorserve",
        description="Train, export, serve and measure the XOR classifier of the course notes.",
        epilog=epilog + "\n\n`xorserve COMMAND --help` describes each command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND")
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def command_parser(command: str) -> tuple[argparse.ArgumentParser, object]:
    """The argument parser of one subcommand and its module (imported here, and only here)."""
    module_name, summary = COMMANDS[command]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(
        prog=f"xorserve {command}",
        description=(module.__doc__ or summary).strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--log-level", default=env_default("log_level", "INFO"), help="logging level (env XORSERVE_LOG_LEVEL)"
    )
    module.add_arguments(parser)
    return parser, module


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    top = _top_parser().parse_args(argv[:1])
    parser, module = command_parser(top.command)
    args = parser.parse_args(argv[1:])
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
        stream=sys.stderr,
    )
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
