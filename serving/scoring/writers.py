"""Output and errors files, written under a temporary name in the destination's folder and renamed at the end.

A run that fails or is interrupted leaves nothing under the output's name: `discard()` removes the
temporary file. A process killed outright (SIGKILL, a crash) leaves its hidden
`.NAME.PID@HOST.XXXXXXXX.partial` behind; the next run that writes NAME removes it, once no process PID
lives on HOST (a file of a run still going, in this process or another, is never touched). The output
and errors files are renamed into place together (`commit_all`): if the second rename fails, the first
name gets back what it held before. Signals wait for the steps that must not be cut in two
(`serving.scoring.interrupts`): creating and registering the temporary files, removing them, the renames.
CSV is written chunk by chunk with Arrow, values quoted only where they need it. Parquet uses
dictionary encoding for text columns only: on numbers (scores, labels, ids) it costs a hash lookup
per value, and snappy already squeezes the 0/1 labels.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import re
import secrets
import shutil
import socket
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from serving.scoring import interrupts
from serving.scoring.readers import COMPRESSIONS
from serving.scoring.validate import Reject


def host_name() -> str:
    """This host's name as temporary files carry it (letters, digits and dashes)."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32]


def _owner() -> str:
    """`PID@HOST`: who writes a temporary file, so that a later run can tell whether the writer still lives."""
    return f"{os.getpid()}@{host_name()}"


def _alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a process's number: never guess
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # e.g. EPERM: it lives, under another user
    return True


def remove_stale(final: str | Path) -> list[Path]:
    """Removes the temporary files left beside `final` by runs that died on this host; returns them.

    Only names of our own making (`.NAME.PID@HOST.XXXXXXXX.partial` or `.previous`) whose HOST is this one
    and whose PID no longer lives: a run still going, here or on another machine sharing the folder, keeps
    its files. (A PID taken again by a new process keeps a dead run's file until that process ends too.)
    """
    final = Path(final)
    pattern = re.compile(rf"\.{re.escape(final.name)}\.(\d+)@([A-Za-z0-9-]*)\.[0-9a-f]{{8}}\.(?:partial|previous)")
    host, removed = host_name(), []
    try:
        names = os.listdir(final.parent)
    except OSError:
        return removed
    for name in names:
        match = pattern.fullmatch(name)
        if match is None or match[2] != host or _alive(int(match[1])):
            continue
        path = final.parent / name
        with contextlib.suppress(FileNotFoundError):  # another run may have removed it first
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)  # an AtomicDir's
            else:
                path.unlink()
            removed.append(path)
    return removed


def _fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _beside(final: str | Path) -> tuple[Path, Path]:
    """`final`, and a temporary name of ours beside it, once dead runs' leftovers are gone (`remove_stale`)."""
    final = Path(final)
    folder = final.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"output folder {folder} does not exist")
    remove_stale(final)
    return final, folder / f".{final.name}.{_owner()}.{secrets.token_hex(4)}.partial"


class AtomicPath:
    """A temporary file beside `final`, renamed onto it by `commit_all()` or removed by `discard()`.

    Its name carries the writer's PID and host, so that a run that is killed outright can be cleaned up
    after (`remove_stale`, which the constructor calls first)."""

    def __init__(self, final: str | Path):
        self.final, self.temp = _beside(final)
        # O_EXCL: never write over someone else's file; mode 0o666 lets the umask decide, as for any new file.
        os.close(os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))

    def sync(self) -> None:
        _fsync(self.temp)  # the data is on disk before the name points at it

    def keep_previous(self) -> Path | None:
        """A second name for what `final` holds now (None if nothing), so that a rename onto it can be undone."""
        if not os.path.lexists(self.final):
            return None
        previous = self.final.parent / f".{self.final.name}.{_owner()}.{secrets.token_hex(4)}.previous"
        try:
            os.link(self.final, previous, follow_symlinks=False)  # free: no data copied
        except OSError:
            shutil.copy2(self.final, previous, follow_symlinks=False)  # a file system without hard links
        return previous

    def discard(self) -> None:
        self.temp.unlink(missing_ok=True)


