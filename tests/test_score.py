"""`xorserve score`: file formats, row accounting, both back-ends, atomic output, bounded memory."""

from __future__ import annotations

import collections
import contextlib
import csv
import gzip
import io
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from serving.cli import main as cli
from serving.client import InferenceError
from serving.scoring import backends, interrupts, pipeline, readers, writers
from serving.scoring.validate import features

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def model_dir(model_repository: Path) -> Path:
    return model_repository / "xor" / "1"


@pytest.fixture
def reference(model_dir: Path):
    """The model's probabilities for an [n, 2] matrix, straight from ONNX Runtime."""
    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])

    def probabilities(x: np.ndarray) -> np.ndarray:
        return session.run(["probability"], {"input": np.asarray(x, np.float32)})[0].reshape(-1)

    return probabilities


@pytest.fixture
def score(capsys):
    """Runs `xorserve score ARGS` in this process; returns (exit status, stdout, stderr)."""

    def run(*args) -> tuple[int, str, str]:
        status = cli.main(["score", *map(str, args), "--log-level", "WARNING"])
        out, err = capsys.readouterr()
        return status, out, err

    return run


def _points(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-0.5, 1.5, size=(n, 2)).astype(np.float32)


def _summary(stdout: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in shlex.split(stdout))  # paths are quoted where they need it


