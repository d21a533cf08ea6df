"""`xorserve score --engine ray`: the local engine's scoring, spread by Ray Data over the cores of a Ray cluster.

    read      a Ray Data Datasource: one read task per Parquet row group, one per CSV file (CSV is parsed
              serially, so that its rows are numbered and its malformed records found as the local engine
              does); each row carries its file and its number
    score     map_batches with an actor class: `--concurrency` actors, one ONNX Runtime session each
              (serving.scoring.backends.InProcessScorer on the model's bytes, which travel with the
              actor), `--batch-size` rows per call, validated by serving.scoring.validate as the local
              engine validates
    write     a Ray Data Datasink: each write task writes its scored rows to `part-TASK.parquet` in a
              hidden folder beside OUT (renamed to OUT at the end), and its rejected rows to
              `.rejects/part-TASK.parquet` inside it; the driver merges those by file and row into the
              errors file, as the local engine writes it, and removes `.rejects` before the rename

One streaming pass, in bounded memory: a write task holds its own rejects (to sort them), and the
driver 512 rows of each write task's rejects file at a time, never all of them. A task that Ray retries
writes its files again under the same names, and only the tasks that succeeded report rows. Every row
read is accounted for: rows_read = rows in OUT + rows in the errors file, checked against the files
written before they are put in place.

The numbers are the local engine's: the same model bytes, the same execution provider and the same
validation give the same probabilities bit for bit (tests/test_score_ray.py).

In a cluster of several machines, every node needs xorserve with its `ray` extra (the Dockerfile's
server image has no Ray), and INPUT and OUT must be on a file system that every node mounts at the same
path: the read and write tasks run where Ray puts them.
"""

from __future__ import annotations

import functools
import heapq
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from serving.scoring.pipeline import Summary, prepare_chunk, scored_rows
from serving.scoring.readers import Chunk, check_same_columns, named, open_named
from serving.scoring.validate import WRONG_COLUMN_COUNT, Reject

log = logging.getLogger(__name__)

INSTALL = "pip install 'xorserve[ray]' (or: make setup, which installs it)"

# Columns the engine adds on the way; an input column of these names is refused.
PREFIX = "__xorserve_"
FILE = PREFIX + "file"  # int32: the row's file, an index into the input's files
ROW = PREFIX + "row"  # int64: the row's number in its file, as the local engine numbers it
MALFORMED = PREFIX + "malformed"  # string: a CSV record with the wrong number of fields (its detail)
REASON = PREFIX + "reason"  # string: why the row was rejected; null for a scored row
DETAIL = PREFIX + "detail"
_META = pa.schema([(FILE, pa.int32()), (ROW, pa.int64()), (MALFORMED, pa.string())])
REJECTS = ".rejects"  # the write tasks' rejected rows, inside the folder that becomes OUT (removed before)
REJECTS_READ = 512  # rows of each write task's rejects file that the driver holds at a time
REJECTS_BATCH = 65_536  # rows handed to the errors file at a time
_VERDICT = pa.schema([(REASON, pa.string()), (DETAIL, pa.string())])
REJECTS_SCHEMA = pa.schema([_META.field(FILE), _META.field(ROW), *_VERDICT])  # a write task's rejects file


class RayMissing(ImportError):
    """ray[data] is not installed: `--engine ray` cannot run."""


class Unreachable(ConnectionError):
    """The Ray cluster at --ray-address could not be joined (not there, or its token not given)."""


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise RayMissing(f"--engine ray needs Ray Data, which is not installed ({exc.msg}); {INSTALL}") from None
    return ray


@dataclass
class Plan:
    files: list[str]  # in reading order, absolute: Ray's workers do not run in this process's folder
    names: list[str]  # the same files as the input named them, for the errors file
    fmt: str  # csv or parquet
    schema: pa.Schema  # every file's columns (checked), all nullable as for the local engine
    output_schema: pa.Schema  # OUT's: the input's columns (features typed from CSV) + probability + label
    feature_names: list[str]
    typed_features: bool  # CSV in: the feature columns are written as the float64 values they were parsed to
    chunk_rows: int  # rows per block read
    several: bool  # a folder or a glob: the errors file names each row's file


def _with_meta(table: pa.Table, index: int, rows: np.ndarray, malformed: list[Reject]) -> pa.Table:
    """The rows with their file and number; malformed records as rows of nulls that carry their detail."""
    n = table.num_rows
    meta = [pa.array(np.full(n, index, np.int32)), pa.array(rows, pa.int64()), pa.nulls(n, pa.string())]
    columns = [*table.columns, *meta]
    block = pa.Table.from_arrays(columns, schema=pa.schema([*table.schema, *_META]))
    if not malformed:
        return block
    m = len(malformed)
    bad = pa.Table.from_arrays(
        [
            *(pa.nulls(m, field.type) for field in table.schema),
            pa.array(np.full(m, index, np.int32)),
            pa.array([r.row for r in malformed], pa.int64()),
            pa.array([r.detail for r in malformed], pa.string()),
        ],
        schema=block.schema,
    )
    return pa.concat_tables([block, bad])


