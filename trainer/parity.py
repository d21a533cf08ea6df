"""Check that ONNX Runtime (and a running server) give PyTorch's numbers for a model folder.

The same 1,100,004 points go through PyTorch (fp32, CPU, from state_dict.pt) and through model.onnx in
ONNX Runtime: on CPU always, on CUDA when there is one (use_tf32 off; TF32 on is reported as
information, never gating). Points: a 1,000 x 1,000 grid over [-0.5, 1.5]^2, 100,000 random points
(normal, mean 0.5, std 1, fixed seed: inside and around the square) and the 4 corners of {0,1}^2.

For each output: the max absolute error, the max relative error where |reference| > 1e-3, and the
label agreement (probability >= 0.5, logits >= 0). A point whose reference lies within the tolerance
(1e-5) of its output's threshold is "on the boundary": an output that is within tolerance may fall on
either side there, so such points are counted and reported, and left out of label agreement. A path
passes when the max absolute error is <= 1e-5 and every label off the boundary agrees. With --url,
the points are also sent to a server in chunks; its outputs must equal the in-process ONNX Runtime
session's bit for bit. A server that serves TLS needs --tls-ca (and --tls-cert with --tls-key when it
requires a client certificate); one that requires a bearer token needs --token-file.

Exit status: 0 every gating path passes; 1 a path misses; 2 the model folder does not match the
contract (files missing or damaged, input/output names, types, shapes), the device asked for cannot be
had, a TLS or token file cannot be read, the server refuses a request as invalid or refuses the
credentials (UNAUTHENTICATED: no --token-file, or a token it does not accept), or --json cannot be
written; 3 the server (--url) or its model cannot be reached, also when this client and the server do
not speak the same (plaintext at a TLS server, TLS at a plaintext one, a certificate one side does not
trust: the line says which): one line on stderr naming what is wrong.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from serving.cli.flags import CHECK_FAILED, OK, USAGE, Parser, device, flag, model, security
from serving.devices import DeviceUnavailableError

if TYPE_CHECKING:
    from serving.client.connect import Security

log = logging.getLogger(__name__)

MAX_ABS_ERROR = 1e-5
REL_ERROR_FLOOR = 1e-3  # relative errors only where |reference| exceeds this
GRID_SIZE = 1000
GRID_LIMITS = (-0.5, 1.5)
RANDOM_POINTS = 100_000
RANDOM_SEED = 2026
SERVED_CHUNK_ROWS = 65_536
SECURITY_FLAGS = ("tls_ca", "tls_cert", "tls_key", "token_file")  # serving.cli.flags.security's
# Each output's label rule: both say "class 1" for the same points.
LABEL_THRESHOLDS = {"logits": 0.0, "probability": 0.5}
INPUT_NAME = "input"
OUTPUT_NAMES = ("logits", "probability")
ONNX_FLOAT = "tensor(float)"


class ContractError(Exception):
    """The model folder is not what the parity check (and the server) expect; the message says why."""


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message: what the CLI prints, never a traceback."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _onnx_load_errors() -> tuple[type[Exception], ...]:
    """What ONNX Runtime raises for a file that is not a loadable model (damaged, empty, invalid graph)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

    names = ("Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NoModel", "NotImplemented")
    return tuple(getattr(ort_state, name) for name in names if hasattr(ort_state, name))


def parity_points(grid_size: int = GRID_SIZE, random_points: int = RANDOM_POINTS, seed: int = RANDOM_SEED):
    """The inputs, float32 [N, 2]: grid, then random points, then the corners."""
    axis = np.linspace(*GRID_LIMITS, grid_size, dtype=np.float32)
    xx1, xx2 = np.meshgrid(axis, axis, indexing="xy")
    grid = np.stack([xx1.ravel(), xx2.ravel()], axis=1)
    random = np.random.default_rng(seed).normal(0.5, 1.0, size=(random_points, 2)).astype(np.float32)
    corners = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float32)
    return np.concatenate([grid, random, corners])


