"""`xorserve loadtest`: Locust runs headless against a server, and its reports agree with each other.

Which figures agree: summary.json's request and failure counts equal those of Locust's CSV and HTML
tables, per task and in total. Its rates and percentiles are over the successful calls only and at
0.01 ms, so they are not compared with Locust's, which time failed calls too, in whole milliseconds.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import signal
import socket
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import psutil
import pytest

from loadtest.runner import add_arguments, duration_s, format_table, objectives_missed
from loadtest.timings import Histogram, ResponseTimes, summarize
from serving.cli import main as cli
from serving.cli.flags import Parser, UsageError
from serving.client.health import check

TASKS = {"ModelInfer[1]", "ModelInfer[64]", "ModelMetadata"}
RUN_TIMEOUT_S = 150


def xorserve_loadtest(out: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "serving.cli", "loadtest", "--out", str(out), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def start_reading(command: list[str]) -> tuple[subprocess.Popen, threading.Event, list[str], threading.Thread]:
    """Starts `command` with its output collected line by line in a thread (stdout and stderr together);
    the event is set once Locust says all users are spawned, or the output ends."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    spawned = threading.Event()
    output: list[str] = []

    def pump() -> None:
        for line in process.stdout:
            output.append(line)
            if "All users spawned" in line:
                spawned.set()
        spawned.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    return process, spawned, output, reader


def csv_counts(out: Path) -> dict[str, tuple[int, int]]:
    with (out / "locust_stats.csv").open(newline="") as file:
        return {row["Name"]: (int(row["Request Count"]), int(row["Failure Count"])) for row in csv.DictReader(file)}


def html_counts(out: Path) -> dict[str, tuple[int, int]]:
    # The report embeds its data as one JSON object on the line `window.templateArgs = {...}`.
    match = re.search(r"window\.templateArgs = (\{.*\})\s*;?\s*$", (out / "report.html").read_text(), re.MULTILINE)
    assert match, "report.html carries no templateArgs"
    rows = json.loads(match.group(1))["requests_statistics"]
    return {row["name"]: (row["num_requests"], row["num_failures"]) for row in rows}


def summary_counts(summary: dict) -> dict[str, tuple[int, int]]:
    rows = {**summary["tasks"], "Aggregated": summary["total"]}
    return {name: (row["requests"], row["failures"]) for name, row in rows.items()}


@pytest.fixture(scope="module")
def started_run(tmp_path_factory, model_repository):
    """The issue's run: --start-server, 8 users, 5 seconds."""
    out = tmp_path_factory.mktemp("loadtest")
    result = xorserve_loadtest(
        out, "--start-server", "--model-repository", str(model_repository), "--users", "8", "--duration", "5s"
    )
    return result, out, json.loads((out / "summary.json").read_text())


# --- the runner's pieces, no Locust involved ---


def test_duration_accepts_locust_style_spans():
    assert [duration_s(text) for text in ("45", "30s", "2m", "1h30m", "1m5s")] == [45, 30, 120, 5400, 65]


@pytest.mark.parametrize("text", ["", "5x", "m", "1.5s", "-3s", "0", "0s"])
def test_duration_rejects_what_locust_would_not_read(text):
    with pytest.raises(argparse.ArgumentTypeError):
        duration_s(text)


def test_flags_fall_back_to_environment_variables(monkeypatch):
    monkeypatch.setenv("XORSERVE_USERS", "3")
    monkeypatch.setenv("XORSERVE_DURATION", "2m")
    monkeypatch.setenv("XORSERVE_MAX_P99_MS", "7.5")
    monkeypatch.setenv("XORSERVE_LOADTEST_OUT", "results/here")
    parser = Parser(prog="xorserve loadtest")
    add_arguments(parser)
    args = parser.parse_args([])
    assert (args.users, args.duration, args.max_p99_ms, args.spawn_rate) == (3, 120, 7.5, None)
    assert args.out == Path("results/here")


def test_out_ignores_the_variable_other_commands_use_for_their_folders(monkeypatch):
    monkeypatch.setenv("XORSERVE_OUT", "models/xor/1")  # `xorserve train --out`'s fallback
    parser = Parser(prog="xorserve loadtest")
    add_arguments(parser)
    assert parser.parse_args([]).out == Path("out/loadtest")


def _usage_error(capsys, *argv: str) -> str:
    parser, _ = cli.command_parser("loadtest")
    with pytest.raises(SystemExit) as exited:
        parser.parse_args(list(argv))
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--users", "0"], "argument --users: must be at least 1, not 0"),
        (["--users", "many"], "argument --users: 'many' is not an integer"),
        (["--locust-workers", "-1"], "argument --locust-workers: must be at least 0, not -1"),
        (["--spawn-rate", "0"], "argument --spawn-rate: must be more than 0, not 0"),
        (["--max-fail-ratio", "1.5"], "argument --max-fail-ratio: must be at most 1, not 1.5"),
        (["--duration", "0s"], "argument --duration: duration '0s' is shorter than a second"),
    ],
)
def test_bad_numbers_exit_2_with_one_line(capsys, argv, message):
    assert message in _usage_error(capsys, *argv)