class AtomicDir(AtomicPath):
    """A temporary folder beside `final`, which must not exist: `commit_all()` renames it to `final` (as the
    last of its paths: a folder put in place is not taken back), `discard()` removes it with its files."""

    def __init__(self, final: str | Path):  # not AtomicPath.__init__, which creates a file
        self.final, self.temp = _beside(final)
        os.mkdir(self.temp)  # fails if the name is taken: never write into someone else's folder

    def sync(self) -> None:
        for entry in os.scandir(self.temp):
            if entry.is_file(follow_symlinks=False):
                _fsync(entry.path)
        _fsync(self.temp)  # the folder's entries too

    def keep_previous(self) -> Path | None:
        raise RuntimeError("an AtomicDir is renamed last and never replaces a folder")

    def discard(self) -> None:
        shutil.rmtree(self.temp, ignore_errors=True)


def commit_all(paths: list[AtomicPath]) -> None:
    """Renames each temporary file onto its name, in order: all of them, or, if one rename fails, none.

    A name renamed before the failure gets back what it held (or is removed if it held nothing); the
    exception is raised again. Only a crash between two renames can leave the first one done: a signal
    waits for the renames, and one that came before them stops the run first (`interrupts.committing`).
    """
    for path in paths:
        path.sync()
    with interrupts.committing():
        _rename_all(paths)


def _rename_all(paths: list[AtomicPath]) -> None:
    renamed: list[tuple[AtomicPath, Path | None]] = []
    try:
        for index, path in enumerate(paths):
            # The last rename needs no way back: if it fails, nothing after it has happened.
            previous = path.keep_previous() if index < len(paths) - 1 else None
            try:
                if isinstance(path, AtomicDir):
                    try:
                        os.rename(path.temp, path.final)  # onto nothing, or an empty folder
                    except OSError as exc:
                        raise FileExistsError(f"{path.final} appeared during the run and is not empty") from exc
                else:
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
        with interrupts.deferred():  # both steps, even when a signal comes meanwhile
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
    """The rejected rows as CSV: `row,reason,detail`, in input order; `file,row,reason,detail` with `with_file`
    (an input of several files, whose rows are numbered within their file)."""

    HEADER = ("row", "reason", "detail")

    def __init__(self, path: AtomicPath, *, with_file: bool = False):
        self._file = open(path.temp, "w", newline="", encoding="utf-8")  # noqa: SIM115 (closed by close())
        self._writer = csv.writer(self._file, lineterminator="\n")
        self._with_file = with_file
        self._writer.writerow(("file", *self.HEADER) if with_file else self.HEADER)

    def write(self, rejects: list[Reject]) -> None:
        if self._with_file:
            self._writer.writerows((r.file, r.row, r.reason, r.detail) for r in rejects)
        else:
            self._writer.writerows((r.row, r.reason, r.detail) for r in rejects)

    def close(self) -> None:
        self._file.close()

    abort = close


class Outputs:
    """A run's output and errors files: nothing under their names until `commit()`; discarded on an exception.

    The temporary files are created on entering the `with` block (signals held back meanwhile), so that
    none exists without the block's exit to remove it.
    """

    def __init__(self, output: str | Path, fmt: str, schema: pa.Schema, errors: str | Path, *, with_file: bool = False):
        self._targets = (Path(output), fmt, schema, Path(errors))
        self._with_file = with_file  # the errors file names each row's file
        self._paths: list[AtomicPath] = []
        self._sinks: list = []

    def _open(self) -> None:
        output, fmt, schema, errors = self._targets
        for final in (output, errors):
            self._paths.append(AtomicPath(final))
        self.rows = open_sink(self._paths[0], fmt, schema)
        self._sinks.append(self.rows)
        self.rejects = ErrorsSink(self._paths[1], with_file=self._with_file)
        self._sinks.append(self.rejects)

    def commit(self) -> None:
        while self._sinks:
            self._sinks[-1].close()
            self._sinks.pop()  # after close(): a sink that fails to close is aborted by discard()
        output, errors = self._paths
        # The output last: an output under its name always has its own run's errors file beside it,
        # even if the process is killed between the two renames.
        commit_all([errors, output])
        self._paths = []

    def discard(self) -> None:
        with interrupts.deferred():  # a signal now must not leave a temporary file behind
            for sink in self._sinks:
                with contextlib.suppress(Exception):  # the failure that got us here is the one to report
                    sink.abort()
            self._sinks = []
            for path in self._paths:
                path.discard()
            self._paths = []

    def __enter__(self) -> Outputs:
        try:
            with interrupts.deferred():
                self._open()
        except BaseException:
            self.discard()
            raise
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            self.discard()
