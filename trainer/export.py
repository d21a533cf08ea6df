"""Export a saved state_dict of the XOR classifier to ONNX: input `input` [batch, 2], outputs `logits` and
`probability` = sigmoid(logits), both [batch, 1], FP32; provenance in the model's metadata_props.

The file is reproducible: the same state_dict and provenance give the same bytes. PyTorch's exporter
records source paths and stack traces in node metadata; they are stripped, and nothing time- or
path-dependent is written. IR version 10 (onnxruntime 1.31 loads IR <= 13), opset 20, weights inline.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import secrets
import sys
import warnings
from pathlib import Path

import onnx
import torch

from serving.cli.flags import USAGE, Parser, flag
from trainer.model import XorClassifier, architecture, load_classifier

log = logging.getLogger(__name__)

OPSET = 20
IR_VERSION = 10
INPUT_NAME = "input"
OUTPUT_NAMES = ("logits", "probability")
BATCH_AXIS = "batch"
DOC_STRING = (
    "XOR classifier of the course notes: {architecture}. "
    "Outputs: logits, and probability = sigmoid(logits); class 1 when probability >= 0.5."
)
# Training settings that the provenance carries when they are known (key in metadata_props <- key in report.json).
TRAINING_KEYS = {
    "seed": "seed",
    "train_size": "train_size",
    "test_size": "test_size",
    "dataset_std": "std",
    "epochs": "epochs",
    "learning_rate": "lr",
    "batch_size": "batch_size",
}


class XorClassifierWithProbability(XorClassifier):
    """The classifier with the sigmoid inside, so the exported graph gives both the logit and the probability."""

    def forward(self, x):
        logits = super().forward(x)
        return logits, torch.sigmoid(logits)


def repository_names(folder: str | Path) -> tuple[str, str]:
    """(model name, version) of a model-repository version folder <repository>/<model>/<version>/;
    ("xor", "1") for a folder not laid out that way."""
    folder = Path(folder).resolve()
    if folder.name.isdigit() and folder.parent.name:
        return folder.parent.name, folder.name
    return "xor", "1"


def sha256_file(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def provenance(
    model: XorClassifier,
    state_dict_path: str | Path,
    model_name: str = "xor",
    model_version: str = "1",
    training: dict | None = None,
    test_accuracy: float | None = None,
) -> dict[str, str]:
    """The metadata_props of the exported model: what it is, how it was trained, and from which weights."""
    import onnxscript  # only its version is wanted

    props = {
        "model_name": model_name,
        "model_version": model_version,
        "architecture": architecture(model),
        "loss": "BCEWithLogitsLoss",
        "optimizer": "SGD",
    }
    for key, setting in TRAINING_KEYS.items():
        if training and setting in training:
            props[key] = str(training[setting])
    if test_accuracy is not None:
        props["test_accuracy"] = str(test_accuracy)
    props.update(
        {
            "torch_version": torch.__version__,
            "onnx_version": onnx.__version__,
            "onnxscript_version": onnxscript.__version__,
            "opset": str(OPSET),
            "state_dict_sha256": sha256_file(state_dict_path),
        }
    )
    return props


def _strip_debug_info(model: onnx.ModelProto) -> None:
    """Remove what the exporter records about the Python source (paths, stack traces, FX node text)."""

    def clear(proto) -> None:
        del proto.metadata_props[:]
        proto.doc_string = ""

    graph = model.graph
    for proto in [graph, *graph.node, *graph.input, *graph.output, *graph.value_info, *graph.initializer]:
        clear(proto)
    for function in model.functions:
        for proto in [function, *function.node]:
            clear(proto)
    del model.metadata_props[:]


@contextlib.contextmanager
def _quiet_exporter():
    # The exporter warns about optional torchvision ops and deprecations that do not concern this model.
    names = ["torch.onnx", "torch.export", "torch._export", "onnxscript", "onnx_ir"]
    levels = {name: logging.getLogger(name).level for name in names}
    try:
        for name in names:
            logging.getLogger(name).setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def to_onnx(model: XorClassifier, metadata: dict[str, str]) -> onnx.ModelProto:
    """The ONNX model of `model` (CPU, eval mode), debug info stripped, metadata set, checked."""
    export_model = XorClassifierWithProbability(
        num_inputs=model.linear1.in_features,
        num_hidden=model.linear1.out_features,
        num_outputs=model.linear2.out_features,
    )
    export_model.load_state_dict(model.state_dict())
    export_model.eval()
    example = torch.zeros(3, model.linear1.in_features)
    with _quiet_exporter():
        program = torch.onnx.export(
            export_model,
            (example,),
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes={"x": {0: torch.export.Dim(BATCH_AXIS)}},
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    onnx_model = program.model_proto
    _strip_debug_info(onnx_model)
    if onnx_model.ir_version > IR_VERSION:
        onnx_model.ir_version = IR_VERSION
    onnx_model.doc_string = DOC_STRING.format(architecture=architecture(model))
    for key, value in metadata.items():
        onnx_model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(onnx_model, full_check=True)
    return onnx_model


def export_state_dict(
    state_dict_path: str | Path,
    out: str | Path,
    model_name: str = "xor",
    model_version: str = "1",
    training: dict | None = None,
    test_accuracy: float | None = None,
) -> Path:
    """Load the state_dict, export it with its provenance, write `out`; returns the path written."""
    model = load_classifier(state_dict_path)
    metadata = provenance(model, state_dict_path, model_name, model_version, training, test_accuracy)
    onnx_model = to_onnx(model, metadata)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written beside and renamed into place: a reader (a server loading the folder) never sees half a file.
    # (Not tempfile: its files are private, 0600; this one gets the umask's mode, as a plain write would.)
    partial = out.with_name(f".{out.name}.{secrets.token_hex(4)}.tmp")
    try:
        with partial.open("xb") as file:
            file.write(onnx_model.SerializeToString())
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    log.info(
        "event=export_done out=%s bytes=%d opset=%d ir_version=%d sha256=%s",
        out,
        out.stat().st_size,
        OPSET,
        onnx_model.ir_version,
        sha256_file(out),
    )
    return out


def add_arguments(parser: Parser) -> None:
    parser.add_argument("state_dict", type=Path, help="state_dict file saved by `xorserve train` (torch.save)")
    flag(
        parser,
        "--out",
        env="EXPORT_OUT",
        type=Path,
        required=True,
        help="ONNX file to write, e.g. models/xor/2/model.onnx",
    )
    flag(
        parser,
        "--report",
        env="EXPORT_REPORT",
        type=Path,
        help="report.json of the training run, for the provenance (seed, data set, epochs, lr, accuracy); "
        "default: report.json beside STATE_DICT when there is one",
    )
    add_name_arguments(parser, "export")


def add_name_arguments(parser: Parser, command: str) -> None:
    """--model-name and --model-version: recorded in the metadata; `xorserve train` shares them.

    Their variables are XORSERVE_<COMMAND>_MODEL_NAME/_VERSION: XORSERVE_MODEL_VERSION means the version to
    ask a server for in `predict` and `score`, and must not change what a training run records."""
    prefix = command.upper()
    flag(
        parser,
        "--model-name",
        env=f"{prefix}_MODEL_NAME",
        help="model name recorded (default: <model> when the output folder is <repository>/<model>/<version>, "
        "else xor)",
    )
    flag(
        parser,
        "--model-version",
        env=f"{prefix}_MODEL_VERSION",
        help="model version recorded (default: <version> when the output folder is <repository>/<model>/<version>, "
        "else 1)",
    )


def resolve_names(args: argparse.Namespace, folder: Path) -> tuple[str, str]:
    name, version = repository_names(folder)
    return args.model_name or name, args.model_version or version


def read_provenance(report_path: Path) -> tuple[dict | None, float | None]:
    """(settings, test_accuracy) from a report.json; ValueError, naming the file, when it is not one."""
    try:
        report = json.loads(report_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"report {report_path} is not readable JSON: {exc}") from exc
    if not isinstance(report, dict):
        raise ValueError(f"report {report_path} holds a JSON {type(report).__name__}; expected an object")
    training, test_accuracy = report.get("settings"), report.get("test_accuracy")
    if training is not None and not isinstance(training, dict):
        raise ValueError(f"report {report_path}: 'settings' is a JSON {type(training).__name__}; expected an object")
    if test_accuracy is not None and (isinstance(test_accuracy, bool) or not isinstance(test_accuracy, int | float)):
        raise ValueError(f"report {report_path}: 'test_accuracy' is {test_accuracy!r}; expected a number")
    return training, test_accuracy


def _fail(message: str) -> int:
    print(f"xorserve export: error: {message}", file=sys.stderr)
    return USAGE


def run(args: argparse.Namespace) -> int:
    if not args.state_dict.is_file():
        return _fail(f"state_dict {args.state_dict} does not exist")
    if args.out.is_dir():
        return _fail(f"--out {args.out} is a folder; expected the ONNX file to write, e.g. {args.out / 'model.onnx'}")
    report_path = args.report or args.state_dict.with_name("report.json")
    training, test_accuracy = None, None
    try:
        if report_path.is_file():
            training, test_accuracy = read_provenance(report_path)
            log.info("event=provenance_from report=%s", report_path)
        elif args.report:
            return _fail(f"report {args.report} does not exist")
        else:
            log.info("event=provenance_partial reason=no_report_json")
        name, version = resolve_names(args, args.out.parent)
        out = export_state_dict(args.state_dict, args.out, name, version, training, test_accuracy)
    except ValueError as exc:
        return _fail(str(exc).strip().splitlines()[0])
    except OSError as exc:
        return _fail(f"cannot write --out {args.out}: {exc.strerror or exc}")
    print(f"wrote {out} ({out.stat().st_size} bytes, opset {OPSET}, sha256 {sha256_file(out)})")
    return 0