def _errors(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write_csv(path: Path, header: str, lines: list[str]) -> Path:
    path.write_text(header + "\n" + "".join(line + "\n" for line in lines))
    return path


# --- formats --------------------------------------------------------------------------------------


def test_csv_to_csv_keeps_the_input_columns_and_adds_probability_and_label(tmp_path, score, model_dir, reference):
    x = _points(500)
    lines = [f"{i},{a!r},{b!r},note {i}" for i, (a, b) in enumerate(x.tolist())]
    source = _write_csv(tmp_path / "in.csv", "id,x1,x2,note", lines)
    status, out, _ = score(
        source, tmp_path / "out.csv", "--model-dir", model_dir, "--device", "cpu", "--chunk-rows", 64
    )
    assert status == 0
    assert _summary(out)["rows_scored"] == "500"
    result = pa_csv.read_csv(tmp_path / "out.csv", convert_options=pa_csv.ConvertOptions(strings_can_be_null=False))
    assert result.column_names == ["id", "x1", "x2", "note", "probability", "label"]
    assert result["id"].to_pylist() == list(range(500))
    assert result["note"].to_pylist() == [f"note {i}" for i in range(500)]
    probability = result["probability"].to_numpy().astype(np.float32)
    np.testing.assert_allclose(probability, reference(x), rtol=0, atol=1e-6)
    assert result["label"].to_pylist() == (probability >= 0.5).astype(int).tolist()


def test_csv_values_pass_through_as_written(tmp_path, score, model_dir):
    lines = ['1,0.50,1e0,"with, comma"', '2,+1.,.25,"with ""quote"""', "3,  7 ,0,plain"]
    source = _write_csv(tmp_path / "in.csv", "id,x1,x2,note", lines)
    status, _, _ = score(source, tmp_path / "out.csv", "--model-dir", model_dir, "--device", "cpu")
    assert status == 0
    with open(tmp_path / "out.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert [row[:4] for row in rows] == [["id", "x1", "x2", "note"], *csv.reader(lines)]


def test_parquet_to_parquet_keeps_types_order_and_other_columns(tmp_path, score, model_dir, reference):
    x = _points(1000, seed=1)
    table = pa.table(
        {
            "when": pa.array(np.arange(1000).astype("datetime64[s]")),
            "x1": pa.array(x[:, 0].astype(np.float64)),
            "x2": pa.array(x[:, 1]),
            "group": pa.array([f"g{i % 7}" for i in range(1000)]).dictionary_encode(),
        }
    )
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=300)
    status, _, _ = score(
        tmp_path / "in.parquet", tmp_path / "out.parquet", "--model-dir", model_dir, "--chunk-rows", 128
    )
    assert status == 0
    written = pq.read_table(tmp_path / "in.parquet")  # as Parquet stores it (timestamps in ms)
    result = pq.read_table(tmp_path / "out.parquet")
    expected = written.schema.remove_metadata().append(pa.field("probability", pa.float32(), nullable=False))
    assert result.schema.remove_metadata() == expected.append(pa.field("label", pa.int64(), nullable=False))
    assert result.select(table.column_names).equals(written.replace_schema_metadata(None))
    np.testing.assert_allclose(result["probability"].to_numpy(), reference(x), rtol=0, atol=1e-6)


def test_csv_to_parquet_types_the_features_as_float64(tmp_path, score, model_dir, reference):
    x = _points(300, seed=2)
    lines = [f"r{i},{a!r},{b!r}" for i, (a, b) in enumerate(x.tolist())]
    source = _write_csv(tmp_path / "in.csv", "key,x1,x2", lines)
    status, _, _ = score(source, tmp_path / "out.parquet", "--model-dir", model_dir, "--chunk-rows", 100)
    assert status == 0
    result = pq.read_table(tmp_path / "out.parquet")
    assert result.schema.types == [pa.string(), pa.float64(), pa.float64(), pa.float32(), pa.int64()]
    assert result["key"].to_pylist() == [f"r{i}" for i in range(300)]
    assert np.array_equal(result["x1"].to_numpy().astype(np.float32), x[:, 0])
    np.testing.assert_allclose(result["probability"].to_numpy(), reference(x), rtol=0, atol=1e-6)


def test_parquet_to_csv_writes_the_same_scores(tmp_path, score, model_dir):
    x = _points(200, seed=3)
    pq.write_table(pa.table({"x1": x[:, 0], "x2": x[:, 1]}), tmp_path / "in.parquet")
    score(tmp_path / "in.parquet", tmp_path / "out.parquet", "--model-dir", model_dir, "--device", "cpu")
    score(tmp_path / "in.parquet", tmp_path / "out.csv", "--model-dir", model_dir, "--device", "cpu")
    from_parquet = pq.read_table(tmp_path / "out.parquet")["probability"].to_numpy()
    from_csv = pa_csv.read_csv(
        tmp_path / "out.csv", convert_options=pa_csv.ConvertOptions(column_types={"probability": pa.float32()})
    )["probability"].to_numpy()
    assert np.array_equal(from_parquet, from_csv)  # Arrow writes float32 in its shortest round-trip form


def test_compressed_csv_in_and_out(tmp_path, score, model_dir, reference):
    x = _points(100, seed=11)
    with gzip.open(tmp_path / "in.csv.gz", "wt") as f:
        f.write("x1,x2\n" + "".join(f"{a!r},{b!r}\n" for a, b in x.tolist()))
    status, out, _ = score(tmp_path / "in.csv.gz", tmp_path / "out.csv.gz", "--model-dir", model_dir)
    assert status == 0
    assert _summary(out)["errors"] == str(tmp_path / "out.errors.csv")
    with gzip.open(tmp_path / "out.csv.gz", "rb") as f:
        result = pa_csv.read_csv(f)
    np.testing.assert_allclose(result["probability"].to_numpy(), reference(x), rtol=0, atol=1e-6)


def test_features_flag_picks_the_columns_in_the_models_input_order(tmp_path, score, model_dir, reference):
    x = _points(50, seed=4)
    lines = [f"{b!r},{a!r}" for a, b in x.tolist()]
    source = _write_csv(tmp_path / "in.csv", "second,first", lines)
    status, _, _ = score(source, tmp_path / "out.parquet", "--model-dir", model_dir, "--features", "first,second")
    assert status == 0
    np.testing.assert_allclose(pq.read_table(tmp_path / "out.parquet")["probability"], reference(x), atol=1e-6)


def test_header_only_input_writes_an_empty_output(tmp_path, score, model_dir):
    source = _write_csv(tmp_path / "in.csv", "x1,x2", [])
    status, out, _ = score(source, tmp_path / "out.csv", "--model-dir", model_dir)
    assert status == 0
    assert _summary(out)["rows_read"] == "0"
    assert (tmp_path / "out.csv").read_text() == "x1,x2,probability,label\n"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("quiet", [False, True])
def test_progress_bar_on_a_terminal_shows_rows_per_second_unless_quiet(tmp_path, model_dir, monkeypatch, quiet):
    source = _write_csv(tmp_path / "in.csv", "x1,x2", ["0,1"] * 100)
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    args = [source, tmp_path / "out.csv", "--model-dir", model_dir, "--log-level", "ERROR"] + (
        ["--quiet"] if quiet else []
    )
    assert cli.main(["score", *map(str, args)]) == 0
    assert ("rows/s" in terminal.getvalue()) != quiet


def test_no_progress_bar_when_stderr_is_not_a_terminal(tmp_path, score, model_dir):
    source = _write_csv(tmp_path / "in.csv", "x1,x2", ["0,1"] * 100)
    status, _, err = score(source, tmp_path / "out.csv", "--model-dir", model_dir)
    assert status == 0
    assert err == ""


# --- rows that cannot be scored -------------------------------------------------------------------


def test_every_kind_of_bad_csv_row_is_rejected_with_its_row_number(tmp_path, score, model_dir):
    lines = [
        "0.1,0.2,ok",  # 1
        ",0.2,empty x1",  # 2
        "abc,0.2,text x1",  # 3
        "0.1,nan,nan x2",  # 4
        "-inf,0.2,inf x1",  # 5
        "1e39,0.2,beyond float32",  # 6
        "0.1,0.2",  # 7: a field short
        "0.1,0.2,too,many",  # 8: a field over
        "",  # 9: blank line
        "   ,0.2,blank x1",  # 10
        "0.3,0.4,ok",  # 11
    ]
    source = _write_csv(tmp_path / "in.csv", "x1,x2,note", lines)
    status, out, _ = score(source, tmp_path / "out.csv", "--model-dir", model_dir, "--errors", tmp_path / "bad.csv")
    assert status == 1
    summary = _summary(out)
    assert (summary["rows_read"], summary["rows_scored"], summary["rows_rejected"]) == ("11", "2", "9")
    reasons = {int(e["row"]): e["reason"] for e in _errors(tmp_path / "bad.csv")}
    assert reasons == {
        2: "missing",
        3: "non-numeric",
        4: "non-finite",
        5: "non-finite",
        6: "out-of-range",
        7: "wrong-column-count",
        8: "wrong-column-count",
        9: "missing",
        10: "missing",
    }
    assert pa_csv.read_csv(tmp_path / "out.csv")["note"].to_pylist() == ["ok", "ok"]


def test_a_row_with_several_bad_features_is_one_reject_naming_each(tmp_path, score, model_dir):
    source = _write_csv(tmp_path / "in.csv", "x1,x2", ["x,", "1,2"])
    score(source, tmp_path / "out.csv", "--model-dir", model_dir)
    (only,) = _errors(tmp_path / "out.errors.csv")
    assert (only["row"], only["reason"]) == ("1", "non-numeric;missing")
    assert "x1='x'" in only["detail"] and "x2 is missing" in only["detail"]


def test_parquet_nulls_and_non_finite_values_are_rejected(tmp_path, score, model_dir):
    x1 = pa.array([0.1, None, float("nan"), 0.4, float("inf")], pa.float32())
    x2 = pa.array([1, 2, 3, None, 5], pa.int64())
    pq.write_table(pa.table({"x1": x1, "x2": x2}), tmp_path / "in.parquet")
    status, _, _ = score(tmp_path / "in.parquet", tmp_path / "out.parquet", "--model-dir", model_dir)
    assert status == 1
    rejected = {int(e["row"]): e["reason"] for e in _errors(tmp_path / "out.errors.csv")}
    assert rejected == {2: "missing", 3: "non-finite", 4: "missing", 5: "non-finite"}
    assert pq.read_table(tmp_path / "out.parquet")["x1"].to_pylist() == pytest.approx([0.1])


def test_row_numbers_stay_right_around_malformed_records_across_many_chunks(tmp_path, score, model_dir):
    n = 60_000
    rng = np.random.default_rng(5)
    malformed = set(rng.choice(n, 300, replace=False).tolist())
    non_numeric = set(rng.choice(sorted(set(range(n)) - malformed), 300, replace=False).tolist())
    lines = []
    for i in range(n):
        if i in malformed:
            lines.append(f"{i},0.5" if i % 2 else f"{i},0.5,0.5,extra")
        elif i in non_numeric:
            lines.append(f"{i},oops,0.5")
        else:
            lines.append(f"{i},0.25,0.75")
    source = _write_csv(tmp_path / "in.csv", "id,x1,x2", lines)
    status, out, _ = score(source, tmp_path / "out.csv", "--model-dir", model_dir, "--chunk-rows", 1000)
    assert status == 1
    rejected = {int(e["row"]) - 1: e["reason"] for e in _errors(tmp_path / "out.errors.csv")}
    assert rejected == {i: "wrong-column-count" for i in malformed} | {i: "non-numeric" for i in non_numeric}
    kept = pa_csv.read_csv(tmp_path / "out.csv")["id"].to_pylist()
    assert kept == sorted(set(range(n)) - malformed - non_numeric)
    assert int(_summary(out)["rows_read"]) == n


@pytest.mark.parametrize(
    "text",
    ["1", "+1", "-1.5", ".5", "5.", "1e3", "1E-3", "+.5e+3", "inf", "-Infinity", "NaN", "nan", "0x10", "1_0",
     "1e", "e1", "--1", ".", "-.e1", "1,5", "1d", "١", "infinit", "nanx", " 2 ", "\t3"],
)  # fmt: skip
def test_text_counts_as_a_number_exactly_when_arrow_parses_it(text):
    try:
        pc.cast(pa.array([text.strip()]), pa.float64())
        parses = True
    except pa.ArrowInvalid:
        parses = False
    table = pa.table({"x1": [text, "x"], "x2": ["1", "1"]})  # "x" forces the row-by-row path
    found = features(table, ["x1", "x2"], np.arange(1, 3))
    assert any(r.row == 1 and r.reason == "non-numeric" for r in found.rejects) == (not parses)


# --- back-ends --------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_rows", [50, 777])  # 50: requests small enough for the server to batch together
def test_url_and_model_give_bit_identical_probabilities(tmp_path, score, server, model_dir, chunk_rows):
    x = _points(5000, seed=6)
    pq.write_table(pa.table({"x1": x[:, 0], "x2": x[:, 1]}), tmp_path / "in.parquet")
    common = ("--chunk-rows", chunk_rows, "--concurrency", 4)
    local_run = score(
        tmp_path / "in.parquet", tmp_path / "local.parquet", "--model-dir", model_dir, "--device", "cpu", *common
    )
    assert local_run[0] == 0
    assert score(tmp_path / "in.parquet", tmp_path / "remote.parquet", "--url", server.address, *common)[0] == 0
    local = pq.read_table(tmp_path / "local.parquet")
    remote = pq.read_table(tmp_path / "remote.parquet")
    bits = [table["probability"].to_numpy().view(np.uint32) for table in (local, remote)]
    assert np.array_equal(*bits)
    assert local.equals(remote)


def test_unreachable_server_exits_3_with_one_line(tmp_path, refused_address):
    source = _write_csv(tmp_path / "in.csv", "x1,x2", ["0,1"])
    url = refused_address
    done = subprocess.run(
        [sys.executable, "-m", "serving.cli", "score", source, tmp_path / "out.csv", "--url", url, "--retries", "1"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 3
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert f"the server at {url}" in done.stderr and "UNAVAILABLE" in done.stderr
    assert not (tmp_path / "out.csv").exists()


class _RecordingClient:
    """Stands in for serving.client.InferenceClient: records its arguments, finds no server."""

    made: list[dict] = []

    def __init__(self, url: str, **kwargs):
        self.made.append({"url": url, **kwargs})

    def metadata(self) -> dict:
        raise InferenceError(grpc.StatusCode.UNAVAILABLE, "no server here")

    def close(self) -> None:
        pass


@pytest.mark.parametrize(("flag", "env", "expected"), [(None, None, 5), ("9", None, 9), (None, "2", 2)])
def test_retries_reach_the_client_from_the_flag_or_the_environment(tmp_path, score, monkeypatch, flag, env, expected):
    monkeypatch.setattr("serving.client.InferenceClient", _RecordingClient)
    monkeypatch.setattr(_RecordingClient, "made", [])
    if env is not None:
        monkeypatch.setenv("XORSERVE_RETRIES", env)
    source = _write_csv(tmp_path / "in.csv", "x1,x2", ["0,1"])
    status, _, err = score(source, tmp_path / "out.csv", "--url", "h:1", *(("--retries", flag) if flag else ()))
    assert status == 3
    assert "UNAVAILABLE: no server here" in err
    assert [made["retries"] for made in _RecordingClient.made] == [expected]


def test_negative_retries_exit_2(tmp_path, capsys):
    source = _write_csv(tmp_path / "in.csv", "x1,x2", ["0,1"])
    with pytest.raises(SystemExit) as exited:
        cli.main(["score", str(source), str(tmp_path / "out.csv"), "--url", "h:1", "--retries", "-1"])
    assert exited.value.code == 2
    assert "argument --retries: must be at least 0" in capsys.readouterr().err


def test_server_stopping_mid_run_fails_and_leaves_no_output(tmp_path, score, server_factory, monkeypatch):
    dying = server_factory()
    x = _points(20_000, seed=7)
    pq.write_table(pa.table({"x1": x[:, 0], "x2": x[:, 1]}), tmp_path / "in.parquet")
    real = backends.RemoteScorer.probabilities
    calls = []

    def stop_after_first(self, chunk):
        result = real(self, chunk)
        if not calls:
            dying.stop(grace_s=0)  # every later request finds no server
        calls.append(len(chunk))
        return result

    monkeypatch.setattr(backends.RemoteScorer, "probabilities", stop_after_first)
    args = ("--url", dying.address, "--chunk-rows", 1000, "--concurrency", 1)
    status, _, err = score(tmp_path / "in.parquet", tmp_path / "out.parquet", *args)
    assert status == 3
    assert "UNAVAILABLE" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet"]


# --- all or nothing ---------------------------------------------------------------------------------


_CTRL_C_AFTER_TWO_WRITES = textwrap.dedent(
    """
    import os, signal, sys
    from serving.cli import main as cli
    from serving.scoring import writers
    real, calls = writers.CsvSink.write, []

    def write(self, table):
        real(self, table)
        calls.append(table.num_rows)
        if len(calls) == 2:  # part of the output is on disk, under its temporary name
            os.kill(os.getpid(), signal.SIGINT)

    writers.CsvSink.write = write
    sys.exit(cli.main(["score", *sys.argv[1:]]))
    """
)


def test_ctrl_c_mid_run_leaves_no_output(tmp_path, model_dir):
    x = _points(10_000, seed=8)
    pq.write_table(pa.table({"x1": x[:, 0], "x2": x[:, 1]}), tmp_path / "in.parquet")
    args = (tmp_path / "in.parquet", tmp_path / "out.csv", "--model-dir", model_dir, "--chunk-rows", 1000)
    done = subprocess.run(
        [sys.executable, "-c", _CTRL_C_AFTER_TWO_WRITES, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 130, done.stderr
    assert "interrupted; no output written" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet"]


def test_failed_run_leaves_an_existing_output_as_it_was(tmp_path, score, model_dir, monkeypatch):
    pq.write_table(pa.table({"x1": [0.0] * 3000, "x2": [1.0] * 3000}), tmp_path / "in.parquet")
    (tmp_path / "out.csv").write_text("yesterday's scores\n")

    def fail(self, chunk):
        raise RuntimeError("model exploded")

    monkeypatch.setattr(backends.InProcessScorer, "probabilities", fail)
    status, _, err = score(
        tmp_path / "in.parquet", tmp_path / "out.csv", "--model-dir", model_dir, "--chunk-rows", 1000
    )
    assert status == 2
    assert err.strip() == "xorserve score: error: model exploded"
    assert (tmp_path / "out.csv").read_text() == "yesterday's scores\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet", "out.csv"]


@pytest.mark.parametrize("errors_existed", [True, False])
def test_failed_output_rename_puts_the_errors_file_back(tmp_path, errors_existed):
    schema = pa.schema([("x1", pa.float64())])
    if errors_existed:
        (tmp_path / "out.errors.csv").write_text("yesterday's errors\n")
    with (
        pytest.raises(IsADirectoryError),
        writers.Outputs(tmp_path / "out.csv", "csv", schema, tmp_path / "out.errors.csv") as outputs,
    ):
        outputs.rows.write(pa.table({"x1": [1.0]}, schema=schema))
        (tmp_path / "out.csv").mkdir()  # appears after the checks at start-up: the output's rename fails
        outputs.commit()
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == (["out.csv", "out.errors.csv"] if errors_existed else ["out.csv"])
    if errors_existed:
        assert (tmp_path / "out.errors.csv").read_text() == "yesterday's errors\n"


def test_successful_commit_replaces_both_files_and_leaves_no_temporary_names(tmp_path, score, model_dir):
    source = _write_csv(tmp_path / "in.csv", "x1,x2", ["0,1", "x,1"])
    (tmp_path / "out.csv").write_text("old\n")
    (tmp_path / "out.errors.csv").write_text("old\n")
    assert score(source, tmp_path / "out.csv", "--model-dir", model_dir)[0] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv", "out.csv", "out.errors.csv"]
    assert (tmp_path / "out.errors.csv").read_text().startswith("row,reason,detail\n2,non-numeric,")
    assert (tmp_path / "out.csv").read_text().startswith("x1,x2,probability,label\n0,1,")


# --- signals --------------------------------------------------------------------------------------------

_OLD = {"out.csv": b"yesterday's scores\n", "out.errors.csv": b"yesterday's errors\n"}
_LONG_ROWS = 2_000_000
_LONG_ARGS = ("--chunk-rows", 1000, "--device", "cpu")


def _with_old_files(folder: Path) -> Path:
    folder.mkdir(exist_ok=True)
    for name, data in _OLD.items():
        (folder / name).write_bytes(data)
    return folder


def _files(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in _OLD}


def _leftovers(folder: Path) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.endswith((".partial", ".previous")))


def _start_score(*args) -> subprocess.Popen:
    """`xorserve score ARGS` as a subprocess, logging `event=score_start` once its signal handlers are in and
    `event=score_backend_ready` once the model is loaded (or the server reached)."""
    return subprocess.Popen(
        [sys.executable, "-m", "serving.cli", "score", *map(str, args), "--log-level", "DEBUG"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@dataclass(frozen=True)
class _LongRun:
    input: Path
    model_dir: Path
    output: bytes  # what an uninterrupted run writes
    errors: bytes


@pytest.fixture(scope="module")
def long_run(tmp_path_factory, model_repository) -> _LongRun:
    """Two million rows, scored in 1000-row chunks for a second or two, and the files that a whole run writes."""
    folder = tmp_path_factory.mktemp("long-run")
    grid = np.random.default_rng(12).integers(0, 5, size=(_LONG_ROWS, 2)).astype(np.float32) / 4
    pq.write_table(pa.table({"x1": grid[:, 0], "x2": grid[:, 1]}), folder / "in.parquet", row_group_size=65_536)
    model_dir = model_repository / "xor" / "1"
    process = _start_score(folder / "in.parquet", folder / "out.csv", "--model-dir", model_dir, *_LONG_ARGS)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    output, errors = (folder / "out.csv").read_bytes(), (folder / "out.errors.csv").read_bytes()
    assert errors == b"row,reason,detail\n"
    return _LongRun(folder / "in.parquet", model_dir, output, errors)


def _read_stderr_until(process: subprocess.Popen, text: str) -> None:
    """Reads the run's log until a line holds `text` (or the run ends): the run has got that far."""
    for line in process.stderr:
        if text in line:
            return


def _poll(process: subprocess.Popen, ready: Callable[[], bool]) -> None:
    """Checks `ready()` every 2 ms until it holds or the run ends (the moment comes from the run's own files)."""
    deadline = time.monotonic() + 60
    while not ready() and process.poll() is None:
        assert time.monotonic() < deadline, "the run neither got there nor ended"
        time.sleep(0.002)


def _size(folder: Path, pattern: str) -> int:
    sizes = []
    for path in folder.glob(pattern):
        with contextlib.suppress(FileNotFoundError):  # renamed or removed meanwhile
            sizes.append(path.stat().st_size)
    return max(sizes, default=-1)


def _inode(path: Path) -> int:
    return path.stat().st_ino


# The moments a signal is sent at, each with the outcomes it may have: "interrupted" (exit 128 + the signal,
# both files as they were), "completed" (exit 0, both files new; "signal noted" when the signal came after the
# commit but before the command returned, else it came later, ignored, or after the process ended), "killed"
# (a signal in Python's own start-up, before `xorserve score` began: death by the signal, which a shell shows
# as 128 + the signal, with nothing opened yet).
_COMPLETED = {"completed", "completed, signal noted"}
_MOMENTS = {
    "at start": {"interrupted", "killed"},  # Python still starting, or importing
    "handlers in": {"interrupted"},  # imports, model loading, files all still to come
    "model loaded": {"interrupted"},  # the files are about to be created
    "first chunk written": {"interrupted"},
    "half written": {"interrupted"},
    "all rows written": {"interrupted", *_COMPLETED},  # what is left: closing, syncing, renaming
    "output renamed": _COMPLETED,  # the commit is done: the run reports it
}


def _wait_for(moment: str, process: subprocess.Popen, folder: Path, long_run: _LongRun) -> None:
    old = _inode(folder / "out.csv")

    def written() -> int:
        return _size(folder, ".out.csv.*.partial")

    def renamed() -> bool:
        return _inode(folder / "out.csv") != old

    if moment == "handlers in":
        _read_stderr_until(process, "event=score_start")
    elif moment == "model loaded":
        _read_stderr_until(process, "event=score_backend_ready")
    elif moment == "first chunk written":
        _poll(process, lambda: written() > len("x1,x2,probability,label\n"))
    elif moment == "half written":
        _poll(process, lambda: written() >= len(long_run.output) // 2)
    elif moment == "all rows written":
        _poll(process, lambda: written() >= len(long_run.output) or renamed())
    elif moment == "output renamed":
        _poll(process, renamed)


def _outcome(process: subprocess.Popen, sig: int, folder: Path, long_run: _LongRun) -> str:
    out, err = process.communicate(timeout=60)
    left = _leftovers(folder)
    files = _files(folder)
    if process.returncode == 128 + sig and files == _OLD and not out and not left and "no output written" in err:
        return "interrupted"
    if process.returncode == -sig and files == _OLD and not out and not left:
        return "killed"
    new = {"out.csv": long_run.output, "out.errors.csv": long_run.errors}
    if process.returncode == 0 and files == new and not left and _summary(out)["rows_read"] == str(_LONG_ROWS):
        return "completed, signal noted" if "came after the output was in place" in err else "completed"
    state = "old" if files == _OLD else "new" if files == new else "mixed"
    return f"exit {process.returncode}, files {state}, left {left}: {err.strip().splitlines()[-1:]}"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_at_any_moment_leaves_the_files_all_old_or_all_new(tmp_path, long_run, sig):
    outcomes = {}
    for index, moment in enumerate(_MOMENTS):
        folder = _with_old_files(tmp_path / str(index))
        process = _start_score(long_run.input, folder / "out.csv", "--model-dir", long_run.model_dir, *_LONG_ARGS)
        try:
            _wait_for(moment, process, folder, long_run)
        except BaseException:
            process.kill()
            process.communicate()
            raise
        process.send_signal(sig)
        outcomes[moment] = _outcome(process, sig, folder, long_run)
    print(sig.name, outcomes, collections.Counter(outcomes.values()))
    assert {m: o for m, o in outcomes.items() if o not in _MOMENTS[m]} == {}, outcomes
    # The data work is long enough to be interrupted: every moment up to the last chunk stopped the run.
    assert list(outcomes.values())[1:5] == ["interrupted"] * 4


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_the_server_does_not_answer_ends_the_run_at_once(tmp_path, sig):
    source = _write_csv(tmp_path / "in.csv", "x1,x2", ["0,1"])
    _with_old_files(tmp_path)
    with socket.socket() as silent:  # accepts the connection, never answers: the request waits for its deadline
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        silent.settimeout(60)
        url = f"127.0.0.1:{silent.getsockname()[1]}"
        process = _start_score(source, tmp_path / "out.csv", "--url", url, "--retries", 0, "--timeout-s", 300)
        try:
            connection, _ = silent.accept()  # the run is in its first call to the server
        except BaseException:
            process.kill()
            process.communicate()
            raise
        with connection:
            sent = time.monotonic()
            process.send_signal(sig)
            _, err = process.communicate(timeout=60)
            waited = time.monotonic() - sent
    assert process.returncode == 128 + sig, err
    assert waited < 10  # not the request's 300 s deadline
    assert _files(tmp_path) == _OLD
    assert _leftovers(tmp_path) == []


_SIGNAL_AT = textwrap.dedent(
    """
    import os, signal, sys
    from serving.cli import main as cli
    from serving.scoring import writers

    point, sig = sys.argv[1], getattr(signal, sys.argv[2])

    def send():
        os.kill(os.getpid(), sig)

    if point == "syncing":  # the files are complete; the renames come next
        sync = writers.AtomicPath.sync

        def synced(self):
            sync(self)
            send()

        writers.AtomicPath.sync = synced
    elif point == "between the renames":
        replace, done = os.replace, []

        def replaced(source, target):
            replace(source, target)
            done.append(target)
            if len(done) == 1:  # the errors file is in place, the output not yet
                send()

        os.replace = replaced
    elif point == "after the commit":
        commit = writers.Outputs.commit

        def committed(self):
            commit(self)
            send()

        writers.Outputs.commit = committed
    sys.exit(cli.main(["score", *sys.argv[3:]]))
    """
)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("point", ["syncing", "between the renames", "after the commit"])
def test_a_signal_during_the_commit_leaves_both_files_old_or_both_new(tmp_path, model_dir, point, sig):
    source = _write_csv(tmp_path / "in.csv", "x1,x2", ["0,1", "1,0"])
    folder = _with_old_files(tmp_path / "out")
    done = subprocess.run(
        [sys.executable, "-c", _SIGNAL_AT, point, sig.name, source, folder / "out.csv", "--model-dir", model_dir],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert _leftovers(folder) == []
    if point == "syncing":  # before the renames: the run stops
        assert done.returncode == 128 + sig, done.stderr
        assert _files(folder) == _OLD
    else:  # once the first rename is done, the second one is too, and the run reports what it wrote
        assert done.returncode == 0, done.stderr
        assert _summary(done.stdout)["rows_scored"] == "2"
        assert f"{sig.name} came after the output was in place" in done.stderr
        assert (folder / "out.csv").read_text().startswith("x1,x2,probability,label\n0,1,")
        assert (folder / "out.errors.csv").read_text() == "row,reason,detail\n"


@pytest.fixture
def sigterm_fails():
    """SIGTERM in this process fails the test instead of ending pytest, if the code under test lets it through."""

    def reached_pytest(signum, frame):
        raise AssertionError("SIGTERM reached the test's own handler")

    previous = signal.signal(signal.SIGTERM, reached_pytest)
    yield reached_pytest
    signal.signal(signal.SIGTERM, previous)


def test_a_failure_while_a_signal_is_pending_exits_with_the_signals_status(
    tmp_path, score, model_dir, monkeypatch, sigterm_fails
):
    source = _write_csv(tmp_path / "in.csv", "x1,x2", ["0,1"])
    _with_old_files(tmp_path)

    def loading(self, *args, **kwargs):  # as an extension module does when a signal cuts its import short
        try:
            signal.raise_signal(signal.SIGTERM)
        except KeyboardInterrupt as exc:
            raise ImportError("initialization failed") from exc

    monkeypatch.setattr(backends.InProcessScorer, "__init__", loading)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    status, out, err = score(source, tmp_path / "out.csv", "--model-dir", model_dir)
    assert (status, out, err) == (143, "", "xorserve score: interrupted by SIGTERM; no output written\n")
    assert _files(tmp_path) == _OLD
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # given back


def test_a_signal_swallowed_on_the_way_still_stops_the_run_before_its_commit(tmp_path, score, model_dir, monkeypatch):
    pq.write_table(pa.table({"x1": [0.0] * 3000, "x2": [1.0] * 3000}), tmp_path / "in.parquet")
    _with_old_files(tmp_path)
    real = writers.CsvSink.write

    def write(self, table):
        real(self, table)
        with contextlib.suppress(KeyboardInterrupt):  # a library that catches too much: the run goes on
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(writers.CsvSink, "write", write)
    status, out, err = score(
        tmp_path / "in.parquet", tmp_path / "out.csv", "--model-dir", model_dir, "--chunk-rows", 1000
    )
    assert (status, out, err) == (130, "", "xorserve score: interrupted; no output written\n")
    assert _files(tmp_path) == _OLD
    assert _leftovers(tmp_path) == []


def test_a_deferred_step_runs_to_its_end_and_then_raises_the_signal(sigterm_fails):
    steps = []
    with interrupts.Guard() as guard:
        guard.arm()
        with pytest.raises(interrupts.Interrupted) as raised, interrupts.deferred():
            signal.raise_signal(signal.SIGTERM)
            steps.append("after the signal")
            signal.raise_signal(signal.SIGINT)  # a second one is only noted
            steps.append("after the second")
        assert raised.value.signum == signal.SIGTERM
        assert guard.received == signal.SIGTERM
        signal.raise_signal(signal.SIGINT)  # the clean-up is under way: only noted
        steps.append("cleaned up")
        with pytest.raises(interrupts.Interrupted), interrupts.committing():
            steps.append("committed")  # never: no commit after a signal
    assert steps == ["after the signal", "after the second", "cleaned up"]
    assert signal.getsignal(signal.SIGTERM) is sigterm_fails  # given back


def test_a_signal_while_a_failure_is_cleaned_up_waits_for_the_next_check(sigterm_fails):
    steps = []
    with interrupts.Guard() as guard:
        guard.arm()
        try:
            raise OSError("disk full")
        except OSError:
            signal.raise_signal(signal.SIGTERM)  # the failure's clean-up runs to its end
            steps.append("cleaned up")
        assert guard.received == signal.SIGTERM
        with pytest.raises(interrupts.Interrupted):
            interrupts.check()
    assert steps == ["cleaned up"]


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_temporary_files_of_dead_runs_are_removed_those_of_live_ones_kept(tmp_path, score, model_dir):
    source = _write_csv(tmp_path / "in.csv", "x1,x2", ["0,1"])
    host, dead, alive = writers.host_name(), _dead_pid(), os.getpid()
    names = {
        f".out.csv.{dead}@{host}.0123abcd.partial": "removed",  # a killed run's, on this host
        f".out.errors.csv.{dead}@{host}.4567cdef.partial": "removed",
        f".out.errors.csv.{dead}@{host}.89abcdef.previous": "removed",  # killed between the renames
        f".out.csv.{alive}@{host}.0123abcd.partial": "kept",  # a run still going: this process's PID
        f".out.csv.{dead}@other-{host}.0123abcd.partial": "kept",  # another machine's: our PIDs say nothing of it
        f".other.csv.{dead}@{host}.0123abcd.partial": "kept",  # another output's
        ".out.csv.0123abcd.partial": "kept",  # no PID: no telling
    }
    for name in names:
        (tmp_path / name).write_text("half a file")
    assert score(source, tmp_path / "out.csv", "--model-dir", model_dir)[0] == 0
    assert _leftovers(tmp_path) == sorted(name for name, fate in names.items() if fate == "kept")


@pytest.mark.slow
def test_a_killed_runs_temporary_files_are_removed_by_the_next_run(tmp_path, long_run, score):
    folder = _with_old_files(tmp_path / "out")
    process = _start_score(long_run.input, folder / "out.csv", "--model-dir", long_run.model_dir, *_LONG_ARGS)
    _poll(process, lambda: _size(folder, ".out.csv.*.partial") > 0)  # writing
    process.kill()
    process.communicate()
    left = _leftovers(folder)
    assert len(left) == 2, left
    assert all(f".{process.pid}@{writers.host_name()}." in name for name in left), left
    assert _files(folder) == _OLD
    source = _write_csv(tmp_path / "in.csv", "x1,x2", ["0,1"])
    assert score(source, folder / "out.csv", "--model-dir", long_run.model_dir)[0] == 0
    assert _leftovers(folder) == []


# --- usage errors -------------------------------------------------------------------------------------


def _unusable_backends(tmp_path: Path, refused: str) -> dict[str, tuple[str, str]]:
    """Back-ends that would fail if they were tried: the target checks must come first."""
    return {"model": ("--model-dir", str(tmp_path / "no-model")), "url": ("--url", refused)}


@pytest.mark.parametrize("backend", ["model", "url"])
@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("folder/", "OUTPUT {p}/folder is a folder; name a file"),
        ("missing/out.csv", "OUTPUT {p}/missing/out.csv: folder {p}/missing does not exist"),
        ("errors-folder/", "the errors file {p}/errors-folder is a folder; name a file"),
    ],
)
def test_unwritable_targets_fail_before_the_model_is_loaded_or_the_server_reached(
    tmp_path, score, backend, target, message, refused_address
):
    source = _write_csv(tmp_path / "in.csv", "x1,x2", ["0,1"])
    (tmp_path / "folder").mkdir()
    (tmp_path / "errors-folder").mkdir()
    output, errors = tmp_path / "out.csv", tmp_path / "out.errors.csv"
    if target.startswith("errors"):
        errors = tmp_path / target.rstrip("/")
    else:
        output = tmp_path / target.rstrip("/")
    args = (*_unusable_backends(tmp_path, refused_address)[backend], "--errors", errors, "--retries", "0")
    status, out, err = score(source, output, *args)
    assert status == 2
    assert err == f"xorserve score: error: {message.format(p=tmp_path)}\n"
    assert out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["errors-folder", "folder", "in.csv"]


def test_output_in_a_read_only_folder_fails_before_the_model_is_loaded(tmp_path, score):
    source = _write_csv(tmp_path / "in.csv", "x1,x2", ["0,1"])
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.access(locked, os.W_OK):
        pytest.skip("this user may write into a read-only folder (root, or the CAP_DAC_OVERRIDE capability)")
    status, _, err = score(source, locked / "out.csv", "--model-dir", tmp_path / "no-model")
    assert status == 2
    assert f"folder {locked} is not writable" in err


def test_missing_feature_column_exits_2_naming_it(tmp_path, score, model_dir):
    source = _write_csv(tmp_path / "in.csv", "a,b", ["0,1"])
    status, _, err = score(source, tmp_path / "out.csv", "--model-dir", model_dir)
    assert status == 2
    assert "no column 'x1', 'x2'" in err and "--features" in err
    assert not (tmp_path / "out.csv").exists()


def test_feature_count_that_does_not_fit_the_model_exits_2(tmp_path, score, model_dir):
    source = _write_csv(tmp_path / "in.csv", "x1,x2", ["0,1"])
    status, _, err = score(source, tmp_path / "out.csv", "--model-dir", model_dir, "--features", "x1")
    assert status == 2
    assert "1 feature column(s) given" in err


def test_url_and_model_dir_together_are_a_usage_error(tmp_path, model_dir, capsys):
    source = _write_csv(tmp_path / "in.csv", "x1,x2", ["0,1"])
    with pytest.raises(SystemExit) as exited:
        cli.main(["score", str(source), str(tmp_path / "out.csv"), "--model-dir", str(model_dir), "--url", "h:1"])
    assert exited.value.code == 2
    assert "give --url or --model-dir, not both" in capsys.readouterr().err


def test_environment_picks_the_back_end_when_no_flag_does(tmp_path, score, model_dir, monkeypatch, capsys):
    source = _write_csv(tmp_path / "in.csv", "x1,x2", ["0,1"])
    monkeypatch.setenv("XORSERVE_MODEL_DIR", str(model_dir))
    assert score(source, tmp_path / "a.csv")[0] == 0
    monkeypatch.setenv("XORSERVE_URL", "127.0.0.1:1")  # exported for other commands: the flag still decides
    assert score(source, tmp_path / "b.csv", "--model-dir", model_dir)[0] == 0
    with pytest.raises(SystemExit) as exited:
        score(source, tmp_path / "c.csv")
    assert exited.value.code == 2
    assert "XORSERVE_URL and XORSERVE_MODEL_DIR are both set" in capsys.readouterr().err


def test_a_model_name_exported_for_other_commands_is_not_taken_for_a_folder(tmp_path, score, monkeypatch, capsys):
    source = _write_csv(tmp_path / "in.csv", "x1,x2", ["0,1"])
    monkeypatch.setenv("XORSERVE_MODEL", "xor")  # predict's and loadtest's model NAME
    with pytest.raises(SystemExit) as exited:
        score(source, tmp_path / "out.csv")
    assert exited.value.code == 2
    assert "give --url HOST:PORT" in capsys.readouterr().err


def test_errors_path_falls_back_to_its_command_scoped_variable(tmp_path, score, model_dir, monkeypatch):
    source = _write_csv(tmp_path / "in.csv", "x1,x2", ["x,1"])
    monkeypatch.setenv("XORSERVE_ERRORS", str(tmp_path / "not-this.csv"))
    monkeypatch.setenv("XORSERVE_SCORE_ERRORS", str(tmp_path / "rejected.csv"))
    status, out, _ = score(source, tmp_path / "out.csv", "--model-dir", model_dir)
    assert status == 1
    assert _summary(out)["errors"] == str(tmp_path / "rejected.csv")
    assert [e["row"] for e in _errors(tmp_path / "rejected.csv")] == ["1"]


def test_help_documents_the_exit_statuses(capsys):
    with pytest.raises(SystemExit):
        cli.main(["score", "--help"])
    text = capsys.readouterr().out
    assert "exit status:" in text
    assert "0  every row scored" in text and "1  some rows rejected" in text and "2  bad arguments" in text
    assert "3  the server or its model could not be reached" in text
    assert "130 interrupted (SIGINT, Ctrl-C)" in text and "143 terminated (SIGTERM)" in text


# --- bounded memory -----------------------------------------------------------------------------------


def test_rows_held_stay_within_chunks_in_flight(tmp_path, model_dir):
    n, chunk_rows, concurrency = 200_000, 2_000, 3
    x = _points(n, seed=9)
    pq.write_table(pa.table({"x1": x[:, 0], "x2": x[:, 1]}), tmp_path / "in.parquet", row_group_size=10_000)
    source = readers.ParquetSource(tmp_path / "in.parquet", chunk_rows)
    with backends.InProcessScorer(model_dir, 2, device="cpu") as scorer:
        summary = pipeline.score_chunks(
            source.chunks(),
            scorer.probabilities,
            lambda table: None,
            lambda rejects: None,
            feature_names=["x1", "x2"],
            typed_features=False,
            concurrency=concurrency,
        )
    assert summary.rows_scored == n
    assert 0 < summary.max_rows_held <= chunk_rows * (concurrency + pipeline.PREFETCH + 1) < n // 10


_RSS_PROBE = textwrap.dedent(
    """
    import json, sys
    from serving.cli import main as cli

    def peak_kib():
        # VmHWM belongs to this process's memory map; getrusage's ru_maxrss would also count the
        # parent's peak from before the exec (the kernel carries it over), hiding the growth.
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))

    import pyarrow
    pyarrow.set_cpu_count(2)  # Arrow sizes its thread pools by the cores: the same on every machine
    pyarrow.set_io_thread_count(2)
    src, tiny, model, chunk_rows = sys.argv[1:5]
    cli.main(["score", tiny, tiny + ".out.parquet", "--model-dir", model, "--device", "cpu", "--log-level", "ERROR"])
    before = peak_kib()
    status = cli.main(["score", src, src + ".out.parquet", "--model-dir", model, "--device", "cpu",
                       "--chunk-rows", chunk_rows, "--concurrency", "2", "--log-level", "ERROR"])
    after = peak_kib()
    print(json.dumps({"status": status, "growth_kib": after - before}))
    """
)


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_file(tmp_path, model_dir):
    n = 4_000_000
    x = _points(n, seed=10).astype(np.float64)
    table = pa.table({"id": np.arange(n), "x1": x[:, 0], "x2": x[:, 1]})
    pq.write_table(table, tmp_path / "big.parquet", row_group_size=65_536)
    pq.write_table(table.slice(0, n // 4), tmp_path / "quarter.parquet", row_group_size=65_536)
    pq.write_table(table.slice(0, 1000), tmp_path / "tiny.parquet")
    file_mib = table.nbytes / 2**20  # 92 MiB in memory, before adding the outputs

    def growth_mib(name: str, chunk_rows: int) -> float:
        paths = (tmp_path / name, tmp_path / "tiny.parquet", model_dir)
        done = subprocess.run(
            [sys.executable, "-c", _RSS_PROBE, *paths, str(chunk_rows)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=240,
            check=True,
        )
        probe = json.loads(done.stdout.strip().splitlines()[-1])
        assert probe["status"] == 0
        return probe["growth_kib"] / 1024

    quarter = growth_mib("quarter.parquet", 8_192)
    whole = growth_mib("big.parquet", 8_192)
    one_chunk = growth_mib("big.parquet", n)  # what loading the whole file costs, so the bound can fail
    # Four times the rows may cost a little more (allocator slack: up to ~25 MiB measured), never a share of
    # the file's size: a reader that keeps what it read grows by ~3/4 of the file (95-100 MiB measured).
    assert whole - quarter < file_mib / 2 < one_chunk - whole, (quarter, whole, one_chunk, file_mib)


@pytest.mark.slow
def test_two_runs_writing_the_same_output_at_once_keep_each_others_files(tmp_path, long_run):
    folder = _with_old_files(tmp_path / "out")
    args = (long_run.input, folder / "out.csv", "--model-dir", long_run.model_dir, *_LONG_ARGS)
    first = _start_score(*args)
    _poll(first, lambda: _size(folder, ".out.csv.*.partial") > 0)  # the first run is writing
    second = _start_score(*args)  # starts by removing dead runs' files: not the first run's
    for process in (first, second):
        _, err = process.communicate(timeout=120)
        assert process.returncode == 0, err.strip().splitlines()[-1:]
    assert _files(folder) == {"out.csv": long_run.output, "out.errors.csv": long_run.errors}
    assert _leftovers(folder) == []
