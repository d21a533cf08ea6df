"""The console script's conventions: help, version, global options, one flag table with its variables,
one-line usage errors with exit 2 (from a flag or from the environment), and names that do not collide."""

import argparse
import os
import re
import subprocess

import pytest
from conftest import run_xorserve

from serving.cli.flags import Parser, UsageError, number
from serving.cli.main import COMMANDS, command_parser


def xorserve(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_xorserve(*args, timeout=120, env={**os.environ, **(env or {})})


def parsers() -> dict[str, Parser]:
    return {command: command_parser(command)[0] for command in COMMANDS}


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


def test_version_is_the_installed_package_version():
    from importlib import metadata

    result = xorserve("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"xorserve {metadata.version('xorserve')}"


def test_a_bare_xorserve_prints_a_plain_usage_line_and_exits_2():
    result = xorserve()
    assert result.returncode == 2
    assert result.stderr.startswith("usage: xorserve [--log-level LEVEL] [--version] COMMAND")
    assert "REMAINDER" not in result.stderr and "args" not in result.stderr


def test_unknown_command_is_refused_with_the_choices():
    result = xorserve("fly")
    assert result.returncode == 2
    assert result.stderr.strip() == f"xorserve: error: unknown command 'fly'; commands: {', '.join(COMMANDS)}"


@pytest.mark.parametrize("where", ["before", "after"])
def test_global_options_go_before_or_after_the_command(where, tmp_path, shipped_model_repository):
    # export logs event=export_done at INFO; WARNING silences it, wherever the option stands.
    state_dict = shipped_model_repository / "xor" / "1" / "state_dict.pt"
    command = ["export", str(state_dict), "--out", str(tmp_path / "model.onnx")]
    args = ["--log-level", "WARNING", *command] if where == "before" else [*command, "--log-level", "warning"]
    result = xorserve(*args)
    assert result.returncode == 0, result.stderr
    assert "event=export_done" not in result.stderr
    assert "event=export_done" in xorserve(*command).stderr


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_bad_variable_is_one_line_and_exit_2_even_before_help(command):
    result = xorserve(command, "--help", env={"XORSERVE_LOG_LEVEL": "LOUD"})
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"xorserve {command}: error: XORSERVE_LOG_LEVEL='LOUD': 'LOUD' is not one of DEBUG, INFO, WARNING, ERROR, "
        "CRITICAL"
    ]


@pytest.mark.parametrize(
    ("command", "variable", "value"),
    [
        ("serve", "XORSERVE_PORT", "abc"),
        ("predict", "XORSERVE_TIMEOUT_S", "abc"),
        ("score", "XORSERVE_CHUNK_ROWS", "0"),
        ("train", "XORSERVE_EPOCHS", "-1"),
        ("loadtest", "XORSERVE_DURATION", "soon"),
        ("serve", "XORSERVE_NO_BATCHING", "maybe"),
        ("serve", "XORSERVE_DEVICE", "tpu"),
    ],
)
def test_a_bad_value_from_the_environment_names_the_variable(command, variable, value):
    result = xorserve(command, "--help", env={variable: value})
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"xorserve {command}: error: {variable}={value!r}: ")


@pytest.mark.parametrize(
    "args",
    [
        ["serve", "--model-repository", "models", "--workers", "0"],
        ["serve", "--model-repository", "models", "--max-batch-size", "0"],
        ["serve", "--model-repository", "models", "--instances", "0"],
        ["serve", "--model-repository", "models", "--port", "70000"],
        ["predict", "--timeout-s", "0", "0,0"],
        ["score", "in.csv", "out.csv", "--model-dir", "m", "--concurrency", "0"],
        ["loadtest", "--users", "0"],
        ["train", "--out", "x", "--lr", "nan"],
        ["health", "--bogus"],
    ],
)
def test_a_bad_flag_is_one_line_and_exit_2_in_every_command(args):
    result = xorserve(*args)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"xorserve {args[0]}: error: ")


def test_every_flag_reads_a_variable_named_in_its_help():
    for command, parser in parsers().items():
        for action in parser._actions:  # the test may read argparse's own table; the code does not
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            assert getattr(action, "env", None), f"{command} {action.option_strings[0]} has no variable"
            assert f"env {action.env}" in action.help, f"{command} {action.option_strings[0]}"