def describe_points(grid_size: int = GRID_SIZE, random_points: int = RANDOM_POINTS, seed: int = RANDOM_SEED) -> dict:
    return {
        "total": grid_size * grid_size + random_points + 4,
        "grid": f"{grid_size}x{grid_size} over [{GRID_LIMITS[0]}, {GRID_LIMITS[1]}]^2",
        "random": f"{random_points} normal(mean 0.5, std 1), seed {seed}",
        "corners": 4,
    }


def compare(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> dict:
    """Errors and label agreement of `candidate` against `reference`, per output, and whether it passes."""
    outputs = {}
    for name in OUTPUT_NAMES:
        ref = reference[name].astype(np.float64).ravel()
        got = candidate[name].astype(np.float64).ravel()
        if ref.shape != got.shape:
            raise ContractError(f"output {name!r} has {got.size} values; expected {ref.size}")
        abs_error = np.abs(got - ref)
        relevant = np.abs(ref) > REL_ERROR_FLOOR
        rel_error = abs_error[relevant] / np.abs(ref[relevant])
        threshold = LABEL_THRESHOLDS[name]
        # Within tolerance of the threshold, a result within tolerance of the reference may take either label.
        on_boundary = np.abs(ref - threshold) <= MAX_ABS_ERROR
        differs = (ref >= threshold) != (got >= threshold)
        labels_differing = int(np.count_nonzero(differs & ~on_boundary))
        compared = ref.size - int(on_boundary.sum())
        max_abs = float(abs_error.max()) if abs_error.size else 0.0
        outputs[name] = {
            "max_abs_error": max_abs,
            "max_rel_error": float(rel_error.max()) if rel_error.size else 0.0,
            "rel_error_points": int(relevant.sum()),
            "on_boundary": int(on_boundary.sum()),
            "labels_differing_on_boundary": int(np.count_nonzero(differs & on_boundary)),
            "labels_differing": labels_differing,
            "label_agreement": 1.0 - labels_differing / compared if compared else 1.0,
            "non_finite": int(np.count_nonzero(~np.isfinite(got))),
        }
        outputs[name]["passed"] = bool(
            max_abs <= MAX_ABS_ERROR and labels_differing == 0 and outputs[name]["non_finite"] == 0
        )
    return {"outputs": outputs, "passed": all(o["passed"] for o in outputs.values())}


def torch_reference(state_dict_path: Path, points: np.ndarray) -> tuple[dict[str, np.ndarray], dict]:
    """Logits and probabilities from PyTorch, fp32 on CPU, as the notes' eval_model computes them, under
    training's pinned numerics (trainer.numerics: ATen's baseline kernels, MKL_CBWR=COMPATIBLE, one
    thread), and the record of the numerics in effect.

    Pinned, the reference is the same on every x86-64 CPU, and no kernel, BLAS path or thread split that
    a CPU or its load picks enters it. (One run of `make test` under ATEN_CPU_CAPABILITY=default in 7
    once had an unpinned reference 5.2e-4 away from both ONNX Runtime paths, which agreed with each
    other; it did not come back in 27 more runs. Pinned, it costs about 40 ms for the 1.1 M points.)"""
    import torch

    from trainer import numerics
    from trainer.model import load_classifier

    with numerics.apply("pinned") as in_effect, torch.no_grad():  # before the model's first operator
        try:
            model = load_classifier(state_dict_path)
        except ValueError as exc:
            raise ContractError(str(exc)) from exc
        logits = model(torch.from_numpy(points))
        probability = torch.sigmoid(logits)
    return {"logits": logits.numpy(), "probability": probability.numpy()}, in_effect


def check_contract(session) -> None:
    """Raise ContractError unless the session has input `input` float [batch, 2] and outputs logits, probability."""
    problems = []
    inputs = session.get_inputs()
    if [i.name for i in inputs] != [INPUT_NAME]:
        problems.append(f"inputs are {[i.name for i in inputs]}; expected ['{INPUT_NAME}']")
    else:
        _check_tensor(inputs[0], 2, problems)
    outputs = {o.name: o for o in session.get_outputs()}
    if sorted(outputs) != sorted(OUTPUT_NAMES):
        problems.append(f"outputs are {sorted(outputs)}; expected {sorted(OUTPUT_NAMES)}")
    else:
        for name in OUTPUT_NAMES:
            _check_tensor(outputs[name], 1, problems)
    if problems:
        raise ContractError("model.onnx does not match the contract: " + "; ".join(problems))


def _check_tensor(arg, width: int, problems: list[str]) -> None:
    if arg.type != ONNX_FLOAT:
        problems.append(f"{arg.name!r} has type {arg.type}; expected {ONNX_FLOAT} (FP32)")
    shape = list(arg.shape)
    # A dynamic axis shows as a name (str) or None; a fixed batch size would refuse other batches.
    if len(shape) != 2 or isinstance(shape[0], int) or shape[1] != width:
        problems.append(f"{arg.name!r} has shape {shape}; expected [-1, {width}] (dynamic batch)")


def run_session(session, points: np.ndarray, chunk_rows: int | None = None) -> dict[str, np.ndarray]:
    chunks = [points] if chunk_rows is None else [points[i : i + chunk_rows] for i in range(0, len(points), chunk_rows)]
    results = [session.run(list(OUTPUT_NAMES), {INPUT_NAME: chunk}) for chunk in chunks]
    return {name: np.concatenate([r[k] for r in results]) for k, name in enumerate(OUTPUT_NAMES)}


def run_served(
    url: str, model: str, version: str, points: np.ndarray, chunk_rows: int, security: Security | None = None
) -> dict[str, np.ndarray]:
    """The outputs of a running server for the points, sent `chunk_rows` at a time; `security`: TLS and the
    bearer token (serving.client.connect), None for plaintext without a token."""
    # Imported here: only the --url path needs the gRPC client.
    from serving.client import InferenceClient

    parts: dict[str, list[np.ndarray]] = {name: [] for name in OUTPUT_NAMES}
    # `security` only when there is one: a plaintext run calls the client as before security existed.
    secured = {} if security is None else {"security": security}
    with InferenceClient(url, model=model, version=version, **secured) as client:
        for start in range(0, len(points), chunk_rows):
            result = client.infer(points[start : start + chunk_rows], outputs=list(OUTPUT_NAMES))
            for name in OUTPUT_NAMES:
                parts[name].append(np.asarray(result[name]).reshape(-1, 1))
    return {name: np.concatenate(parts[name]) for name in OUTPUT_NAMES}


def bit_identical(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return all(
        a[name].dtype == b[name].dtype and a[name].shape == b[name].shape and a[name].tobytes() == b[name].tobytes()
        for name in OUTPUT_NAMES
    )


def run_parity(
    model_dir: str | Path,
    device: str = "auto",
    url: str | None = None,
    served_model: str = "xor",
    served_version: str = "",
    security: Security | None = None,
) -> dict:
    """Every path's comparison with PyTorch, as a dict that the CLI prints and writes as JSON; `security`
    (TLS, the bearer token; None: plaintext, no token) is how the client reaches `url`.

    Raises ContractError when the folder or the model does not match the contract, and
    serving.runtime.DeviceUnavailableError when `device` is "cuda" and CUDA cannot be had.
    """
    from serving.devices import CUDA
    from serving.runtime import SessionSettings, open_session, primary_provider

    model_dir = Path(model_dir)
    onnx_path, state_dict_path = model_dir / "model.onnx", model_dir / "state_dict.pt"
    for path in (onnx_path, state_dict_path):
        if not path.is_file():
            raise ContractError(f"{path} does not exist; a model folder holds model.onnx and state_dict.pt")
    points = parity_points()
    reference, reference_numerics = torch_reference(state_dict_path, points)

    settings = [("onnxruntime-cpu", SessionSettings(device="cpu"), True)]
    if device in ("auto", "cuda"):
        settings.append(("onnxruntime-cuda", SessionSettings(device="cuda"), True))
        settings.append(("onnxruntime-cuda-tf32", SessionSettings(device="cuda", tf32=True), False))

    paths, unavailable, sessions = [], [], {}
    for name, setting, gating in settings:
        try:
            session = open_session(onnx_path, setting)
        except DeviceUnavailableError as exc:
            if device == "cuda":
                raise
            unavailable.append({"path": name, "reason": str(exc).splitlines()[0]})
            continue
        except _onnx_load_errors() as exc:
            # The CPU session comes first, so a damaged file is reported here, not as a missing device.
            raise ContractError(f"{onnx_path}: not a loadable ONNX model: {one_line(exc)}") from exc
        check_contract(session)
        result = compare(reference, run_session(session, points))
        provider = primary_provider(session)
        paths.append({"path": name, "provider": provider, "tf32": setting.tf32, "gating": gating, **result})
        if not setting.tf32:
            sessions[provider] = session

    if unavailable:
        names = ",".join(u["path"] for u in unavailable)
        log.info("event=parity_paths_skipped paths=%s reason=cuda_execution_provider_unavailable", names)
    if url:
        paths.append(_served_path(url, served_model, served_version, points, reference, sessions, CUDA, security))

    return {
        "reference": "PyTorch fp32 on CPU from state_dict.pt",
        "reference_numerics": reference_numerics,
        "points": describe_points(),
        "tolerance": {
            "max_abs_error": MAX_ABS_ERROR,
            "labels_differing": 0,
            "on_boundary": f"|reference - threshold| <= {MAX_ABS_ERROR:g}: counted, labels not compared",
            "rel_error_where_abs_ref_above": REL_ERROR_FLOOR,
        },
        "versions": _versions(),
        "paths": paths,
        "unavailable": unavailable,
        "passed": all(p["passed"] for p in paths if p["gating"]),
    }


def _served_path(url, model, version, points, reference, sessions, cuda_provider, security=None) -> dict:
    """Compare the server with PyTorch, and require bit-identity with an in-process session on some provider.

    The server may run on CPU or CUDA; its outputs must equal, bit for bit, those of the in-process session
    on one of the providers tried here (CPU always), sent in the same chunks.
    """
    served = run_served(url, model, version, points, SERVED_CHUNK_ROWS, security)
    result = compare(reference, served)
    identical_to = None
    # CUDA first: a server on a GPU machine runs there, and CPU results would not match it bit for bit anyway.
    for provider in sorted(sessions, key=lambda p: p != cuda_provider):
        if bit_identical(served, run_session(sessions[provider], points, SERVED_CHUNK_ROWS)):
            identical_to = provider
            break
    result["bit_identical_to"] = identical_to
    result["passed"] = bool(result["passed"] and identical_to is not None)
    return {"path": "served", "url": url, "model": model, "version": version, "gating": True, **result}


def _versions() -> dict:
    import onnxruntime
    import torch

    return {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__}


def _numerics_line(record: dict) -> str:
    pinned = "pinned" if record["pinned"] else "NOT pinned (torch ran operators earlier in this process)"
    return (
        f"{pinned}: ATen kernels {record['cpu_capability']}, MKL_CBWR={record['mkl_cbwr'] or 'unset'}, "
        f"{record['threads']} thread{'s' if record['threads'] != 1 else ''}"
    )


def format_table(result: dict) -> str:
    """The result as the table the CLI prints."""
    points = result["points"]
    lines = [
        f"points: {points['total']:,} (grid {points['grid']}, {points['random']}, {points['corners']} corners)",
        f"reference: {result['reference']}, numerics {_numerics_line(result['reference_numerics'])}",
        "",
        f"{'path':<22} {'output':<12} {'max abs err':>12} {'max rel err':>12} {'on boundary':>11} "
        f"{'labels agree':>13}  result",
    ]
    for path in result["paths"]:
        for name, out in path["outputs"].items():
            verdict = "pass" if out["passed"] else "FAIL"
            if not path["gating"]:
                verdict = "info" if out["passed"] else "info (over tolerance)"
            lines.append(
                f"{path['path']:<22} {name:<12} {out['max_abs_error']:>12.3e} {out['max_rel_error']:>12.3e} "
                f"{out['on_boundary']:>11,} {100 * out['label_agreement']:>12.4f}%  {verdict}"
            )
        if path["path"] == "served":
            lines.append(f"{'':<22} bit-identical to in-process session on: {path['bit_identical_to'] or 'NONE'}")
    if result["unavailable"]:
        skipped = ", ".join(s["path"] for s in result["unavailable"])
        lines.append(f"not run (CUDA execution provider unavailable; the JSON has the details): {skipped}")
    verdict = "PASS" if result["passed"] else "FAIL"
    lines.append("")
    lines.append(
        f"{verdict}: tolerance max abs error <= {MAX_ABS_ERROR:g} and every label equal off the decision boundary "
        f"(on the boundary: reference within {MAX_ABS_ERROR:g} of the threshold; labels there are not compared)"
    )
    return "\n".join(lines)


def add_arguments(parser: Parser) -> None:
    parser.add_argument(
        "model_dir", type=Path, help="model folder holding model.onnx and state_dict.pt, e.g. models/xor/1"
    )
    flag(parser, "--json", env="PARITY_JSON", type=Path, help="also write the result here")
    device(
        parser,
        help="ONNX Runtime paths: cpu = CPU only; auto = CPU, and CUDA when it loads; cuda = CPU and CUDA, "
        "failing without CUDA",
    )
    # Its own variable: XORSERVE_URL, set for `predict`, would silently add a served path here.
    flag(
        parser,
        "--url",
        env="PARITY_URL",
        help="HOST:PORT of a running server: add the served path, which must equal in-process ONNX Runtime bit for bit",
    )
    model(
        parser,
        help="model name on the server (default: the folder's parent when MODEL_DIR is <repo>/<model>/<version>, "
        "else xor)",
        default=None,
    )
    security(parser)


def _security(args: argparse.Namespace) -> Security:
    """The TLS and token flags as a Security, its files read now, not once the reference is computed.
    Raises SecurityError."""
    from serving.client.connect import Security

    secured = Security.from_args(args)
    secured.metadata()
    if secured.tls:
        secured.credentials()
    return secured


def run(args: argparse.Namespace) -> int:
    # A folder <repository>/<model>/<version> asks the server for that model and version; any other, the latest xor.
    folder = args.model_dir.resolve()
    model, version = (folder.parent.name, folder.name) if folder.name.isdigit() else ("xor", "")
    if args.model:
        model, version = args.model, ""
    unreachable: tuple[type[Exception], ...] = ()
    secured = None
    if args.url:
        # gRPC's own log lines (a failed TLS handshake) would add to the one line of an error.
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
        from serving.client import InferenceError

        unreachable = (InferenceError,)
        if any(getattr(args, name) is not None for name in SECURITY_FLAGS):
            from serving.client.connect import SecurityError

            try:
                secured = _security(args)
            except SecurityError as exc:
                print(f"xorserve parity: error: {one_line(exc)}", file=sys.stderr)
                return USAGE
    try:
        result = run_parity(
            args.model_dir,
            device=args.device,
            url=args.url,
            served_model=model,
            served_version=version,
            security=secured,
        )
    except (ContractError, DeviceUnavailableError) as exc:
        print(f"xorserve parity: error: {one_line(exc)}", file=sys.stderr)
        return USAGE
    except unreachable as exc:
        print(f"xorserve parity: error: {exc.line(args.url).splitlines()[0]}", file=sys.stderr)
        return exc.exit_code
    print(f"parity: {args.model_dir}")
    print(format_table(result))
    if args.json:
        try:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"model_dir": str(args.model_dir), **result}, indent=2) + "\n")
        except OSError as exc:
            print(f"xorserve parity: error: cannot write --json {args.json}: {exc.strerror or exc}", file=sys.stderr)
            return USAGE
        print(f"wrote {args.json}")
    return OK if result["passed"] else CHECK_FAILED