def test_bad_number_from_the_environment_is_a_usage_error_naming_the_variable(monkeypatch):
    monkeypatch.setenv("XORSERVE_USERS", "0")
    with pytest.raises(UsageError, match=re.escape("XORSERVE_USERS='0': must be at least 1, not 0")):
        cli.command_parser("loadtest")


@pytest.mark.parametrize("inside", [False, True])
def test_out_on_an_existing_file_exits_2_with_one_line(tmp_path, capsys, inside):
    (tmp_path / "results").write_text("not a folder\n")
    out = tmp_path / "results" / "run1" if inside else tmp_path / "results"
    assert f"{tmp_path / 'results'} exists and is not a folder" in _usage_error(capsys, "--out", str(out))


def test_percentiles_are_nearest_rank_at_hundredths_of_a_millisecond():
    times = [0.37, 0.41, 0.41, 0.52, 0.58, 0.63, 0.77, 0.91, 1.05, 12.34]
    histogram = Histogram()
    for value in times:
        histogram.record(value, failed=False)
    for q in (0.5, 0.95, 0.99, 0.1):
        assert histogram.percentile_ms(q) == sorted(times)[math.ceil(q * len(times)) - 1]


def test_merged_worker_histograms_equal_one_histogram_of_all_calls():
    calls = [("a", 0.5, False), ("b", 1.25, True), ("a", 0.51, False), ("a", 3.0, True), ("b", 1.25, False)]
    whole, first, second = ResponseTimes(), ResponseTimes(), ResponseTimes()
    for index, call in enumerate(calls):
        whole.record(*call)
        (first if index % 2 else second).record(*call)
    merged = ResponseTimes()
    # Workers ship their share through msgpack/JSON dicts, so merge what comes back from JSON.
    for share in (first, second):
        merged.merge(ResponseTimes.from_dict(json.loads(json.dumps(share.drain()))))
    assert merged.to_dict() == whole.to_dict()
    assert first.by_name == {}


def test_summary_counts_every_call_but_times_and_rates_only_the_successful_ones():
    times = ResponseTimes()
    for value, failed in [(1.0, False), (0.01, True), (3.0, False), (4.0, False)]:
        times.record("x", value, failed)
    total = summarize(times, elapsed_s=2.0)["total"]
    assert (total["requests"], total["failures"], total["successes"], total["fail_ratio"]) == (4, 1, 3, 0.25)
    assert total["rps"] == 3 / 2.0
    assert (total["p50_ms"], total["max_ms"], total["mean_ms"]) == (3.0, 4.0, round(8.0 / 3, 3))


def test_fast_failures_show_no_rate_or_latency_and_miss_the_objectives():
    times = ResponseTimes()
    for _ in range(50):
        times.record("ModelInfer[1]", 0.7, failed=True)  # a dead server answers fast
    summary = summarize(times, elapsed_s=1.0)
    total = summary["total"]
    assert (total["rps"], total["p50_ms"], total["p99_ms"], total["mean_ms"]) == (0.0, None, None, None)
    missed = objectives_missed(total, max_p99_ms=5.0, max_fail_ratio=1.0)
    assert missed == ["no request succeeded: no latency measured"]
    total_line = format_table(summary).splitlines()[-2]
    assert total_line.split() == ["total", "50", "50", "100.00", "-", "-", "-", "-"]


def test_objectives_name_each_miss():
    row = {"requests": 100, "failures": 2, "fail_ratio": 0.02, "successes": 98, "p99_ms": 4.5}
    assert objectives_missed(row, max_p99_ms=5.0, max_fail_ratio=0.05) == []
    missed = objectives_missed(row, max_p99_ms=1.0, max_fail_ratio=0.0)
    assert len(missed) == 2
    assert any("p99 4.50 ms" in miss for miss in missed)
    assert any("2 of 100" in miss for miss in missed)


def test_a_run_without_requests_misses_its_objectives():
    assert objectives_missed({"requests": 0}, max_p99_ms=None, max_fail_ratio=1.0) == ["no request completed"]


# --- real runs ---


@pytest.mark.slow
def test_started_server_run_makes_requests_without_failures(started_run):
    result, _, summary = started_run
    assert result.returncode == 0, result.stdout + result.stderr
    assert summary["total"]["requests"] > 0
    assert summary["total"]["failures"] == 0
    assert summary["passed"] is True
    assert set(summary["tasks"]) == TASKS


@pytest.mark.slow
def test_summary_agrees_with_locust_csv(started_run):
    _, out, summary = started_run
    assert csv_counts(out) == summary_counts(summary)