def test_a_variable_read_by_several_commands_means_the_same_in_each():
    readers: dict[str, list[tuple[str, argparse.Action]]] = {}
    for command, parser in parsers().items():
        for variable, action in parser.env_flags.items():
            readers.setdefault(variable, []).append((command, action))
    for variable, uses in readers.items():
        if len(uses) > 1 and variable != "XORSERVE_LOG_LEVEL":
            unshared = [command for command, action in uses if not getattr(action, "shared", False)]
            assert not unshared, f"{variable} is read by {[c for c, _ in uses]}; not declared as shared in {unshared}"
    assert readers["XORSERVE_LOCUST_WORKERS"][0][0] == "loadtest"
    assert [command for command, _ in readers["XORSERVE_WORKERS"]] == ["serve"]
    assert [command for command, _ in readers["XORSERVE_MODEL_DIR"]] == ["score"]


def test_model_is_a_model_name_in_every_command():
    for command, parser in parsers().items():
        action = parser.env_flags.get("XORSERVE_MODEL")
        if action is not None:
            assert getattr(action, "shared", False) and action.type is None, command  # a name, never a Path


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


def test_a_boolean_variable_takes_only_the_usual_words(monkeypatch):
    from serving.cli.flags import flag

    monkeypatch.setenv("XORSERVE_QUIET", "yes")
    parser = Parser(prog="t")
    flag(parser, "--quiet", action="store_true", help="q")
    assert parser.parse_args([]).quiet is True
    monkeypatch.setenv("XORSERVE_QUIET", "perhaps")
    with pytest.raises(UsageError, match="XORSERVE_QUIET='perhaps'"):
        flag(Parser(prog="t"), "--quiet", action="store_true", help="q")


def documented_commands() -> list[tuple[str, list[str]]]:
    """Every `xorserve ...` command line in the shell code blocks of README.md and docs/*.md (a `text` block
    is a synopsis or output, and so is a `console` block's line without "$ "; a command that uses a shell
    variable is skipped: it has no value to check)."""
    import shlex
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    found = []
    for path in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        fence, pending = None, ""
        for raw in path.read_text().splitlines():
            if raw.lstrip().startswith("```"):
                fence = None if fence is not None else (raw.strip()[3:] or "plain")
                continue
            if fence in (None, "text"):
                continue
            if fence == "console" and not pending and not raw.strip().startswith("$ "):
                continue  # a console block's output (a command's error line may start with "xorserve")
            line = pending + raw.strip()
            if line.endswith("\\"):
                pending = line[:-1] + " "
                continue
            pending = ""
            if "xorserve" not in line:
                continue
            lexer = shlex.shlex(line.removeprefix("$ "), posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            try:
                words = list(lexer)
            except ValueError:  # output, not a command line
                continue
            for start, word in enumerate(words):
                if word.split("/")[-1] == "xorserve" and start + 1 < len(words):
                    rest = words[start + 1 :]
                    stop = next((i for i, w in enumerate(rest) if w[0] in ";&|<>()"), len(rest))
                    if stop and rest[stop - 1].isdigit() and stop < len(rest) and rest[stop][0] in "<>":
                        stop -= 1  # 2>/dev/null
                    if not any("$" in w for w in rest[:stop]):
                        found.append((f"{path.name}: {line}", rest[:stop]))
                    break
    return found


def test_the_docs_show_a_command_for_every_command():
    shown = {args[0] for _, args in documented_commands() if args and not args[0].startswith("-")}
    assert shown >= set(COMMANDS)


@pytest.mark.parametrize(("where", "args"), documented_commands(), ids=lambda value: str(value)[:80])
def test_every_command_in_the_readme_and_docs_parses(where, args):
    from serving.cli.main import _split

    before, command, rest = _split(args)
    assert command is not None, where
    parser, module = command_parser(command)
    parse = getattr(module, "parse_args", None)
    try:
        parse(parser, rest) if parse else parser.parse_args(rest)
    except SystemExit as exc:
        pytest.fail(f"{where}: exits {exc.code} on parsing")


def test_an_empty_variable_counts_as_unset_for_a_flag_that_is_off_unless_given(monkeypatch):
    from pathlib import Path

    from serving.cli.flags import flag

    monkeypatch.setenv("XORSERVE_TOKEN_FILE", "")
    parser = Parser(prog="t")
    flag(parser, "--token-file", type=Path, help="t")
    assert parser.parse_args([]).token_file is None  # not Path("") == Path(".")
    monkeypatch.setenv("XORSERVE_PORT", "")
    with pytest.raises(UsageError, match="XORSERVE_PORT=''"):  # a flag with a default still checks the value
        flag(Parser(prog="t"), "--port", type=number(int, minimum=0), default=8001, help="p")
