"""Streaming readers for CSV and Parquet: chunks of at most `chunk_rows` rows, each row numbered as in the input.

An input is one file, or several: a folder (its CSV or Parquet files, in subfolders too, by name) or a
glob. Several files are read one after the other, in name order, as one input; each must have the first
one's columns, and rows are numbered within their file (`Chunk.file` says which).

Row numbers are 1-based data rows: the CSV header is not counted, so row N is the N-th record after
the header (the N-th line after it unless a quoted value spans lines); in Parquet, row N is the N-th
row of the file. CSV is read with every column as text, so the values pass through byte for byte
and one odd value cannot fail a whole column; blank lines are rows too (with missing features).
A CSV record with the wrong number of fields is not dropped silently: Arrow's `invalid_row_handler`
reports it and it comes out in `Chunk.malformed`, with its number, in the chunk that covers it.
"""

from __future__ import annotations

import collections
import glob
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from serving.scoring.validate import WRONG_COLUMN_COUNT, Reject

FORMATS = ("csv", "parquet")
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".lz4": "lz4", ".br": "brotli"}
_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
_SHOWN = 60  # characters of a malformed record quoted in its reason


@dataclass
class Chunk:
    table: pa.Table  # the rows that split into the header's columns
    rows: np.ndarray  # int64 [table.num_rows]: each row's number in the input
    malformed: list[Reject] = field(default_factory=list)  # records that did not, up to this chunk's end
    file: str | None = None  # the file the rows are from, when the input has several

    @property
    def rows_read(self) -> int:
        return self.table.num_rows + len(self.malformed)


def detect_format(path: str | Path, override: str | None = None) -> str:
    """`override` if given, else the format the file name says (`x.csv`, `x.csv.gz`, `x.parquet`, `x.pq`)."""
    if override:
        if override not in FORMATS:
            raise ValueError(f"format {override!r} is not one of {', '.join(FORMATS)}")
        return override
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes.pop()
    if suffixes and suffixes[-1] in _SUFFIXES:
        return _SUFFIXES[suffixes[-1]]
    raise ValueError(f"cannot tell the format of {path} from its name; name it .csv or .parquet, or pass the format")


class InputError(ValueError):
    """An input that names no file to read, or files that cannot be read as one."""


def _hidden(path: Path, top: Path) -> bool:
    # Names other tools keep for themselves: `.partial` files of a run going on, `_SUCCESS`, `_metadata`.
    return any(part.startswith((".", "_")) for part in path.relative_to(top).parts)


def input_files(spec: str | Path, override: str | None = None) -> tuple[list[Path], str]:
    """The files an input names, in reading order, and their one format.

    A file is itself. A folder gives its files (in subfolders too) whose names say CSV or Parquet, leaving
    out names that start with `.` or `_`; a glob (`data/*.parquet`, `**` for subfolders) gives the files it
    matches. With `override` every file is read in that format, whatever its name.
    """
    path = Path(spec)
    if path.is_file():
        return [path], detect_format(path, override)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p, path))
        where = f"folder {path}"
        if override is None:
            files = [p for p in files if _format_of(p) is not None]
    elif glob.has_magic(str(spec)):
        matched = (Path(p) for p in glob.glob(str(spec), recursive=True))
        files = sorted(p for p in matched if p.is_file() and not p.name.startswith((".", "_")))
        where = f"glob {spec}"
    else:
        raise InputError(f"{spec}: no such file or folder")
    if not files:
        raise InputError(f"{where} has no CSV or Parquet file" if override is None else f"{where} has no file")
    formats = {p: detect_format(p, override) for p in files}
    kinds = sorted(set(formats.values()))
    if len(kinds) > 1:
        first = {kind: next(p for p, f in formats.items() if f == kind) for kind in kinds}
        raise InputError(f"{where} holds both CSV ({first['csv']}) and Parquet ({first['parquet']}); score them apart")
    return files, kinds[0]


def _format_of(path: Path) -> str | None:
    try:
        return detect_format(path)
    except ValueError:
        return None


