"""Score a CSV or Parquet file (or a folder or glob of them) through a server (--url) or in-process
(--model-dir), streaming, every row accounted for; or with --engine ray on a Ray cluster's cores.

Writes the input's columns plus `probability` (float32) and `label` (probability >= 0.5), in input
order, as CSV or Parquet by OUTPUT's name. The output appears under its name only when the run
succeeds: it is written to a hidden temporary file in the same folder and renamed at the end.

A folder or glob is read file by file in name order; rows are numbered within their file, and the
errors file starts with a `file` column. --engine ray (needs --model-dir and the `ray` extra) writes
OUTPUT as a new folder of Parquet files, with the same rows, numbers and errors file as the local
engine (docs/scoring.md, "On a Ray cluster").

Rows whose features are missing, non-numeric, non-finite or out of float32 range, and CSV records
with the wrong number of fields, are not scored: they go to the errors file (`row,reason,detail`;
row 1 = the first data row, the CSV header not counted). The summary line on stdout gives
rows_read = rows_scored + rows_rejected.

With --url, a server that serves TLS needs --tls-ca (and --tls-cert with --tls-key when it requires a
client certificate); one that requires a bearer token needs --token-file. --model-dir ignores them.

exit status:
  0  every row scored
  1  some rows rejected (see the errors file); the others are scored and written
  2  bad arguments or input (unreadable input, missing columns, an OUTPUT or errors file that cannot
     be written, a model folder that does not load, a TLS or token file that cannot be read, a request
     the server refuses as invalid, credentials it refuses: UNAUTHENTICATED, no --token-file or a token
     it does not accept): one line on stderr; nothing written (an existing OUTPUT or errors file is
     left as it was)
  3  the server or its model could not be reached (with --engine ray: the Ray cluster at --ray-address),
     also when this client and the server do not speak
     the same (plaintext at a TLS server, TLS at a plaintext one, a certificate one side does not
     trust: the line says which): one line on stderr; nothing written
  130 interrupted (SIGINT, Ctrl-C): nothing written
  143 terminated (SIGTERM): nothing written

A signal may come at any moment: the run stops, removes its temporary files and leaves OUTPUT and the
errors file as they were. The two renames that put the files in place are one step that a signal waits
for: one that comes during or after them finds the run complete, and it exits 0 or 1 with both files
new, as its summary line says. A run killed outright (SIGKILL) leaves its hidden
`.NAME.PID@HOST.XXXXXXXX.partial` files behind; the next run that writes NAME removes them once no
process PID lives on HOST. Only a signal in Python's own start-up, before this command has begun (its
first ~0.1 s, no file opened yet), ends the process the default way: killed by the signal, which a
shell also reports as 130 or 143.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from serving.cli.flags import (
    CHECK_FAILED,
    INTERRUPTED,
    OK,
    UNREACHABLE,
    USAGE,
    Parser,
    device,
    flag,
    model,
    model_version,
    number,
    security,
    timeout_s,
    url,
)

if TYPE_CHECKING:
    from serving.scoring.pipeline import Summary

log = logging.getLogger(__name__)


class UsageError(ValueError):
    """Arguments that cannot work together, or an input that does not have what they ask for."""


def add_arguments(parser: Parser) -> None:
    parser.add_argument(
        "input",
        metavar="INPUT",
        help="CSV with a header line (also .csv.gz ...) or Parquet file; or a folder or glob of such files",
    )
    parser.add_argument(
        "output",
        metavar="OUTPUT",
        help="file to write: .csv (or .csv.gz ...) or .parquet/.pq; with --engine ray a new folder of Parquet files",
    )
    flag(
        parser,
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local: this process's threads; ray: Ray Data actors on a Ray cluster's cores (needs --model-dir and "
        "the ray extra: pip install 'xorserve[ray]')",
    )
    url(parser, help="score through the server at HOST:PORT", default=None)
    flag(parser, "--model-dir", help="score in-process with the model in this folder (model.onnx), e.g. models/xor/1")
    model(parser, help="with --url: the served model's name")
    model_version(parser, help="with --url: the model version; empty: the server's latest")
    flag(
        parser,
        "--features",
        default="x1,x2",
        help="comma-separated feature columns, in the model's input order",
    )
    flag(
        parser,
        "--chunk-rows",
        type=number(int, minimum=1),
        default=65536,
        help="rows per chunk, and per request with --url",
    )
    flag(
        parser,
        "--concurrency",
        type=number(int, minimum=1),
        default=4,
        help="chunks scored at once: requests in flight with --url; with --engine ray, the number of actors",
    )
    flag(
        parser,
        "--batch-size",
        env="SCORE_BATCH_SIZE",  # XORSERVE_BATCH_SIZE is train's
        type=number(int, minimum=1),
        help="with --engine ray: rows per call of an actor (default: --chunk-rows)",
    )
    flag(
        parser,
        "--ray-address",
        help="with --engine ray: the Ray cluster to join (HOST:6379, ray://HOST:10001 or auto); "
        "default: a local one on this machine's cores, stopped at the end",
    )
    flag(
        parser,
        "--errors",
        env="SCORE_ERRORS",
        help="CSV file for rejected rows (default: OUTPUT's name with .errors.csv)",
    )
    flag(parser, "--format", choices=("csv", "parquet"), help="INPUT's format when its name does not say")
    flag(parser, "--output-format", choices=("csv", "parquet"), help="OUTPUT's format when its name does not say")
    device(parser, help="with --model-dir: ONNX Runtime device, as for `serve`")
    timeout_s(parser, default=30.0, help="with --url: deadline of each request, in seconds")
    flag(
        parser,
        "--retries",
        type=number(int, minimum=0),
        default=5,
        help="with --url: retries of a request refused with UNAVAILABLE (server starting, draining or busy), "
        "with growing waits between them",
    )
    flag(
        parser,
        "--quiet",
        action="store_true",
        help="no progress bar (there is none either when stderr is not a terminal)",
    )
    security(parser)


def parse_args(parser: Parser, argv: list[str]) -> argparse.Namespace:
    """One back-end: the flag given on the command line wins over the other's environment variable."""
    args = parser.parse_args(argv)
    given = {name for name in ("--url", "--model-dir") if any(w == name or w.startswith(name + "=") for w in argv)}
    if given == {"--url", "--model-dir"}:
        parser.error("give --url or --model-dir, not both")
    if given == {"--url"}:
        args.model_dir = None
    elif given == {"--model-dir"}:
        args.url = None
    elif args.url and args.model_dir:
        parser.error("XORSERVE_URL and XORSERVE_MODEL_DIR are both set; choose with --url or --model-dir")
    elif not (args.url or args.model_dir):
        parser.error("give --url HOST:PORT (score through a server) or --model-dir DIR (score in-process)")
    if args.engine == "ray" and args.url:
        parser.error("--engine ray scores with --model-dir in Ray's actors, not through a server (--url)")
    if args.engine != "ray":
        unused = [name for name in ("--batch-size", "--ray-address") if any(w.split("=")[0] == name for w in argv)]
        if unused:
            parser.error(f"{' and '.join(unused)} go with --engine ray")
    return args


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

    if args.model_dir:
        return InProcessScorer(args.model_dir, n_features, device=args.device)
    from serving.client.connect import Security

    # SecurityError (flags that do not go together, a file that cannot be read): a usage error, exit 2.
    return RemoteScorer(
        args.url,
        n_features,
        args.model,
        args.model_version,
        args.timeout_s,
        args.retries,
        security=Security.from_args(args),
    )


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


