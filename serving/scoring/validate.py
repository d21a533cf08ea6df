"""Row validation: feature columns -> a float32 matrix for the model, and the rows that cannot be scored.

A row is rejected when any feature is missing (null, or an empty/blank text field), non-numeric (text
that does not parse as a number), non-finite (NaN, +-inf) or out of float32 range (finite, but inf
once converted to the model's float32). Everything is vectorised; Python only builds the reason
strings of rejected rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# What Arrow's string -> float cast accepts (checked in tests), after surrounding blanks are trimmed.
_NUMBER = r"^[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|inf(?:inity)?|nan)$"

OK, MISSING, NON_NUMERIC, NON_FINITE, OUT_OF_RANGE = range(5)
REASONS = {MISSING: "missing", NON_NUMERIC: "non-numeric", NON_FINITE: "non-finite", OUT_OF_RANGE: "out-of-range"}
WRONG_COLUMN_COUNT = "wrong-column-count"
_SHOWN = 40  # characters of an offending value quoted in a reason


class FeatureTypeError(ValueError):
    """A feature column whose type can never hold numbers (e.g. a timestamp)."""


@dataclass
class Reject:
    row: int  # 1-based row number in the input
    reason: str  # short codes, ';'-joined when several features are bad
    detail: str  # what a person needs to find and fix the value
    file: str | None = None  # the file of an input of several (a folder or a glob); row is within it


@dataclass
class Features:
    x: np.ndarray  # float32 [n_ok, k], C-contiguous: the rows that can be scored
    ok: np.ndarray | None  # bool [n] over the chunk's rows; None when every row is fine
    rejects: list[Reject]
    parsed: dict[str, pa.Array]  # float64 values of text feature columns (all rows), for typed outputs


@dataclass
class _Column:
    values: np.ndarray  # float32 [n]
    status: np.ndarray | None  # uint8 [n] of OK/MISSING/...; None when all OK
    shown: pa.Array  # what to quote in a reason (the original values)
    parsed: pa.Array | None  # float64 values when the column was text


def _numeric(arr: pa.Array) -> _Column:
    if pa.types.is_float32(arr.type):
        as64 = None
        values = arr.to_numpy(zero_copy_only=False)  # zero-copy when there are no nulls
    else:
        as64 = pc.cast(arr, pa.float64(), safe=False).to_numpy(zero_copy_only=False)
        with np.errstate(over="ignore"):  # overflow is detected below as out-of-range
            values = as64.astype(np.float32)
    finite = np.isfinite(values)
    if finite.all():
        return _Column(values, None, arr, None)
    status = np.zeros(len(arr), np.uint8)
    status[~finite] = NON_FINITE
    if as64 is not None:
        status[~finite & np.isfinite(as64)] = OUT_OF_RANGE
    if arr.null_count:
        status[np.asarray(arr.is_null(), dtype=bool)] = MISSING
    return _Column(values, status, arr, None)


def _text(arr: pa.Array) -> _Column:
    try:
        parsed = pc.cast(arr, pa.float64())  # the common case: every value parses
        numeric = None
    except pa.ArrowInvalid:
        trimmed = pc.utf8_trim_whitespace(arr)
        blank = pc.fill_null(pc.equal(trimmed, ""), True)
        numeric = pc.and_(pc.invert(blank), pc.match_substring_regex(trimmed, _NUMBER, ignore_case=True))
        numeric = pc.fill_null(numeric, False)
        parsed = pc.cast(pc.if_else(numeric, trimmed, pa.scalar(None, arr.type)), pa.float64())
    if parsed.null_count and numeric is None:
        numeric = pc.invert(parsed.is_null())
        blank = parsed.is_null()
    as64 = parsed.to_numpy(zero_copy_only=False)  # nulls (not numbers) become NaN
    with np.errstate(over="ignore"):
        values = as64.astype(np.float32)
    finite = np.isfinite(values)
    if finite.all():
        return _Column(values, None, arr, parsed)
    status = np.zeros(len(arr), np.uint8)
    status[~finite] = NON_FINITE
    status[~finite & np.isfinite(as64)] = OUT_OF_RANGE
    if numeric is not None:
        status[~np.asarray(numeric, dtype=bool)] = NON_NUMERIC
        status[np.asarray(blank, dtype=bool)] = MISSING
    return _Column(values, status, arr, parsed)


def _column(arr: pa.Array, name: str) -> _Column:
    kind = arr.type
    if pa.types.is_dictionary(kind):
        return _column(arr.dictionary_decode(), name)
    if pa.types.is_floating(kind) or pa.types.is_integer(kind) or pa.types.is_decimal(kind):
        return _numeric(arr)
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind):
        return _text(arr)
    if pa.types.is_null(kind):
        return _Column(np.full(len(arr), np.nan, np.float32), np.full(len(arr), MISSING, np.uint8), arr, None)
    raise FeatureTypeError(f"feature column {name!r} has type {kind}; expected numbers (or text holding numbers)")


def _describe(name: str, status: int, value) -> str:
    if status == MISSING:
        return f"{name} is missing"
    text = repr(value if len(str(value)) <= _SHOWN else str(value)[:_SHOWN] + "...")
    if status == NON_NUMERIC:
        return f"{name}={text} is not a number"
    if status == NON_FINITE:
        return f"{name}={text} is not finite"
    return f"{name}={text} does not fit in float32"


def features(table: pa.Table, names: list[str], rows: np.ndarray) -> Features:
    """The float32 feature matrix of `table`'s valid rows; `rows` numbers the table's rows for the rejects."""
    columns = {}
    for name in names:
        chunked = table.column(name)
        arr = chunked.combine_chunks() if chunked.num_chunks != 1 else chunked.chunk(0)
        columns[name] = _column(arr, name)
    parsed = {name: col.parsed for name, col in columns.items() if col.parsed is not None}
    x = np.empty((table.num_rows, len(names)), np.float32)
    for j, col in enumerate(columns.values()):
        x[:, j] = col.values
    bad = [col for col in columns.values() if col.status is not None]
    if not bad:
        return Features(x, None, [], parsed)
    ok = np.ones(table.num_rows, bool)
    for col in bad:
        ok &= col.status == OK
    rejects = []
    for i in np.flatnonzero(~ok).tolist():
        problems = [
            (REASONS[col.status[i]], _describe(name, col.status[i], col.shown[i].as_py()))
            for name, col in columns.items()
            if col.status is not None and col.status[i] != OK
        ]
        reason = ";".join(dict.fromkeys(code for code, _ in problems))
        rejects.append(Reject(int(rows[i]), reason, "; ".join(text for _, text in problems)))
    return Features(np.ascontiguousarray(x[ok]), ok, rejects, parsed)