class CsvSource:
    """A CSV file with a header line, streamed in blocks; every column read as text."""

    def __init__(self, path: str | Path, chunk_rows: int):
        self.path = str(path)
        self.chunk_rows = chunk_rows
        self.total_rows: int | None = None
        self.schema = pa.schema([(name, pa.string()) for name in self._header()])
        self._pending: collections.deque[Reject] = collections.deque()  # malformed, not yet handed out

    def _header(self) -> list[str]:
        # The column names come from a first look at the file, so that every column can be typed as text.
        reader = pa_csv.open_csv(
            self.path,
            read_options=pa_csv.ReadOptions(use_threads=False),
            parse_options=pa_csv.ParseOptions(invalid_row_handler=lambda row: "skip"),
        )
        names = reader.schema.names
        reader.close()
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"{self.path}: duplicate column names in the header: {', '.join(duplicates)}")
        return names

    def _on_invalid(self, row) -> str:
        if row.number is None:  # known when parsing serially, as `_batches` does; never guess a number
            return "error"
        text = row.text if len(row.text) <= _SHOWN else row.text[:_SHOWN] + "..."
        detail = f"{row.actual_columns} fields, expected {row.expected_columns}: {text!r}"
        self._pending.append(Reject(row.number - 1, WRONG_COLUMN_COUNT, detail))  # number 1 is the header
        return "skip"

    def _batches(self) -> Iterator[tuple[pa.RecordBatch, np.ndarray]]:
        """Each batch with its rows' numbers: the next numbers not taken by malformed records."""
        reader = pa_csv.open_csv(
            self.path,
            # Serial parsing: the invalid-row handler then knows each record's number.
            read_options=pa_csv.ReadOptions(use_threads=False, block_size=_block_size(self.chunk_rows)),
            parse_options=pa_csv.ParseOptions(invalid_row_handler=self._on_invalid, ignore_empty_lines=False),
            convert_options=pa_csv.ConvertOptions(
                column_types=dict(zip(self.schema.names, self.schema.types, strict=True)),
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
        cursor = 1
        try:
            for batch in reader:
                n = batch.num_rows
                if n == 0:
                    continue
                taken = np.array([r.row for r in self._pending if r.row >= cursor], np.int64)
                rows = np.arange(cursor, cursor + n + len(taken), dtype=np.int64)
                if len(taken):
                    rows = np.setdiff1d(rows, taken, assume_unique=True)
                rows = rows[:n]
                cursor = int(rows[-1]) + 1
                yield batch, rows
        finally:
            reader.close()

    def _chunk(self, table: pa.Table, rows: np.ndarray) -> Chunk:
        last = int(rows[-1]) if len(rows) else np.iinfo(np.int64).max
        malformed = []
        while self._pending and self._pending[0].row <= last:
            malformed.append(self._pending.popleft())
        return Chunk(table, rows, malformed)

    def chunks(self) -> Iterator[Chunk]:
        batches: list[pa.RecordBatch] = []
        numbers: list[np.ndarray] = []
        held = 0
        for batch, rows in self._batches():
            batches.append(batch)
            numbers.append(rows)
            held += batch.num_rows
            if held < self.chunk_rows:
                continue
            # Cut as many chunks of exactly chunk_rows rows as there are; the rest starts the next one.
            table = pa.Table.from_batches(batches, schema=self.schema)
            rows_all = np.concatenate(numbers)
            start = 0
            while held - start >= self.chunk_rows:
                end = start + self.chunk_rows
                yield self._chunk(table.slice(start, self.chunk_rows), rows_all[start:end])
                start = end
            batches, numbers, held = table.slice(start).to_batches(), [rows_all[start:]], held - start
        if held or self._pending:
            # The rest, and the malformed records after the last good row.
            table = pa.Table.from_batches(batches, schema=self.schema)
            yield self._chunk(table, np.concatenate(numbers) if numbers else np.empty(0, np.int64))

    def close(self) -> None:
        pass


def _block_size(chunk_rows: int) -> int:
    # About one chunk of ~32-byte records per block, within Arrow's sensible range.
    return int(min(max(chunk_rows * 32, 1 << 20), 64 << 20))


class ParquetSource:
    """A Parquet file, streamed in batches; memory is about one row group's compressed bytes plus a chunk."""

    def __init__(self, path: str | Path, chunk_rows: int):
        self.path = str(path)
        self.chunk_rows = chunk_rows
        # pre_buffer (on by default) keeps every column chunk it has read until the file is closed, so a
        # streamed read would hold the whole file by its end; without it, memory stays at a row group.
        self._file = pq.ParquetFile(self.path, pre_buffer=False)
        self.total_rows: int | None = self._file.metadata.num_rows
        # Pandas metadata describes the input's index, which no longer holds once rows are rejected.
        self.schema = self._file.schema_arrow.remove_metadata()

    def chunks(self, row_groups: list[int] | None = None, first_row: int = 1) -> Iterator[Chunk]:
        """The file's rows, or those of `row_groups` only, numbered from `first_row` (the first group's first
        row's number in the file)."""
        cursor = first_row
        # Arrow's own threads cost more CPU than they save on a few columns; the pipeline overlaps the work.
        for batch in self._file.iter_batches(batch_size=self.chunk_rows, row_groups=row_groups, use_threads=False):
            n = batch.num_rows
            if n == 0:
                continue
            table = pa.Table.from_batches([batch.replace_schema_metadata(None)])
            yield Chunk(table, np.arange(cursor, cursor + n, dtype=np.int64))
            cursor += n

    def close(self) -> None:
        self._file.close()


class MultiSource:
    """Several files read one after the other as one input; every chunk says its file."""

    def __init__(self, paths: list[Path], fmt: str, chunk_rows: int):
        self.paths, self.fmt, self.chunk_rows = paths, fmt, chunk_rows
        first = open_named(paths[0], fmt, chunk_rows)
        # Every column nullable: files that declare a column non-null and files that do not are one input.
        self.schema = nullable(first.schema)
        totals = [first.total_rows]
        first.close()
        for path in paths[1:]:
            source = open_named(path, fmt, chunk_rows)
            try:
                check_same_columns(source.schema, self.schema, path, paths[0])
                totals.append(source.total_rows)
            finally:
                source.close()
        self.total_rows: int | None = None if None in totals else sum(totals)
        self._current: CsvSource | ParquetSource | None = None

    def chunks(self) -> Iterator[Chunk]:
        for path in self.paths:
            self._current = open_named(path, self.fmt, self.chunk_rows)
            try:
                # The files were checked when the run began; one that changed since is an error too.
                check_same_columns(self._current.schema, self.schema, path, self.paths[0])
                for chunk in named(path, self._current.chunks()):
                    chunk.table = chunk.table.cast(self.schema)
                    chunk.file = str(path)
                    for reject in chunk.malformed:
                        reject.file = chunk.file
                    yield chunk
            finally:
                self._current.close()
                self._current = None

    def close(self) -> None:
        if self._current is not None:
            self._current.close()


def nullable(schema: pa.Schema) -> pa.Schema:
    return pa.schema([field.with_nullable(True) for field in schema])


def open_named(path: Path | str, fmt: str, chunk_rows: int, name: str | None = None) -> CsvSource | ParquetSource:
    """open_source, whose failures name the file (one of several) as `name`, by default its path."""
    try:
        return open_source(path, fmt, chunk_rows)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise InputError(f"{name or path}: {exc}") from None


def named(path: Path | str, chunks: Iterator[Chunk]) -> Iterator[Chunk]:
    """The chunks, with a failure to read them naming the file."""
    try:
        yield from chunks
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: {exc}") from None


def check_same_columns(schema: pa.Schema, expected: pa.Schema, path, first) -> None:
    """The same names and types (nullability aside), or an InputError naming the file."""
    if schema.names != expected.names or schema.types != expected.types:

        def text(s: pa.Schema) -> str:
            return ", ".join(f"{n} {t}" for n, t in zip(s.names, s.types, strict=True))

        raise InputError(f"{path} has columns ({text(schema)}), unlike {first} ({text(expected)})")


Source = CsvSource | ParquetSource | MultiSource


def open_source(path: str | Path, fmt: str, chunk_rows: int) -> CsvSource | ParquetSource:
    return CsvSource(path, chunk_rows) if fmt == "csv" else ParquetSource(path, chunk_rows)


def open_input(spec: str | Path, paths: list[Path], fmt: str, chunk_rows: int) -> Source:
    """A file as itself (no file named in its chunks); a folder or a glob as a `MultiSource`, even of one file."""
    return open_source(paths[0], fmt, chunk_rows) if names_one_file(spec) else MultiSource(paths, fmt, chunk_rows)


def names_one_file(spec: str | Path) -> bool:
    """Whether the input is a file, whose rows need no file named beside their numbers (a folder or glob does)."""
    return Path(spec).is_file()
