"""Train the XOR classifier of the notes, save its state_dict, export it to ONNX, check parity, and write
report.json and the plots: everything a model-repository version folder (<repo>/<model>/<version>/) holds.

Same seed, same settings: the same state_dict.pt and model.onnx, byte for byte, on every x86-64 CPU
(`--numerics pinned`, the default; see trainer/numerics.py). report.json is the same file too, except its
"parity" section: ONNX Runtime picks its kernels by the CPU, so those errors are this machine's.
Everything is written into a hidden sibling of the folder (.<name>.<random>.tmp) that replaces the folder
only once the run has finished, so a failed or interrupted run leaves the previous folder as it was.
Exit status: 0 when parity passes, 1 when it misses (the folder is still written: its report.json records
the miss), 2 when the device asked for cannot be had or the folder cannot be written, 130 when interrupted;
a bad option value exits 2 with argparse's message.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from serving.cli.flags import USAGE, Parser, device, flag, number
from serving.devices import DeviceUnavailableError
from trainer.export import OPSET, add_name_arguments, export_state_dict, resolve_names, sha256_file
from trainer.model import architecture
from trainer.numerics import MODES as NUMERICS_MODES
from trainer.parity import format_table, run_parity
from trainer.train import MAX_SEED, TrainSettings, train

log = logging.getLogger(__name__)

STATE_DICT = "state_dict.pt"
MODEL = "model.onnx"
REPORT = "report.json"
PLOTS = "plots"


def write_plots(result, out: Path) -> list[Path]:
    from trainer.plots import plot_loss, visualize_classification, visualize_samples

    plots = out / PLOTS
    accuracy = f"{100.0 * result.test_accuracy:4.2f}%"
    return [
        visualize_samples(
            result.train_dataset.data,
            result.train_dataset.label,
            plots / "dataset.png",
            title=f"Training set ({len(result.train_dataset)} points)",
        ),
        visualize_classification(
            result.model,
            result.test_dataset.data,
            result.test_dataset.label,
            plots / "decision_boundary.png",
            title=f"Decision boundary, test set\n({len(result.test_dataset)} points, accuracy {accuracy})",
        ),
        plot_loss(result.losses, plots / "loss.png"),
    ]


def build_report(model_name, model_version, settings, result, parity, out: Path) -> dict:
    import onnx

    # No paths and no times: the report of a seed is the same file on every run.
    return {
        "model": {"name": model_name, "version": model_version},
        "test_accuracy": result.test_accuracy,
        "settings": settings.as_dict(),
        "training": {
            "device": result.device,
            "loss": "BCEWithLogitsLoss",
            "optimizer": "SGD",
            "architecture": architecture(result.model),
        },
        "numerics": result.numerics,
        "loss_per_epoch": [round(loss, 6) for loss in result.losses],
        "parity": parity,
        "artifacts": {
            name: {"sha256": sha256_file(out / name), "bytes": (out / name).stat().st_size}
            for name in (STATE_DICT, MODEL)
        },
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "opset": OPSET},
    }


def add_arguments(parser: Parser) -> None:
    defaults = TrainSettings()
    positive_int, positive_float = number(int, minimum=1), number(float, above=0)
    flag(
        parser,
        "--out",
        env="TRAIN_OUT",
        type=Path,
        required=True,
        help="folder to write, a model-repository version folder such as models/xor/1; replaced only when the "
        "run finishes",
    )
    flag(parser, "--seed", type=number(int, minimum=0, maximum=MAX_SEED), default=defaults.seed, help="random seed")
    flag(parser, "--epochs", type=positive_int, default=defaults.epochs, help="training epochs")
    flag(parser, "--lr", type=positive_float, default=defaults.lr, help="SGD learning rate")
    flag(parser, "--batch-size", type=positive_int, default=defaults.batch_size, help="batch size")
    flag(parser, "--train-size", type=positive_int, default=defaults.train_size, help="training points")
    flag(parser, "--test-size", type=positive_int, default=defaults.test_size, help="test points")
    flag(
        parser,
        "--std",
        type=number(float, minimum=0),
        default=defaults.std,
        help="std of the Gaussian noise, 0 for none",
    )
    device(
        parser,
        help="train on CUDA when PyTorch sees one (auto) or on the device named; parity uses the same choice",
    )
    flag(
        parser,
        "--numerics",
        choices=NUMERICS_MODES,
        default="pinned",
        help="pinned: the same bytes on every x86-64 CPU (baseline kernels, one thread); native: this CPU's "
        "fastest kernels, the same bytes only on this machine",
    )
    add_name_arguments(parser, "train")
    flag(parser, "--no-plots", action="store_true", help="skip the PNG plots")


def _fail(message: str) -> int:
    print(f"xorserve train: error: {message}", file=sys.stderr)
    return USAGE


def write_folder(args: argparse.Namespace, settings: TrainSettings, names: tuple[str, str], out: Path) -> int:
    """Train, save, export, check parity, plot and report into `out` (an empty folder); the exit status."""
    model_name, model_version = names
    try:
        result = train(settings, device=args.device, numerics_mode=args.numerics)
    except DeviceUnavailableError as exc:
        return _fail(str(exc))
    print(f"Test accuracy: {100.0 * result.test_accuracy:4.2f}% ({len(result.test_dataset)} test points)")

    # torch.save names the records inside the file after the file, so always write it under its final name.
    torch.save(result.model.state_dict(), out / STATE_DICT)
    export_state_dict(
        out / STATE_DICT,
        out / MODEL,
        model_name=model_name,
        model_version=model_version,
        training=settings.as_dict(),
        test_accuracy=result.test_accuracy,
    )
    try:
        parity = run_parity(out, device=args.device)
    except DeviceUnavailableError as exc:
        return _fail(str(exc))
    print(format_table(parity))

    if not args.no_plots:
        write_plots(result, out)

    report = build_report(model_name, model_version, settings, result, parity, out)
    (out / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if parity["passed"] else 1


def replace_folder(staging: Path, target: Path) -> None:
    """Put `staging` where `target` is. The old folder is moved aside first and deleted last, so at every
    moment one complete folder exists (for an instant, only under its hidden name)."""
    if not target.exists():
        os.rename(staging, target)
        return
    aside = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old"))
    os.rename(target, aside / target.name)
    try:
        os.rename(staging, target)
    except BaseException:
        # Should this fail too, the old folder stays in `aside` rather than being lost.
        os.rename(aside / target.name, target)
        aside.rmdir()
        raise
    shutil.rmtree(aside, ignore_errors=True)


def run(args: argparse.Namespace) -> int:
    settings = TrainSettings(
        seed=args.seed,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        train_size=args.train_size,
        test_size=args.test_size,
        std=args.std,
    )
    # A link is followed, so the folder it points to is the one replaced.
    target: Path = args.out.resolve() if args.out.is_symlink() else args.out
    if target.exists() and not target.is_dir():
        return _fail(f"--out {args.out} is a file; expected the folder to write, e.g. models/xor/1")
    names = resolve_names(args, target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Hidden, so that a server scanning the repository for versions never takes it for one.
        staging = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
        staging.mkdir()
    except OSError as exc:
        return _fail(f"cannot write --out {args.out}: {exc.strerror or exc}")
    try:
        status = write_folder(args, settings, names, staging)
        if status in (0, 1):
            replace_folder(staging, target)
    except KeyboardInterrupt:
        print(f"xorserve train: interrupted; {args.out} left as it was", file=sys.stderr)
        return 130
    except OSError as exc:
        return _fail(f"cannot write --out {args.out}: {exc.strerror or exc}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if status in (0, 1):
        for path in sorted((args.out / PLOTS).glob("*.png")) if not args.no_plots else []:
            log.info("event=plot_written path=%s", path)
        written = [args.out / STATE_DICT, args.out / MODEL, args.out / REPORT]
        plots = "" if args.no_plots else f", {args.out / PLOTS}/*.png"
        print("wrote " + ", ".join(map(str, written)) + plots)
    return status
