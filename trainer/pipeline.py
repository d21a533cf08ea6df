"""Train the XOR classifier of the notes, save its state_dict, export it to ONNX, check parity, and write
report.json and the plots: everything a model-repository version folder (<repo>/<model>/<version>/) holds.

Same seed, same settings, same machine: the same state_dict.pt and model.onnx, byte for byte.
Exit status: 0 when parity passes, 1 when it misses, 2 when the device asked for cannot be had.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from serving.cli import env_default
from trainer.export import OPSET, add_name_arguments, export_state_dict, resolve_names, sha256_file
from trainer.model import architecture
from trainer.parity import format_table, run_parity
from trainer.train import TrainSettings, train

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
        "loss_per_epoch": [round(loss, 6) for loss in result.losses],
        "parity": parity,
        "artifacts": {
            name: {"sha256": sha256_file(out / name), "bytes": (out / name).stat().st_size}
            for name in (STATE_DICT, MODEL)
        },
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "opset": OPSET},
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = TrainSettings()
    out_default = env_default("out", None)
    parser.add_argument(
        "--out",
        type=Path,
        default=out_default,
        required=out_default is None,
        help="folder to write, a model-repository version folder such as models/xor/1 (env XORSERVE_OUT)",
    )
    parser.add_argument(
        "--seed", type=int, default=env_default("seed", defaults.seed), help="random seed (env XORSERVE_SEED)"
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=env_default("epochs", defaults.epochs),
        help="training epochs (env XORSERVE_EPOCHS)",
    )
    parser.add_argument(
        "--lr", type=float, default=env_default("lr", defaults.lr), help="SGD learning rate (env XORSERVE_LR)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=env_default("batch_size", defaults.batch_size),
        help="batch size (env XORSERVE_BATCH_SIZE)",
    )
    parser.add_argument(
        "--train-size",
        type=int,
        default=env_default("train_size", defaults.train_size),
        help="training points (env XORSERVE_TRAIN_SIZE)",
    )
    parser.add_argument(
        "--test-size",
        type=int,
        default=env_default("test_size", defaults.test_size),
        help="test points (env XORSERVE_TEST_SIZE)",
    )
    parser.add_argument(
        "--std",
        type=float,
        default=env_default("std", defaults.std),
        help="std of the Gaussian noise (env XORSERVE_STD)",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default=env_default("device", "auto"),
        help="train on CUDA when PyTorch sees one (auto) or on the device named; parity uses the same choice "
        "(env XORSERVE_DEVICE)",
    )
    add_name_arguments(parser)
    parser.add_argument(
        "--no-plots",
        action="store_true",
        default=env_default("no_plots", False),
        help="skip the PNG plots (env XORSERVE_NO_PLOTS)",
    )


def run(args: argparse.Namespace) -> int:
    from serving.runtime import DeviceUnavailableError

    settings = TrainSettings(
        seed=args.seed,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        train_size=args.train_size,
        test_size=args.test_size,
        std=args.std,
    )
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    model_name, model_version = resolve_names(args, out)
    try:
        result = train(settings, device=args.device)
    except DeviceUnavailableError as exc:
        print(f"error: {exc}")
        return 2
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
        print(f"error: {exc}")
        return 2
    print(format_table(parity))

    if not args.no_plots:
        for path in write_plots(result, out):
            log.info("event=plot_written path=%s", path)

    report = build_report(model_name, model_version, settings, result, parity, out)
    (out / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"wrote {out / STATE_DICT}, {out / MODEL}, {out / REPORT}" + ("" if args.no_plots else f", {out / PLOTS}/*.png")
    )
    return 0 if parity["passed"] else 1