def _check_inputs(files: list[Path], output: Path, errors: Path) -> None:
    inputs = {path.resolve() for path in files}
    if output.resolve() in inputs:
        raise UsageError("OUTPUT is the INPUT; write the scores to another file")
    if errors.resolve() == output.resolve() or errors.resolve() in inputs:
        raise UsageError(f"the errors file {errors} would overwrite the input or the output")


def score(args: argparse.Namespace) -> Summary:
    """Scores args.input into args.output (and the errors file); raises on failure, leaving neither."""
    from serving.scoring import interrupts
    from serving.scoring.pipeline import score_chunks
    from serving.scoring.readers import detect_format, input_files, names_one_file, open_input
    from serving.scoring.writers import Outputs

    names = _feature_names(args.features)
    output, errors = _paths(args)
    files, in_format = input_files(args.input, args.format)
    _check_inputs(files, output, errors)
    several = not names_one_file(args.input)
    if args.engine == "ray":
        return _score_with_ray(args, names, files, in_format, several, output, errors)
    _check_target(output, "OUTPUT")
    _check_target(errors, "the errors file")
    out_format = detect_format(output, args.output_format)
    typed_features = in_format == "csv" and out_format == "parquet"

    source = open_input(args.input, files, in_format, args.chunk_rows)
    try:
        _check_columns(source.schema, names, args.input)
        schema = _output_schema(source.schema, names, typed_features)
        with _open_scorer(args, len(names)) as scorer:
            interrupts.check()  # a signal noted while loading (e.g. in a library's `except:`) stops the run now
            log.debug("event=score_backend_ready %s", scorer.description)
            started = time.perf_counter()  # the data work: the model is loaded, the server reached
            with Outputs(output, out_format, schema, errors, with_file=several) as outputs:
                with _progress_bar(args, source.total_rows) as bar:
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
                outputs.commit()  # the last step that can fail the run (or a signal stop it)
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


