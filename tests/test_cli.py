"""The console script: every command answers --help, and the dispatcher rejects what it does not know."""

import argparse
import re
import subprocess
import sys

import pytest

from serving.cli import COMMANDS, env_default, number


def xorserve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serving.cli", *args], capture_output=True, text=True, timeout=120)


def test_top_level_help_lists_every_command():
    result = xorserve("--help")
    assert result.returncode == 0
    for name in COMMANDS:
        assert f"  {name} " in result.stdout


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_answers_help(command):
    result = xorserve(command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: xorserve {command}")


def test_unknown_command_is_refused_with_the_choices():
    result = xorserve("fly")
    assert result.returncode == 2
    assert "invalid choice: 'fly'" in result.stderr


def test_env_default_converts_to_the_defaults_type(monkeypatch):
    monkeypatch.setenv("XORSERVE_PORT", "9001")
    monkeypatch.setenv("XORSERVE_NO_BATCHING", "true")
    assert env_default("port", 8001) == 9001
    assert env_default("no_batching", False) is True
    assert env_default("absent_flag", 1.5) == 1.5


@pytest.mark.parametrize(
    ("bounds", "text", "message"),
    [
        ({"kind": int, "minimum": 1}, "0", "must be at least 1, not 0"),
        ({"kind": float, "above": 0}, "0", "must be more than 0, not 0"),
        ({"kind": float, "minimum": 0, "maximum": 1}, "1.5", "must be at most 1, not 1.5"),
        ({"kind": float, "minimum": 0}, "nan", "'nan' is not a finite number"),
        ({"kind": int}, "1.5", "'1.5' is not an integer"),
    ],
)
def test_number_refuses_values_outside_its_bounds_naming_them(bounds, text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=re.escape(message)):
        number(**bounds)(text)


def test_number_accepts_values_within_its_bounds():
    assert number(int, minimum=1)("3") == 3
    assert number(float, above=0, maximum=1)("0.25") == 0.25