def _read(path: str, index: int, plan: Plan, group: int | None = None, first: int = 1):
    """A read task's blocks: the file (a CSV file), or one row group of it (Parquet) whose first row is
    `first`, read by the local engine's reader and numbered as it numbers them."""
    name = plan.names[index]
    source = open_named(path, plan.fmt, plan.chunk_rows, name)
    try:
        check_same_columns(source.schema, plan.schema, name, plan.names[0])
        chunks = source.chunks() if group is None else source.chunks(row_groups=[group], first_row=first)
        for chunk in named(name, chunks):
            if chunk.rows_read:
                yield _with_meta(chunk.table.cast(plan.schema), index, chunk.rows, chunk.malformed)
    finally:
        source.close()


def _datasource(plan: Plan):
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    class XorserveInput(Datasource):
        """The input's files as read tasks whose rows know their file and number (see the module)."""

        def estimate_inmemory_data_size(self) -> int:
            return sum(os.path.getsize(path) for path in plan.files)

        def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list:
            tasks = []
            block_schema = pa.schema([*plan.schema, *_META])
            for index, path in enumerate(plan.files):
                if plan.fmt == "csv":
                    read = functools.partial(_read, path, index, plan)
                    meta = BlockMetadata(None, os.path.getsize(path), None, input_files=(path,))
                    tasks.append(ReadTask(read, meta, schema=block_schema))
                    continue
                metadata = pq.read_metadata(path)
                first = 1
                for group in range(metadata.num_row_groups):
                    rows = metadata.row_group(group).num_rows
                    read = functools.partial(_read, path, index, plan, group, first)
                    size = metadata.row_group(group).total_byte_size
                    meta = BlockMetadata(rows, size, None, input_files=(path,))
                    tasks.append(ReadTask(read, meta, schema=block_schema))
                    first += rows
            return tasks

    return XorserveInput()


def _mixed_schema(plan: Plan) -> pa.Schema:
    """What the actors return: OUT's columns (all nullable), then the row's file, number and verdict."""
    fields = [field.with_nullable(True) for field in plan.output_schema]
    return pa.schema([*fields, (FILE, pa.int32()), (ROW, pa.int64()), *_VERDICT])


class _Score:
    """A map_batches actor: one ONNX Runtime session, built from the model's bytes in the actor's own folder."""

    def __init__(self, model: bytes, plan: Plan, device: str):
        from serving.scoring.backends import InProcessScorer

        self._folder = tempfile.TemporaryDirectory(prefix="xorserve-ray-")
        path = Path(self._folder.name) / "model.onnx"
        path.write_bytes(model)
        self._scorer = InProcessScorer(path, len(plan.feature_names), device=device)
        self._plan = plan
        self._schema = _mixed_schema(plan)

    def __call__(self, batch: pa.Table) -> pa.Table:
        plan, schema = self._plan, self._schema
        malformed = batch.column(MALFORMED)
        if malformed.null_count < batch.num_rows:  # some records did not split into the header's columns
            bad = batch.filter(pc.is_valid(malformed))
            batch = batch.filter(pc.is_null(malformed))
        else:
            bad = None
        data = batch.drop_columns([field.name for field in _META])
        # Rejects are numbered by position here, then given their file and row: a batch can span files.
        positions = np.arange(batch.num_rows, dtype=np.int64)
        prepared = prepare_chunk(Chunk(data, positions), plan.feature_names, plan.typed_features)
        scored = scored_rows(prepared, self._scorer.probabilities)
        files, rows = batch.column(FILE), batch.column(ROW)
        ok = prepared.features.ok
        if ok is not None:
            files, rows = files.filter(pa.array(ok)), rows.filter(pa.array(ok))
        n = scored.num_rows
        parts = [
            pa.Table.from_arrays(
                [*scored.columns, files, rows, pa.nulls(n, pa.string()), pa.nulls(n, pa.string())], schema=schema
            )
        ]
        rejects = prepared.features.rejects
        if rejects:
            at = pa.array([r.row for r in rejects], pa.int64())
            parts.append(
                _reject_rows(
                    schema,
                    batch.column(FILE).take(at),
                    batch.column(ROW).take(at),
                    [r.reason for r in rejects],
                    [r.detail for r in rejects],
                )
            )
        if bad is not None:
            m = bad.num_rows
            parts.append(
                _reject_rows(schema, bad.column(FILE), bad.column(ROW), [WRONG_COLUMN_COUNT] * m, bad.column(MALFORMED))
            )
        return pa.concat_tables(parts) if len(parts) > 1 else parts[0]


