"""Output and errors files, written under a temporary name in the destination's folder and renamed at the end.

A run that fails or is interrupted leaves nothing under the output's name: `discard()` removes the
temporary file, and even a killed process only leaves a hidden `.NAME.XXXXXXXX.partial` behind. The
output and errors files are renamed into place together (`commit_all`): if the second rename fails,
the first name gets back what it held before.
CSV is written chunk by chunk with Arrow, values quoted only where they need it. Parquet uses
dictionary encoding for text columns only: on numbers (scores, labels, ids) it costs a hash lookup
per value, and snappy already squeezes the 0/1 labels.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import secrets
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from serving.scoring.readers import COMPRESSIONS
from serving.scoring.validate import Reject


class AtomicPath:
    """A temporary file beside `final`, renamed onto it by `commit_all()` or removed by `discard()`."""

    def __init__(self, final: str | Path):
        self.final = Path(final)
        folder = self.final.parent
        if not folder.is_dir():
            raise FileNotFoundError(f"output folder {folder} does not exist")
        self.temp = folder / f".{self.final.name}.{secrets.token_hex(4)}.partial"
        # O_EXCL: never write over someone else's file; mode 0o666 lets the umask decide, as for any new file.
        os.close(os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))

    def sync(self) -> None:
        fd = os.open(self.temp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the data is on disk before the name points at it
        finally:
            os.close(fd)

    def keep_previous(self) -> Path | None:
        """A second name for what `final` holds now (None if nothing), so that a rename onto it can be undone."""
        if not os.path.lexists(self.final):
            return None
        previous = self.final.parent / f".{self.final.name}.{secrets.token_hex(4)}.previous"
        try:
            os.link(self.final, previous, follow_symlinks=False)  # free: no data copied
        except OSError:
            shutil.copy2(self.final, previous, follow_symlinks=False)  # a file system without hard links
        return previous

    def discard(self) -> None:
        self.temp.unlink(missing_ok=True)


def commit_all(paths: list[AtomicPath]) -> None:
    """Renames each temporary file onto its name, in order: all of them, or, if one rename fails, none.

    A name renamed before the failure gets back what it held (or is removed if it held nothing); the
    exception is raised again. Only a crash between two renames can leave the first one done.
    """
    for path in paths:
        path.sync()
    renamed: list[tuple[AtomicPath, Path | None]] = []
    try:
        for index, path in enumerate(paths):
            # The last rename needs no way back: if it fails, nothing after it has happened.
            previous = path.keep_previous() if index < len(paths) - 1 else None
            try:
                os.replace(path.temp, path.final)
            except BaseException:
                if previous is not None:
                    previous.unlink(missing_ok=True)
                raise
            renamed.append((path, previous))
    except BaseException:
        for path, previous in reversed(renamed):
            with contextlib.suppress(OSError):  # the failed rename is the error to report
                if previous is not None:
                    os.replace(previous, path.final)
                else:
                    path.final.unlink()
        raise
    finally:
        for _, previous in renamed:
            if previous is not None:
                previous.unlink(missing_ok=True)


class ParquetSink:
    """Chunks gathered into row groups of up to ROW_GROUP_ROWS rows or ROW_GROUP_BYTES, whichever comes first,
    each encoded by a writer thread while the next one is gathered.

    Fewer, larger row groups cost less to write (and to read back) than one per chunk; encoding one
    in the background keeps the rest of the pipeline moving meanwhile (Arrow releases the GIL).
    """

    ROW_GROUP_ROWS = 1 << 20
    ROW_GROUP_BYTES = 16 << 20

    def __init__(self, path: AtomicPath, schema: pa.Schema):
        numeric = (pa.types.is_floating, pa.types.is_integer)
        dictionary = [f.name for f in schema if not any(is_(f.type) for is_ in numeric)]
        self._writer = pq.ParquetWriter(
            str(path.temp), schema, compression="snappy", use_dictionary=dictionary or False
        )
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="score-parquet")
        self._encoding: Future | None = None  # the row group being encoded
        self._pending: list[pa.Table] = []
        self._rows = self._bytes = 0

    def write(self, table: pa.Table) -> None:
        self._pending.append(table)
        self._rows += table.num_rows
        self._bytes += table.nbytes
        if self._rows >= self.ROW_GROUP_ROWS or self._bytes >= self.ROW_GROUP_BYTES:
            self._flush()

    def _flush(self) -> None:
        self._wait()  # one row group encoding at a time, in order
        if self._pending:
            group = pa.concat_tables(self._pending)
            self._encoding = self._encoder.submit(self._writer.write_table, group, row_group_size=self.ROW_GROUP_ROWS)
        self._pending, self._rows, self._bytes = [], 0, 0

    def _wait(self) -> None:
        if self._encoding is not None:
            encoding, self._encoding = self._encoding, None
            encoding.result()  # raises what the writer thread raised

    def close(self) -> None:
        try:
            self._flush()
            self._wait()
        finally:
            self.abort()

    def abort(self) -> None:
        """Stops without writing what is still gathered (the file is about to be discarded)."""
        self._pending = []
        self._encoder.shutdown()  # waits for a row group being encoded: the writer is not thread-safe
        self._writer.close()


class CsvSink:
    def __init__(self, path: AtomicPath, schema: pa.Schema):
        codec = COMPRESSIONS.get(path.final.suffix.lower())
        self._stream = pa.output_stream(str(path.temp), compression=codec)
        header = io.StringIO()
        csv.writer(header, lineterminator="\n").writerow(schema.names)  # quoted only where needed
        self._stream.write(header.getvalue().encode())
        self._plain = pa_csv.WriteOptions(include_header=False, quoting_style="none")

    def write(self, table: pa.Table) -> None:
        buffer = pa.BufferOutputStream()
        try:
            pa_csv.write_csv(table, buffer, self._plain)
            self._stream.write(buffer.getvalue())
        except pa.ArrowInvalid:
            # A value holds a comma, quote or newline. Arrow would then quote every text value of the
            # chunk; Python's csv module quotes only the values that need it, like the header. Arrow
            # still formats the values, so numbers read the same whichever way a chunk was written.
            text = [pc.cast(column, pa.string()).to_pylist() for column in table.columns]
            lines = io.StringIO()
            csv.writer(lines, lineterminator="\n").writerows(
                ["" if value is None else value for value in row] for row in zip(*text, strict=True)
            )
            self._stream.write(lines.getvalue().encode())

    def close(self) -> None:
        self._stream.close()

    abort = close


def open_sink(path: AtomicPath, fmt: str, schema: pa.Schema) -> CsvSink | ParquetSink:
    return CsvSink(path, schema) if fmt == "csv" else ParquetSink(path, schema)


class ErrorsSink:
    """The rejected rows as CSV: `row,reason,detail`, in input order."""

    HEADER = ("row", "reason", "detail")

    def __init__(self, path: AtomicPath):
        self._file = open(path.temp, "w", newline="", encoding="utf-8")  # noqa: SIM115 (closed by close())
        self._writer = csv.writer(self._file, lineterminator="\n")
        self._writer.writerow(self.HEADER)

    def write(self, rejects: list[Reject]) -> None:
        self._writer.writerows((r.row, r.reason, r.detail) for r in rejects)

    def close(self) -> None:
        self._file.close()

    abort = close


class Outputs:
    """A run's output and errors files: nothing under their names until `commit()`; discarded on an exception."""

    def __init__(self, output: str | Path, fmt: str, schema: pa.Schema, errors: str | Path):
        self._paths: list[AtomicPath] = []
        self._sinks: list = []
        try:
            self._paths += [AtomicPath(output), AtomicPath(errors)]
            self.rows = open_sink(self._paths[0], fmt, schema)
            self._sinks.append(self.rows)
            self.rejects = ErrorsSink(self._paths[1])
            self._sinks.append(self.rejects)
        except BaseException:
            self.discard()
            raise

    def commit(self) -> None:
        while self._sinks:
            self._sinks.pop().close()
        output, errors = self._paths
        # The output last: an output under its name always has its own run's errors file beside it,
        # even if the process is killed between the two renames.
        commit_all([errors, output])
        self._paths = []

    def discard(self) -> None:
        for sink in self._sinks:
            with contextlib.suppress(Exception):  # the failure that got us here is the one to report
                sink.abort()
        self._sinks = []
        for path in self._paths:
            path.discard()
        self._paths = []

    def __enter__(self) -> Outputs:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            self.discard()