@pytest.mark.slow
def test_summary_agrees_with_html_report(started_run):
    _, out, summary = started_run
    assert html_counts(out) == summary_counts(summary)


@pytest.mark.slow
def test_summary_percentiles_are_ordered_for_every_task(started_run):
    _, _, summary = started_run
    for row in [*summary["tasks"].values(), summary["total"]]:
        assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"] <= row["max_ms"]
        assert row["rps"] > 0


@pytest.mark.slow
def test_response_times_are_kept_below_the_millisecond(started_run):
    _, out, _ = started_run
    recorded = json.loads((out / "locust_response_times.json").read_text())
    hundredths = Counter()
    for histogram in recorded["names"].values():
        hundredths.update({int(key): count for key, count in histogram["hundredths"].items()})
    # Rounded to whole milliseconds (Locust's default), every time would fall on a multiple of 100.
    assert len({key // 100 for key in hundredths}) < len(hundredths)


@pytest.mark.slow
def test_printed_table_ends_with_the_total_row(started_run):
    result, _, summary = started_run
    total = summary["total"]
    assert re.search(rf"^total\s+{total['requests']}\s+{total['failures']}\s", result.stdout, re.MULTILINE)
    assert "successful requests only" in result.stdout
    assert "PASS" in result.stdout


@pytest.mark.slow
def test_started_server_is_stopped_after_the_run(started_run):
    result, _, _ = started_run
    url = re.search(r"event=server_started url=(\S+)", result.stderr).group(1)
    status, message = check(url, timeout_s=2.0)
    assert status is None
    assert message.startswith("UNAVAILABLE")


@pytest.mark.slow
def test_impossible_latency_objective_exits_non_zero(tmp_path, server):
    result = xorserve_loadtest(
        tmp_path, "--url", server.address, "--users", "2", "--duration", "2s", "--max-p99-ms", "0.001"
    )
    assert result.returncode == 1, result.stdout + result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["passed"] is False
    assert summary["total"]["failures"] == 0
    assert [miss for miss in summary["violations"] if miss.startswith("p99")]


@pytest.mark.slow
def test_server_stopped_halfway_shows_as_failures_and_exits_non_zero(tmp_path, server_factory):
    handle = server_factory()
    command = [sys.executable, "-m", "serving.cli", "loadtest", "--url", handle.address, "--out", str(tmp_path)]
    command += ["--users", "8", "--duration", "5s", "--deadline-ms", "500"]
    process, spawned, output, reader = start_reading(command)
    try:
        assert spawned.wait(60), "".join(output)
        handle.stop(grace_s=1.0)
        assert process.wait(RUN_TIMEOUT_S) == 1, "".join(output)
    finally:
        process.kill()
        reader.join(10)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["total"]["failures"] > 0
    assert csv_counts(tmp_path) == summary_counts(summary)


@pytest.mark.slow
def test_distributed_run_merges_every_workers_times(tmp_path, server):
    result = xorserve_loadtest(
        tmp_path, "--url", server.address, "--users", "4", "--duration", "3s", "--locust-workers", "2"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["total"]["requests"] > 0
    assert csv_counts(tmp_path) == summary_counts(summary)
    assert sorted(path.name for path in tmp_path.glob("locust-worker-*.log")) == [
        "locust-worker-1.log",
        "locust-worker-2.log",
    ]


@pytest.mark.slow
def test_an_unreachable_server_exits_3_before_any_load_is_sent(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        url = f"127.0.0.1:{probe.getsockname()[1]}"  # nothing listens there once the probe is closed
    result = xorserve_loadtest(tmp_path, "--url", url, "--users", "2", "--duration", "2s")
    assert result.returncode == 3, result.stdout + result.stderr
    assert f"event=server_unreachable url={url}" in result.stderr
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / "locust.log").exists()


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow
def test_sigterm_stops_the_runner_its_server_and_locust(tmp_path, model_repository):
    command = [sys.executable, "-m", "serving.cli", "loadtest", "--start-server", "--out", str(tmp_path)]
    command += ["--model-repository", str(model_repository), "--users", "2", "--duration", "30s"]
    runner, spawned, output, reader = start_reading(command)
    children: list[psutil.Process] = []
    try:
        assert spawned.wait(90), "".join(output)
        children = psutil.Process(runner.pid).children(recursive=True)
        commands = [" ".join(child.cmdline()) for child in children]
        assert any("serving.cli serve" in c for c in commands) and any("-m locust" in c for c in commands), commands
        runner.send_signal(signal.SIGTERM)
        runner.wait(90)
        assert [child.pid for child in children if _alive(child)] == [], "".join(output)
        assert runner.returncode == 128 + signal.SIGTERM, "".join(output)
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
        for child in children:
            if _alive(child):
                child.kill()
        reader.join(10)
