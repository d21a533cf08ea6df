"""`xorserve score --engine ray` against `--engine local`: the same OUT rows, numbers and error rows, on a local Ray.

Most runs join one local Ray cluster (`ray start --head`, the `cluster` fixture) through --ray-address, as a
user of a cluster does; one starts its own, as `xorserve score --engine ray` does without the flag. Inputs
of several files are folders and globs; their rows are numbered within their file, as the local engine
numbers them. Also here: the multi-file input of the local engine, and the errors that need no Ray.
"""

from __future__ import annotations

import csv
import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from manifests import free_port

from serving.cli import main as cli
from serving.scoring import readers

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
XORSERVE = [sys.executable, "-m", "serving.cli"]
# The cluster and its drivers share a token, as Ray's token authentication (on by default) wants them to.
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


@pytest.fixture
def model_dir(model_repository: Path) -> Path:
    return model_repository / "xor" / "1"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local Ray cluster of 2 CPUs for the module's runs; its address."""
    pytest.importorskip("ray")
    ray = [str(Path(sys.executable).with_name("ray"))]
    port = free_port()
    temp = tmp_path_factory.mktemp("ray")
    env = {**os.environ, **RAY_ENV}
    started = subprocess.run(
        [*ray, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false", f"--temp-dir={temp}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([*ray, "stop", "--force"], capture_output=True, env=env, timeout=120)


def _xorserve(*args, timeout: float = 240, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, **RAY_ENV}
    return subprocess.run(
        [*XORSERVE, "score", *map(str, args), "--quiet", "--log-level", "WARNING"],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


def _summary(stdout: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in shlex.split(stdout))


def _ray_output(folder: Path) -> pa.Table:
    files = sorted(folder.glob("*.parquet"))
    assert files, f"no Parquet file in {folder}"
    return pa.concat_tables([pq.read_table(path) for path in files])


def _parquet_folder(folder: Path, files: int = 3, rows: int = 9_000, seed: int = 0) -> Path:
    """Files of several row groups with every kind of bad feature, some in the same rows."""
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for k in range(files):
        x1 = rng.uniform(-0.5, 1.5, rows)
        x2 = rng.uniform(-0.5, 1.5, rows)
        x1[rng.integers(0, rows, 7)] = np.nan
        x2[rng.integers(0, rows, 5)] = np.inf
        x2[rng.integers(0, rows, 3)] = 1e300  # finite, not a float32
        nulls = np.zeros(rows, bool)
        nulls[rng.integers(0, rows, 4)] = True
        table = pa.table({"id": np.arange(rows) + k * rows, "x1": pa.array(x1, mask=nulls), "x2": x2})
        pq.write_table(table, folder / f"part-{k}.parquet", row_group_size=4_000)
    (folder / "_SUCCESS").write_text("")  # left out, as Spark's and Ray's markers are
    return folder


def _csv_folder(folder: Path) -> Path:
    folder.mkdir()
    (folder / "a.csv").write_text("id,x1,x2\n1,0,1\n2,1,1\n3,abc,1\n4,1,2,3\n5,,0\n6,1e40,0\n7, 0.5 ,0.5\n")
    (folder / "b.csv").write_text('id,x1,x2\n8,1,0\n9,"1",0\n10\n11,nan,1\n12,0,0\n')
    return folder


def _same_as_local(tmp_path: Path, model_dir: Path, source, *ray_args) -> tuple[dict, list[dict]]:
    """Scores `source` with both engines; asserts the same OUT rows (in order), numbers, errors and summary."""
    local = _xorserve(source, tmp_path / "local.parquet", "--model-dir", model_dir, "--device", "cpu")
    assert local.returncode in (0, 1), local.stderr
    ray = _xorserve(source, tmp_path / "ray", "--engine", "ray", "--model-dir", model_dir, "--device", "cpu", *ray_args)
    assert ray.returncode == local.returncode, ray.stderr
    expected, got = pq.read_table(tmp_path / "local.parquet"), _ray_output(tmp_path / "ray")
    assert got.schema == expected.schema
    assert got.equals(expected)  # every row, every bit of every probability, in input order
    local_errors = (tmp_path / "local.errors.csv").read_bytes()
    assert (tmp_path / "ray.errors.csv").read_bytes() == local_errors
    counts = ("rows_read", "rows_scored", "rows_rejected")
    summary = _summary(ray.stdout)
    assert [summary[k] for k in counts] == [_summary(local.stdout)[k] for k in counts]
    assert int(summary["rows_scored"]) == got.num_rows
    with open(tmp_path / "ray.errors.csv", newline="") as f:
        errors = list(csv.DictReader(f))
    assert int(summary["rows_rejected"]) == len(errors)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"
    assert not [p for p in (tmp_path / "ray").iterdir() if p.name.startswith(".")], "the rejects files left in OUT"
    return summary, errors


def test_a_parquet_folder_gives_the_local_engines_rows_numbers_and_errors(tmp_path, model_dir, cluster):
    source = _parquet_folder(tmp_path / "in")
    # Batches of 2,500 rows cross row groups and files; 3 actors on 2 CPUs.
    summary, errors = _same_as_local(
        tmp_path, model_dir, source, "--ray-address", cluster, "--concurrency", 3, "--batch-size", 2_500
    )
    assert int(summary["rows_read"]) == 27_000
    assert {e["file"] for e in errors} == {str(source / f"part-{k}.parquet") for k in range(3)}
    assert {"missing", "non-finite", "out-of-range"} <= {r for e in errors for r in e["reason"].split(";")}


def test_a_csv_glob_with_malformed_records_gives_the_local_engines_rows_and_errors(tmp_path, model_dir, cluster):
    _csv_folder(tmp_path / "in")
    summary, errors = _same_as_local(
        tmp_path, model_dir, tmp_path / "in" / "*.csv", "--ray-address", cluster, "--batch-size", 3
    )
    assert (summary["rows_read"], summary["rows_scored"], summary["rows_rejected"]) == ("12", "6", "6")
    assert [(Path(e["file"]).name, e["row"], e["reason"]) for e in errors] == [
        ("a.csv", "3", "non-numeric"),
        ("a.csv", "4", "wrong-column-count"),
        ("a.csv", "5", "missing"),
        ("a.csv", "6", "out-of-range"),
        ("b.csv", "3", "wrong-column-count"),
        ("b.csv", "4", "non-finite"),
    ]
    # From CSV the features are written as the numbers they were parsed to, as the local engine writes them.
    assert _ray_output(tmp_path / "ray").schema.field("x1").type == pa.float64()


def test_without_an_address_it_starts_its_own_ray_and_a_file_names_no_file(tmp_path, model_dir):
    pytest.importorskip("ray")
    source = tmp_path / "in.parquet"
    x = np.random.default_rng(3).uniform(-0.5, 1.5, (5_000, 2))
    x[17, 0] = np.nan
    pq.write_table(pa.table({"x1": x[:, 0], "x2": x[:, 1]}), source)
    summary, errors = _same_as_local(tmp_path, model_dir, source, "--concurrency", 2)
    assert [(e["row"], e["reason"]) for e in errors] == [("18", "non-finite")]
    assert "file" not in errors[0]


def test_relative_paths_files_that_differ_in_nullability_and_no_row_scored(tmp_path, model_dir, cluster):
    """Ray's workers run elsewhere than this folder; one file declares its columns non-null, the other not;
    every row is rejected, so OUTPUT holds one empty file of the output's columns."""
    (tmp_path / "in").mkdir()
    strict = pa.schema([pa.field("x1", pa.float64(), nullable=False), pa.field("x2", pa.float64(), nullable=False)])
    pq.write_table(pa.table({"x1": [np.nan, 1.0], "x2": [0.0, np.inf]}, schema=strict), tmp_path / "in" / "a.parquet")
    pq.write_table(pa.table({"x1": [None, 0.5], "x2": [1.0, None]}), tmp_path / "in" / "b.parquet")
    outcomes = []
    for engine, out in (("local", "local.parquet"), ("ray", "ray")):
        extra = ["--ray-address", cluster] if engine == "ray" else []
        done = _xorserve("in", out, "--engine", engine, "--model-dir", model_dir, *extra, cwd=tmp_path)
        assert done.returncode == 1, done.stderr
        outcomes.append(
            (_summary(done.stdout)["rows_rejected"], (tmp_path / f"{Path(out).stem}.errors.csv").read_text())
        )
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][0] == "4" and "in/a.parquet,1,non-finite" in outcomes[0][1]
    expected, got = pq.read_table(tmp_path / "local.parquet"), _ray_output(tmp_path / "ray")
    assert got.num_rows == expected.num_rows == 0 and got.schema == expected.schema


def test_a_feature_column_that_cannot_hold_numbers_fails_before_ray_starts(tmp_path, model_dir, score):
    pytest.importorskip("ray")
    pq.write_table(pa.table({"x1": [True], "x2": [1.0]}), tmp_path / "in.parquet")
    status, _, err = score(tmp_path / "in.parquet", tmp_path / "out", "--engine", "ray", "--model-dir", model_dir)
    assert status == 2 and "feature column 'x1' has type bool" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet"]


def test_a_sigterm_mid_run_leaves_no_output_and_no_temporary_folder(tmp_path, model_dir, cluster):
    source = _parquet_folder(tmp_path / "in", files=8, rows=50_000)
    env = {**os.environ, **RAY_ENV}
    args = [source, tmp_path / "out", "--engine", "ray", "--model-dir", model_dir, "--ray-address", cluster]
    args += ["--batch-size", 200, "--quiet"]  # 2,000 small batches: the run lasts long enough to be cut
    process = subprocess.Popen(
        [*XORSERVE, "score", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )
    # Wait for the run to be under way: its temporary folder exists.
    deadline = time.monotonic() + 120
    while not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")] and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "interrupted by SIGTERM; no output written" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.errors.csv").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


# --- what needs no Ray -------------------------------------------------------------------------


@pytest.fixture
def score(capsys):
    def run(*args) -> tuple[int, str, str]:
        try:
            status = cli.main(["score", *map(str, args), "--log-level", "WARNING"])
        except SystemExit as exc:  # argparse's usage errors
            status = exc.code
        out, err = capsys.readouterr()
        return status, out, err

    return run


def test_a_cluster_that_does_not_answer_exits_3_and_writes_nothing(tmp_path, model_dir):
    pytest.importorskip("ray")
    source = _parquet_folder(tmp_path / "in", files=1, rows=10)
    done = _xorserve(
        source,
        tmp_path / "out",
        "--engine",
        "ray",
        "--model-dir",
        model_dir,
        "--ray-address",
        f"127.0.0.1:{free_port()}",
        timeout=60,
    )
    assert done.returncode == 3, done.stderr
    assert "no Ray cluster answers at 127.0.0.1:" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_without_ray_installed_it_says_how_to_install_it_and_writes_nothing(tmp_path, model_dir):
    blocker = tmp_path / "site"
    blocker.mkdir()
    (blocker / "ray.py").write_text("raise ImportError(\"No module named 'ray'\", name='ray')\n")
    source = _parquet_folder(tmp_path / "in", files=1, rows=10)
    env = {**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(
        [*XORSERVE, "score", str(source), str(tmp_path / "out"), "--engine", "ray", "--model-dir", str(model_dir)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "pip install 'xorserve[ray]'" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "site"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--url", "127.0.0.1:1"], "--engine ray scores with --model-dir"),
        (["--output-format", "csv"], "folder of Parquet files"),
    ],
)
def test_ray_engine_usage_errors(tmp_path, model_dir, score, extra, message):
    source = _parquet_folder(tmp_path / "in", files=1, rows=10)
    args = [source, tmp_path / "out", "--engine", "ray", *extra]
    if "--url" not in extra:
        args += ["--model-dir", model_dir]
    status, out, err = score(*args)
    assert status == 2 and message in err, err
    assert not (tmp_path / "out").exists()


def test_ray_engine_refuses_an_output_that_exists_or_is_a_csv_file(tmp_path, model_dir, score):
    source = _parquet_folder(tmp_path / "in", files=1, rows=10)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.parquet").write_text("mine")
    status, _, err = score(source, tmp_path / "out", "--engine", "ray", "--model-dir", model_dir)
    assert status == 2 and "exists" in err
    assert (tmp_path / "out" / "keep.parquet").read_text() == "mine"
    status, _, err = score(source, tmp_path / "out.csv", "--engine", "ray", "--model-dir", model_dir)
    assert status == 2 and "not a CSV file" in err


def test_ray_flags_without_the_ray_engine_are_refused(tmp_path, model_dir, score):
    source = _parquet_folder(tmp_path / "in", files=1, rows=10)
    status, _, err = score(source, tmp_path / "out.parquet", "--model-dir", model_dir, "--batch-size", 10)
    assert status == 2 and "--batch-size go with --engine ray" in err


def test_the_local_engine_reads_a_folder_in_name_order_and_names_each_rejects_file(tmp_path, model_dir, score):
    source = _parquet_folder(tmp_path / "in", files=2, rows=1_000)
    (source / ".part-9.parquet.123@host.abcdef01.partial").write_text("a run going on")  # hidden: left out
    status, out, _ = score(source, tmp_path / "out.parquet", "--model-dir", model_dir, "--chunk-rows", 300)
    assert status == 1
    table = pq.read_table(tmp_path / "out.parquet")
    ids = table.column("id").to_numpy()
    assert (np.diff(ids) > 0).all()  # part-0's rows, then part-1's
    with open(tmp_path / "out.errors.csv", newline="") as f:
        errors = list(csv.DictReader(f))
    assert next(iter(errors[0])) == "file"
    # Each reject's row is its row in its file.
    for error in errors:
        row = pq.read_table(error["file"]).slice(int(error["row"]) - 1, 1).to_pylist()[0]
        value = row["x1"] if error["reason"].startswith("missing") or "x1" in error["detail"] else row["x2"]
        assert value is None or not np.isfinite(value) or abs(value) > float(np.finfo(np.float32).max)
    assert int(_summary(out)["rows_read"]) == 2_000


def test_inputs_of_several_files_must_share_their_columns_and_their_format(tmp_path, model_dir, score):
    pytest.importorskip("ray")
    folder = tmp_path / "in"
    folder.mkdir()
    pq.write_table(pa.table({"x1": [0.0], "x2": [1.0]}), folder / "a.parquet")
    pq.write_table(pa.table({"x1": [0.0], "x2": [1], "z": [1]}), folder / "b.parquet")
    for engine in ("local", "ray"):
        out = tmp_path / ("out.parquet" if engine == "local" else "out")
        status, _, err = score(folder, out, "--model-dir", model_dir, "--engine", engine)
        assert status == 2 and "b.parquet has columns" in err, err
    (folder / "b.parquet").unlink()
    (folder / "c.csv").write_text("x1,x2\n0,1\n")
    status, _, err = score(folder, tmp_path / "out.parquet", "--model-dir", model_dir)
    assert status == 2 and "holds both CSV" in err
    status, _, err = score(tmp_path / "nothing" / "*.parquet", tmp_path / "out.parquet", "--model-dir", model_dir)
    assert status == 2 and "has no CSV or Parquet file" in err
    assert not (tmp_path / "out.parquet").exists() and not (tmp_path / "out").exists()


def test_input_files_expands_folders_and_globs_in_name_order(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("d/b.parquet", "d/a.parquet", "d/sub/c.parquet", "d/_SUCCESS", "d/.hidden.parquet", "d/notes.txt"):
        (tmp_path / name).write_text("")
    files, fmt = readers.input_files(tmp_path / "d")
    assert [p.relative_to(tmp_path).as_posix() for p in files] == ["d/a.parquet", "d/b.parquet", "d/sub/c.parquet"]
    assert fmt == "parquet"
    files, _ = readers.input_files(str(tmp_path / "d" / "*.parquet"))
    assert [p.name for p in files] == ["a.parquet", "b.parquet"]
    with pytest.raises(readers.InputError, match="no such file or folder"):
        readers.input_files(tmp_path / "missing.parquet")


def test_the_write_tasks_rejects_files_merge_by_file_and_row_a_batch_at_a_time(tmp_path):
    from serving.scoring import ray_engine as r

    # Three write tasks' rejects files, each sorted by (file, row) as a write task writes it; together they
    # interleave, and one task rejected nothing (no file). Batches of 2 rows make every file several batches.
    tasks = [[(0, 1), (0, 7), (1, 2), (1, 9), (2, 0)], [(0, 3), (1, 4), (1, 5)], [(0, 2), (0, 8), (2, 1), (2, 2)]]
    (tmp_path / r.REJECTS).mkdir()
    for k, rows in enumerate(tasks):
        files, numbers = zip(*rows, strict=True)
        table = pa.table(
            [files, numbers, [f"reason-{f}-{n}" for f, n in rows], ["d"] * len(rows)],
            schema=r.REJECTS_SCHEMA,
        )
        pq.write_table(table, tmp_path / r.REJECTS / f"part-{k:06d}.parquet")
    merged = list(r.merged_rejects(tmp_path, batch_rows=2))
    assert [(f, n) for f, n, _, _ in merged] == sorted(row for rows in tasks for row in rows)
    assert all(reason == f"reason-{f}-{n}" for f, n, reason, _ in merged)  # each row keeps its own verdict
    assert list(r.merged_rejects(tmp_path / "none")) == []