def _score_with_ray(
    args: argparse.Namespace,
    names: list[str],
    files: list[Path],
    in_format: str,
    several: bool,
    output: Path,
    errors: Path,
) -> Summary:
    """`--engine ray` (serving.scoring.ray_engine): OUTPUT a new folder of Parquet files, the errors file as ever."""
    import contextlib

    import numpy as np

    from serving.scoring import interrupts, ray_engine
    from serving.scoring.backends import InProcessScorer
    from serving.scoring.readers import COMPRESSIONS, open_input
    from serving.scoring.validate import features
    from serving.scoring.writers import AtomicDir, AtomicPath, ErrorsSink, commit_all

    if (args.output_format or "parquet") != "parquet" or output.suffix.lower() in (".csv", *COMPRESSIONS):
        raise UsageError("--engine ray writes OUTPUT as a folder of Parquet files; name a folder, not a CSV file")
    if output.exists() and not (output.is_dir() and not any(output.iterdir())):
        raise UsageError(f"OUTPUT {output} exists; --engine ray writes a new folder (remove it, or name another)")
    if not output.parent.is_dir() or not os.access(output.parent, os.W_OK | os.X_OK):
        raise UsageError(f"OUTPUT {output}: folder {output.parent} does not exist or is not writable")
    _check_target(errors, "the errors file")
    ray_engine.import_ray()  # before any work: without the extra, say how to install it
    source = open_input(args.input, files, in_format, args.chunk_rows)  # every file's columns checked
    try:
        _check_columns(source.schema, names, args.input)
        schema = source.schema
    finally:
        source.close()
    taken = [name for name in schema.names if name.startswith(ray_engine.PREFIX)]
    if taken:
        raise UsageError(f"{args.input} has column {', '.join(map(repr, taken))}; --engine ray keeps that prefix")
    features(schema.empty_table(), names, np.empty(0, np.int64))  # a column that can never hold numbers: now
    typed_features = in_format == "csv"
    with InProcessScorer(args.model_dir, len(names), device=args.device) as scorer:  # the model's checks, now
        log.debug("event=score_backend_ready engine=ray %s", scorer.description)
        model = scorer.path
    plan = ray_engine.Plan(
        files=[str(path.resolve()) for path in files],
        names=[str(path) for path in files],
        fmt=in_format,
        schema=schema,
        output_schema=_output_schema(schema, names, typed_features),
        feature_names=names,
        typed_features=typed_features,
        chunk_rows=args.chunk_rows,
        several=several,
    )
    session = ray_engine.Session(args.ray_address)  # before any file of the run exists (see Session)
    started = time.perf_counter()  # the data work, as for the local engine: Ray is up, the model checked
    paths: list = []
    sink = None
    try:
        with interrupts.deferred():
            paths.append(AtomicPath(errors))
            paths.append(AtomicDir(output))
            sink = ErrorsSink(paths[0], with_file=several)
        summary = ray_engine.run(
            session,
            plan,
            model,
            paths[1].temp.resolve(),
            sink.write,
            device=args.device,
            concurrency=args.concurrency,
            batch_size=args.batch_size or args.chunk_rows,
            progress=not args.quiet and sys.stderr.isatty(),
        )
        summary.seconds = time.perf_counter() - started
        with interrupts.deferred():
            session.stop()
        sink.close()
        commit_all(paths)
    except BaseException:
        with interrupts.deferred():
            session.stop()  # first: a write task still running could otherwise put the folder back
            if sink is not None:
                with contextlib.suppress(Exception):
                    sink.abort()
            for path in paths:
                path.discard()
        raise
    log.info("event=score_done engine=ray rows=%d seconds=%.3f", summary.rows_read, summary.seconds)
    return summary