def _reject_rows(schema: pa.Schema, files, rows, reasons, details) -> pa.Table:
    m = len(reasons)
    nulls = [pa.nulls(m, field.type) for field in schema if not field.name.startswith(PREFIX)]
    return pa.Table.from_arrays(
        [*nulls, files, rows, pa.array(reasons, pa.string()), pa.array(details, pa.string())], schema=schema
    )


def _sink(folder, output_schema: pa.Schema):
    from ray.data import Datasink

    class XorserveOutput(Datasink):
        """Each write task's scored rows to `part-TASK.parquet` in `folder`, its rejected rows to
        `.rejects/part-TASK.parquet`, by file and row (the task's index: a task Ray retries writes the same
        files again); the rows it saw, wrote and rejected go back to the driver (`returns`), which merges
        the rejects files into the errors file (`merged_rejects`)."""

        returns: list = []

        def write(self, blocks, ctx) -> tuple[int, int, int]:
            name = f"part-{ctx.task_idx:06d}.parquet"
            seen = 0
            rejects = []  # this task's only: sorted before they are written (malformed CSV records come last)
            with _Writer(os.path.join(str(folder), name), output_schema) as scored:
                for block in blocks:
                    seen += block.num_rows
                    scored.write(_scored_only(block, output_schema))
                    rejected = _rejected_only(block)
                    if rejected.num_rows:
                        rejects.append(rejected)
            with _Writer(os.path.join(str(folder), REJECTS, name), REJECTS_SCHEMA) as rejected:
                if rejects:
                    rejected.write(pa.concat_tables(rejects).sort_by([(FILE, "ascending"), (ROW, "ascending")]))
            return seen, scored.rows, rejected.rows

        def on_write_complete(self, write_result) -> None:  # on the driver
            self.returns = list(write_result.write_returns)

    return XorserveOutput()


class _Writer:
    """A Parquet file of `schema` that exists once it has a row."""

    def __init__(self, path: str, schema: pa.Schema) -> None:
        self.path, self.schema, self.rows, self._writer = path, schema, 0, None

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            if self._writer is None:
                os.makedirs(os.path.dirname(self.path), exist_ok=True)
                self._writer = pq.ParquetWriter(self.path, self.schema)
            self._writer.write_table(table if table.schema == self.schema else table.cast(self.schema))
            self.rows += table.num_rows

    def __enter__(self) -> _Writer:
        return self

    def __exit__(self, *exc) -> None:
        if self._writer is not None:
            self._writer.close()


def merged_rejects(folder, batch_rows: int = REJECTS_READ) -> Iterator[tuple[int, int, str, str]]:
    """(file, row, reason, detail) of every rejected row in the write tasks' rejects files, by file and row:
    a merge of the files (each sorted so), holding one batch of each at a time."""

    def rows_of(path: Path) -> Iterator[tuple[int, int, str, str]]:
        with pq.ParquetFile(path) as parquet:
            for batch in parquet.iter_batches(batch_size=batch_rows, columns=REJECTS_SCHEMA.names):
                yield from zip(*(batch.column(i).to_pylist() for i in range(4)), strict=True)

    files = sorted(Path(folder, REJECTS).glob("*.parquet"))
    yield from heapq.merge(*(rows_of(path) for path in files), key=lambda r: (r[0], r[1]))


def _scored_only(batch: pa.Table, output_schema: pa.Schema) -> pa.Table:
    reasons = batch.column(REASON)
    kept = batch if reasons.null_count == batch.num_rows else batch.filter(pc.is_null(reasons))  # no copy if none
    return kept.select(output_schema.names).cast(output_schema)


def _rejected_only(batch: pa.Table) -> pa.Table:
    reasons = batch.column(REASON)
    kept = batch.slice(0, 0) if reasons.null_count == batch.num_rows else batch.filter(pc.is_valid(reasons))
    return kept.select([FILE, ROW, REASON, DETAIL])


def _actor_cpus(ray, concurrency: int) -> float:
    """A core per actor, unless the cluster has fewer cores than actors plus one: then the share of all but one
    core. Ray Data's read and write tasks take a whole core each; without one free they wait forever behind
    the actors."""
    cores = float(ray.cluster_resources().get("CPU", 1.0))
    return max(0.0, min(1.0, (cores - 1) / concurrency))


