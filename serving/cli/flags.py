"""Command-line flags, each declared once with its environment variable; the exit codes of every command.

The standard library only (and serving.devices, which is too): trainer/ and loadtest/ build their
commands' parsers from this module and import nothing else of the command layer.

    flag(parser, "--port", type=number(int, minimum=0), default=8001, help="gRPC port; 0 picks a free one")

declares `--port`, reads XORSERVE_PORT when it is set, and ends the help with "(default 8001; env
XORSERVE_PORT)". A value from the environment is checked when the parser is built, like one on the
command line, so a bad one is a one-line usage error (exit 2) even before `--help`. A flag whose name
means something else in another command takes a scoped variable (`env="TRAIN_OUT"`); the flags that
mean the same everywhere are declared once, here (`url`, `model`, `model_version`, `device`).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path

from serving.devices import DEVICES

PREFIX = "XORSERVE_"

# The exit codes of every command (README, "Exit codes").
OK = 0
CHECK_FAILED = 1  # parity missed, an objective missed, rows rejected, not serving
USAGE = 2  # a bad flag, variable or input; a device or port that cannot be had
UNREACHABLE = 3  # the server or the model could not be reached
INTERRUPTED = 130  # SIGINT; SIGTERM is 143 (128 + the signal's number)

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


class UsageError(Exception):
    """A flag or variable value that cannot work: the command prints it as one line and exits 2."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`xorserve serve: error: argument --port: ...`, exit 2), and a record of
    the variables its flags read (`env_flags`)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.env_flags: dict[str, argparse.Action] = {}

    def error(self, message: str):
        self.exit(USAGE, f"{self.prog}: error: {message}\n")


def env_name(option: str) -> str:
    """--chunk-rows -> XORSERVE_CHUNK_ROWS."""
    return PREFIX + option.lstrip("-").upper().replace("-", "_")


def flag(parser: Parser, *names: str, env: str | bool = True, help: str, **kwargs) -> argparse.Action:
    """Adds the flag; `env`: True for XORSERVE_<FLAG>, a scoped suffix such as "TRAIN_OUT", or False for none."""
    action = parser.add_argument(*names, help=help, **kwargs)
    if env is False:
        return action
    variable = env_name(names[0] if env is True else env)
    action.env = variable
    parser.env_flags[variable] = action
    raw = os.environ.get(variable)
    if raw is not None:
        action.default = _from_environment(action, kwargs.get("action"), variable, raw)
        action.required = False
    notes = []
    if action.default not in (None, False) and action.default != [] and raw is None:
        notes.append(f"default {action.default}")
    notes.append(f"env {variable}")
    action.help = f"{help} ({'; '.join(notes)})"
    return action


def _from_environment(action: argparse.Action, kind: str | None, variable: str, raw: str):
    """The variable's value converted and checked as the flag's value would be; UsageError otherwise."""
    if kind in ("store_true", "store_false", argparse.BooleanOptionalAction):
        text = raw.strip().lower()
        if text not in _TRUE + _FALSE:
            raise UsageError(f"{variable}={raw!r}: expected one of 1, 0, true, false, yes, no, on, off")
        return (text in _TRUE) == (kind != "store_false")
    if not raw.strip() and action.default is None and kind is None:
        return None  # empty: as if unset, for a flag that is off unless given (e.g. XORSERVE_TOKEN_FILE=)
    if kind == "append":  # a list: comma-separated in the variable
        return [_from_environment(action, None, variable, item.strip()) for item in raw.split(",") if item.strip()]
    try:
        value = action.type(raw) if action.type is not None else raw
    except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
        raise UsageError(f"{variable}={raw!r}: {exc}") from None
    if action.choices is not None and value not in action.choices:
        raise UsageError(f"{variable}={raw!r}: expected one of {', '.join(map(str, action.choices))}")
    return value


def number(
    kind: type, minimum: float | None = None, above: float | None = None, maximum: float | None = None
) -> Callable[[str], int | float]:
    """An argparse type: a finite `kind` (int or float) within the bounds, else a one-line error naming them."""

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


# --- the flags that mean the same in every command -------------------------------------------------


def shared(action: argparse.Action) -> argparse.Action:
    """Marks a flag that means the same in every command that has it (tests/test_cli.py checks the others)."""
    action.shared = True
    return action


def url(parser: Parser, help: str = "server HOST:PORT", default: str | None = "127.0.0.1:8001") -> argparse.Action:
    return shared(flag(parser, "--url", default=default, help=help))


def model(parser: Parser, help: str = "model name on the server", default: str | None = "xor") -> argparse.Action:
    return shared(flag(parser, "--model", default=default, help=help))


def model_version(parser: Parser, help: str = "model version on the server; empty: the latest") -> argparse.Action:
    return shared(flag(parser, "--model-version", default="", help=help))


def model_repository(parser: Parser, help: str, **kwargs) -> argparse.Action:
    return shared(flag(parser, "--model-repository", type=Path, help=help, **kwargs))


def device(parser: Parser, help: str) -> argparse.Action:
    return shared(flag(parser, "--device", choices=DEVICES, default="auto", help=help))


def timeout_s(parser: Parser, default: float, help: str = "deadline of each request, in seconds") -> argparse.Action:
    return shared(flag(parser, "--timeout-s", type=number(float, above=0), default=default, help=help))


def security(parser: Parser) -> None:
    """A client's TLS and token flags (serving.client.connect.Security), the same in every client command."""
    shared(flag(parser, "--tls-ca", type=Path, help="CA certificate (PEM) that signed the server's: connect with TLS"))
    shared(
        flag(
            parser,
            "--tls-cert",
            type=Path,
            help="this client's certificate (PEM), for a server that requires one (mutual TLS); with --tls-key",
        )
    )
    shared(flag(parser, "--tls-key", type=Path, help="the private key (PEM) of --tls-cert"))
    shared(
        flag(
            parser,
            "--token-file",
            type=Path,
            help="file holding the bearer token to send ('authorization: Bearer <token>')",
        )
    )