def _runs_the_program() -> bool:
    """Whether this is the `xorserve` program (`python -m serving.cli`, the console script), which ends when
    the command returns; not a call from other code (a test, an embedding), which keeps its own handlers."""
    from serving.cli.main import main

    return getattr(sys.modules.get("__main__"), "main", None) is main


def _attempt(args: argparse.Namespace, guard) -> Summary | BaseException:
    """score(), or what it raised (a signal's exception too, wherever it landed); then the outcome is decided.

    A successful run decided it when its files were renamed into place (see serving.scoring.interrupts).
    """
    try:
        guard.arm()  # raises a signal that came while the handlers were being installed
        log.debug("event=score_start pid=%d", os.getpid())
        return score(args)
    except BaseException as exc:
        guard.settle()  # handling an exception: a signal meanwhile is only noted, and from here on too
        return exc


def run(args: argparse.Namespace) -> int:
    from serving.scoring.interrupts import Guard

    if args.url:
        # gRPC's own log lines (a failed TLS handshake) would add to the one line of an error.
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

    with Guard(to_exit=_runs_the_program()) as guard:  # signals are held until _attempt arms it
        outcome = _attempt(args, guard)
    if isinstance(outcome, BaseException) and guard.committed:
        # The files are in place and something failed after that (a back-end that would not close).
        print(f"xorserve score: error after OUTPUT was written: {_one_line(outcome)}", file=sys.stderr)
        return USAGE
    if guard.received is not None and not guard.committed:
        # Any failure while a signal is pending is the signal's doing (e.g. an import it cut short).
        name = signal.Signals(guard.received).name
        what = "interrupted" if guard.received == signal.SIGINT else f"interrupted by {name}"
        print(f"xorserve score: {what}; no output written", file=sys.stderr)
        return 128 + guard.received
    if isinstance(outcome, KeyboardInterrupt):  # no handler of ours (another thread): still Ctrl-C
        print("xorserve score: interrupted; no output written", file=sys.stderr)
        return INTERRUPTED
    if isinstance(outcome, BaseException):
        from serving.client import InferenceError

        if isinstance(outcome, InferenceError):
            # A TLS mismatch's line names the server itself.
            where = "" if outcome.tls_mismatch else f"the server at {args.url}: "
            print(f"xorserve score: error: {where}{_one_line(outcome)}", file=sys.stderr)
            return outcome.exit_code
        from serving.scoring.ray_engine import Unreachable

        if isinstance(outcome, Unreachable):  # as a server that cannot be reached
            print(f"xorserve score: error: {_one_line(outcome)}", file=sys.stderr)
            return UNREACHABLE
        if not isinstance(outcome, Exception):
            raise outcome  # SystemExit and the like: not ours to map
        log.debug("event=score_failed", exc_info=outcome)
        print(f"xorserve score: error: {_one_line(outcome)}", file=sys.stderr)
        return USAGE
    summary = outcome
    output, errors = _paths(args)
    rate = summary.rows_read / summary.seconds if summary.seconds > 0 else 0.0
    print(
        f"rows_read={summary.rows_read} rows_scored={summary.rows_scored} rows_rejected={summary.rows_rejected} "
        f"output={shlex.quote(str(output))} errors={shlex.quote(str(errors))} seconds={summary.seconds:.3f} "
        f"rows_per_s={rate:.0f}",
        flush=True,
    )
    if guard.received is not None:
        name = signal.Signals(guard.received).name
        print(f"xorserve score: {name} came after the output was in place; the run is complete", file=sys.stderr)
    return CHECK_FAILED if summary.rows_rejected else OK
