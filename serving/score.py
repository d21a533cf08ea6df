"""Score a CSV or Parquet file through a server (--url) or in-process (--model), streaming, every row accounted for.

Writes the input's columns plus `probability` (float32) and `label` (probability >= 0.5), in input
order, as CSV or Parquet by OUTPUT's name. The output appears under its name only when the run
succeeds: it is written to a hidden temporary file in the same folder and renamed at the end.

Rows whose features are missing, non-numeric, non-finite or out of float32 range, and CSV records
with the wrong number of fields, are not scored: they go to the errors file (`row,reason,detail`;
row 1 = the first data row, the CSV header not counted). The summary line on stdout gives
rows_read = rows_scored + rows_rejected.

exit status:
  0  every row scored
  2  some rows rejected (see the errors file); the others are scored and written
  1  failure (bad arguments, an OUTPUT or errors file that cannot be written, unreadable input, missing
     columns, unreachable server, model or server error): one line on stderr; nothing written (an
     existing OUTPUT or errors file is left as it was)
  130 interrupted (Ctrl-C): nothing written
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from serving.cli import env_default

if TYPE_CHECKING:
    from serving.scoring.pipeline import Summary

log = logging.getLogger(__name__)

DEVICES = ("auto", "cuda", "cpu")  # as serving.runtime; not imported here so that --url never loads onnxruntime


class UsageError(ValueError):
    """Arguments that cannot work together, or an input that does not have what they ask for."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # argparse exits 2 on a usage error, which for this command means "some rows rejected".
    def usage_error(message: str):
        parser.print_usage(sys.stderr)
        parser.exit(1, f"{parser.prog}: error: {message}\n")

    parser.error = usage_error
    parser.add_argument("input", metavar="INPUT", help="CSV with a header line (also .csv.gz ...) or Parquet file")
    parser.add_argument("output", metavar="OUTPUT", help="file to write: .csv (or .csv.gz ...) or .parquet/.pq")
    # One choice, made on the command line or else by the environment: a XORSERVE_URL exported for
    # other commands must not collide with a --model given here (or the other way round). The folder's
    # variable is score's own: XORSERVE_MODEL is a model NAME for predict, loadtest and the locustfile.
    backend = parser.add_mutually_exclusive_group()
    backend.add_argument(
        "--url", help="score through the server at HOST:PORT (env XORSERVE_URL, if neither flag is given)"
    )
    backend.add_argument(
        "--model",
        help="score in-process with the model in this folder (model.onnx), e.g. models/xor/1 "
        "(env XORSERVE_SCORE_MODEL, if neither flag is given)",
    )
    parser.add_argument(
        "--model-name",
        default=env_default("model_name", "xor"),
        help="with --url: the served model's name (default %(default)s; env XORSERVE_MODEL_NAME)",
    )
    parser.add_argument(
        "--model-version",
        default=env_default("model_version", ""),
        help="with --url: the model version; empty = the server's choice (env XORSERVE_MODEL_VERSION)",
    )
    parser.add_argument(
        "--features",
        default=env_default("features", "x1,x2"),
        help="comma-separated feature columns, in the model's input order (default %(default)s; env XORSERVE_FEATURES)",
    )
    parser.add_argument(
        "--chunk-rows",
        type=int,
        default=env_default("chunk_rows", 65536),
        help="rows per chunk, and per request with --url (default %(default)s; env XORSERVE_CHUNK_ROWS)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=env_default("concurrency", 4),
        help="chunks scored at once: requests in flight with --url (default %(default)s; env XORSERVE_CONCURRENCY)",
    )
    parser.add_argument(
        "--errors",
        default=env_default("score_errors", None),
        help="CSV file for rejected rows (default: OUTPUT's name with .errors.csv; env XORSERVE_SCORE_ERRORS)",
    )
    parser.add_argument(
        "--format",
        choices=("csv", "parquet"),
        default=env_default("format", None),
        help="INPUT's format when its name does not say (env XORSERVE_FORMAT)",
    )
    parser.add_argument(
        "--output-format",
        choices=("csv", "parquet"),
        default=env_default("output_format", None),
        help="OUTPUT's format when its name does not say (env XORSERVE_OUTPUT_FORMAT)",
    )
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default=env_default("device", "auto"),
        help="with --model: ONNX Runtime device, as for `serve` (default %(default)s; env XORSERVE_DEVICE)",
    )
    parser.add_argument(
        "--timeout-s",
        type=float,
        default=env_default("timeout_s", 30.0),
        help="with --url: deadline of each request in seconds (default %(default)s; env XORSERVE_TIMEOUT_S)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=env_default("retries", 5),
        help="with --url: retries of a request refused with UNAVAILABLE (server starting, draining or busy), "
        "with growing waits between them (default %(default)s; env XORSERVE_RETRIES)",
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        default=env_default("quiet", False),
        help="no progress bar (there is none either when stderr is not a terminal; env XORSERVE_QUIET)",
    )


def default_errors_path(output: Path) -> Path:
    """`out/scored.parquet` -> `out/scored.errors.csv` (also for `scored.csv.gz`)."""
    from serving.scoring.readers import COMPRESSIONS

    name = output.name
    for _ in range(2):  # a compression suffix, then the format's
        stem, dot, suffix = name.rpartition(".")
        if dot and stem and ("." + suffix.lower() in COMPRESSIONS or suffix.lower() in ("csv", "parquet", "pq")):
            name = stem
    return output.with_name(name + ".errors.csv")


def _feature_names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise UsageError("--features names no column")
    if len(set(names)) != len(names):
        raise UsageError(f"--features names a column twice: {text}")
    return names


