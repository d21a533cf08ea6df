"""`xorserve score`: file formats, row accounting, both back-ends, atomic output, bounded memory."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import shlex
import subprocess
import sys
import textwrap
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
from serving.scoring import backends, pipeline, readers, writers
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