class Session:
    """Ray for one run: a new local cluster started here (stopped by `stop()`), or the one at `address`, joined.

    Without an address the cluster is always a new one (`ray.init(address="local")`), never one that
    RAY_ADDRESS or an earlier `ray start` on this machine points at."""

    def __init__(self, address: str | None):
        from serving.scoring import interrupts

        self.ray = import_ray()
        self._started = False
        if address:
            _probe(address)
        try:
            self._started = True
            self.ray.init(
                address=address or "local",
                include_dashboard=False,
                log_to_driver=False,
                logging_level=logging.ERROR,  # its notes (token authentication on) are not the run's
            )
        except SystemExit as exc:
            # Ray's driver handles SIGTERM itself while it starts (sys.exit(15)): the run's own signal.
            self.stop()
            if exc.code in (signal.SIGTERM, signal.SIGINT):
                interrupts.interrupt(int(exc.code))
            raise
        except (ConnectionError, self.ray.exceptions.AuthenticationError) as exc:
            self.stop()
            hint = "; a cluster with token authentication also needs RAY_AUTH_MODE=token and its token"
            raise Unreachable(f"{' '.join(str(exc).split())}{hint if address else ''}") from None
        except BaseException:
            self.stop()
            raise
        interrupts.reclaim()  # Ray's SIGTERM handler out, ours back in

    def stop(self) -> None:
        if self._started:
            self._started = False
            self.ray.shutdown()


def _probe(address: str) -> None:
    """Fails at once when nothing listens at a HOST:PORT address (ray.init would retry for minutes)."""
    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return  # ray://, auto: Ray's to resolve
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as exc:
        raise Unreachable(f"no Ray cluster answers at {address}: {exc.strerror or exc}") from None


def run(
    session: Session,
    plan: Plan,
    model: Path,
    out_dir,
    write_rejects,
    *,
    device: str,
    concurrency: int,
    batch_size: int,
    progress: bool,
) -> Summary:
    """Scores the plan's files into the folder `out_dir` (an AtomicDir's temp) and hands the rejects, in input
    order, to `write_rejects`; returns the counts."""
    ray = session.ray
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # OUT's files, in name order, hold the rows in input order
    context.enable_progress_bars = progress
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # "progress bars disabled" and the like
    cpus = _actor_cpus(ray, concurrency)
    log.info(
        "event=ray_plan files=%d concurrency=%d actor_cpus=%.2f batch_size=%d",
        len(plan.files),
        concurrency,
        cpus,
        batch_size,
    )
    began = time.perf_counter()
    sink = _sink(out_dir, plan.output_schema)
    try:
        ray.data.read_datasource(_datasource(plan)).map_batches(
            _Score,
            fn_constructor_args=(model.read_bytes(), plan, device),
            batch_format="pyarrow",
            batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(size=concurrency),
            num_cpus=cpus,
            num_gpus=1 if device == "cuda" else 0,  # a GPU each: Ray then gives each actor its own
            zero_copy_batch=True,
        ).write_datasink(sink)
    except ray.exceptions.RayError as exc:
        raise _cause(exc) from None
    returns = sink.returns  # (rows seen, rows written, rows rejected) of every write task that succeeded
    rows_read = sum(seen for seen, _, _ in returns)
    log.info("event=ray_done rows=%d write_tasks=%d seconds=%.3f", rows_read, len(returns), time.perf_counter() - began)
    summary = Summary(rows_read=rows_read, rows_rejected=sum(n for _, _, n in returns))
    summary.rows_scored = rows_read - summary.rows_rejected
    written = _rows_in(out_dir, plan.output_schema)
    if written != summary.rows_scored or written != sum(n for _, n, _ in returns):
        raise AssertionError(f"rows unaccounted for: {summary}, but {written} rows in the output files")
    rejected = 0
    batch: list[Reject] = []
    for index, row, reason, detail in merged_rejects(out_dir):
        batch.append(Reject(row, reason, detail, plan.names[index] if plan.several else None))
        if len(batch) == REJECTS_BATCH:
            write_rejects(batch)
            rejected, batch = rejected + len(batch), []
    if batch:
        write_rejects(batch)
        rejected += len(batch)
    if rejected != summary.rows_rejected:
        raise AssertionError(f"rows unaccounted for: {summary}, but {rejected} rows in the rejects files")
    shutil.rmtree(Path(out_dir, REJECTS), ignore_errors=True)  # not part of OUT
    return summary


def _cause(exc: BaseException) -> BaseException:
    """The error a task raised (an InputError naming a file, say), not Ray's wrapping with its traceback."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None) or exc.__cause__
        if inner is None:
            break
        exc = inner
    if type(exc).__module__.startswith("ray."):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return RuntimeError(f"Ray failed: {first}")
    return exc


def _rows_in(folder, schema: pa.Schema) -> int:
    """Rows in the Parquet files Ray wrote; an empty file of OUT's schema when it wrote none (no row scored)."""
    files = sorted(Path(folder).glob("*.parquet"))
    if not files:
        pq.write_table(schema.empty_table(), Path(folder) / "empty.parquet")
        return 0
    return sum(pq.read_metadata(path).num_rows for path in files)