def _backend(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """(url, model): the flag given, else the environment's; exactly one of them set."""
    if args.url or args.model:
        return args.url, args.model
    url, model = env_default("url", None), env_default("score_model", None)
    if url and model:
        raise UsageError("XORSERVE_URL and XORSERVE_SCORE_MODEL are both set; choose with --url or --model")
    if not (url or model):
        raise UsageError("give --url HOST:PORT (score through a server) or --model DIR (score in-process)")
    return url, model


def _check_args(args: argparse.Namespace) -> None:
    if args.chunk_rows < 1:
        raise UsageError(f"--chunk-rows must be at least 1, not {args.chunk_rows}")
    if args.concurrency < 1:
        raise UsageError(f"--concurrency must be at least 1, not {args.concurrency}")
    if args.retries < 0:
        raise UsageError(f"--retries must be at least 0, not {args.retries}")


def _check_target(path: Path, what: str) -> None:
    """Fails now, before the model is loaded or the server reached, if `path` could not be renamed into place."""
    if path.is_dir():
        raise UsageError(f"{what} {path} is a folder; name a file")
    folder = path.parent
    if not folder.is_dir():
        raise UsageError(f"{what} {path}: folder {folder} does not exist")
    # Creating and renaming a file in the folder needs write and search permission on it (root has both).
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {path}: folder {folder} is not writable")


def _check_columns(schema, names: list[str], path: str) -> None:
    missing = [name for name in names if name not in schema.names]
    if missing:
        raise UsageError(
            f"{path} has no column {', '.join(map(repr, missing))} (it has: {', '.join(map(repr, schema.names))}); "
            "name the feature columns with --features"
        )
    taken = [name for name in ("probability", "label") if name in schema.names]
    if taken:
        raise UsageError(f"{path} already has column {', '.join(map(repr, taken))}, which scoring adds")


def _output_schema(schema, names: list[str], typed_features: bool):
    import pyarrow as pa

    from serving.scoring.pipeline import LABEL, PROBABILITY

    fields = [pa.field(f.name, pa.float64()) if typed_features and f.name in names else f for f in schema]
    return pa.schema([*fields, PROBABILITY, LABEL])


def _open_scorer(args: argparse.Namespace, n_features: int):
    from serving.scoring.backends import InProcessScorer, RemoteScorer

    url, model = _backend(args)
    if model:
        return InProcessScorer(model, n_features, device=args.device)
    from serving.client import InferenceError

    try:
        return RemoteScorer(url, n_features, args.model_name, args.model_version, args.timeout_s, args.retries)
    except InferenceError as exc:
        raise UsageError(f"cannot use the server at {url}: {_one_line(exc)}") from exc


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _progress_bar(args: argparse.Namespace, total: int | None):
    from tqdm import tqdm

    return tqdm(
        total=total,
        unit="rows",
        unit_scale=True,
        smoothing=0.1,
        file=sys.stderr,
        disable=args.quiet or not sys.stderr.isatty(),
    )


def _paths(args: argparse.Namespace) -> tuple[Path, Path]:
    output = Path(args.output)
    return output, Path(args.errors) if args.errors else default_errors_path(output)


def score(args: argparse.Namespace) -> Summary:
    """Scores args.input into args.output (and the errors file); raises on failure, leaving neither."""
    from serving.scoring.pipeline import score_chunks
    from serving.scoring.readers import detect_format, open_source
    from serving.scoring.writers import Outputs

    _check_args(args)
    _backend(args)  # before any file is touched
    names = _feature_names(args.features)
    output, errors = _paths(args)
    if output.resolve() == Path(args.input).resolve():
        raise UsageError("OUTPUT is the INPUT; write the scores to another file")
    if errors.resolve() in (output.resolve(), Path(args.input).resolve()):
        raise UsageError(f"the errors file {errors} would overwrite the input or the output")
    _check_target(output, "OUTPUT")
    _check_target(errors, "the errors file")
    in_format = detect_format(args.input, args.format)
    out_format = detect_format(output, args.output_format)
    typed_features = in_format == "csv" and out_format == "parquet"

    source = open_source(args.input, in_format, args.chunk_rows)
    try:
        _check_columns(source.schema, names, args.input)
        schema = _output_schema(source.schema, names, typed_features)
        with _open_scorer(args, len(names)) as scorer:
            started = time.perf_counter()  # the data work: the model is loaded, the server reached
            with Outputs(output, out_format, schema, errors) as outputs, _progress_bar(args, source.total_rows) as bar:
                summary = score_chunks(
                    source.chunks(),
                    scorer.probabilities,
                    outputs.rows.write,
                    outputs.rejects.write,
                    feature_names=names,
                    typed_features=typed_features,
                    concurrency=args.concurrency,
                    progress=bar.update,
                )
                outputs.commit()
            summary.seconds = time.perf_counter() - started  # up to the files closed and in place
            log.info(
                "event=score_done %s rows=%d max_rows_held=%d seconds=%.3f",
                scorer.description,
                summary.rows_read,
                summary.max_rows_held,
                summary.seconds,
            )
    finally:
        source.close()
    return summary


def run(args: argparse.Namespace) -> int:
    try:
        summary = score(args)
    except KeyboardInterrupt:
        print("xorserve score: interrupted; no output written", file=sys.stderr)
        return 130
    except Exception as exc:
        log.debug("event=score_failed", exc_info=True)
        print(f"xorserve score: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    output, errors = _paths(args)
    rate = summary.rows_read / summary.seconds if summary.seconds > 0 else 0.0
    print(
        f"rows_read={summary.rows_read} rows_scored={summary.rows_scored} rows_rejected={summary.rows_rejected} "
        f"output={output} errors={errors} seconds={summary.seconds:.3f} rows_per_s={rate:.0f}",
        flush=True,
    )
    return 2 if summary.rows_rejected else 0
