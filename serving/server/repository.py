"""The model repository: `<root>/<model>/<version>/model.onnx`, found on disk and loaded into sessions.

Versions are positive integers; an empty version means the latest. Loading one version opens one
ONNX Runtime session per instance (through serving.runtime, the one place that picks providers),
reads the tensors and metadata_props from the graph, and runs a warm-up inference on each session.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from serving.protocol import ONNX_DATATYPES, TensorSpec
from serving.runtime import SessionSettings, open_session, primary_provider

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
PLATFORM = "onnxruntime_onnx"


@dataclass(frozen=True)
class VersionPath:
    model: str
    version: str
    path: Path


@dataclass
class LoadedVersion:
    """One model version ready to run: its sessions (one per instance) and what the graph says."""

    model: str
    version: str
    path: Path
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    sessions: list[ort.InferenceSession]
    providers: tuple[str, ...]
    properties: dict[str, str] = field(default_factory=dict)

    @property
    def provider(self) -> str:
        return self.providers[0]

    @property
    def batchable(self) -> bool:
        """Every tensor has a variable first (batch) axis, so requests can be concatenated along it."""
        return all(spec.shape and spec.shape[0] == -1 for spec in (*self.inputs, *self.outputs))


def discover(root: Path) -> tuple[list[VersionPath], dict[str, str]]:
    """Every `<model>/<version>/` folder under root, and the models that have no usable version (why)."""
    if not root.is_dir():
        raise FileNotFoundError(f"model repository {root} is not a directory")
    found: list[VersionPath] = []
    problems: dict[str, str] = {}
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        versions = []
        for version_dir in model_dir.iterdir():
            if version_dir.is_dir() and version_dir.name.isdigit() and int(version_dir.name) > 0:
                versions.append(version_dir)
            elif not version_dir.name.startswith("."):
                log.warning("event=repository_skip path=%s reason=not_a_positive_integer_version", version_dir)
        if not versions:
            problems[model_dir.name] = f"no version folders (positive integers) in {model_dir}"
        for version_dir in sorted(versions, key=lambda p: int(p.name)):
            found.append(VersionPath(model_dir.name, version_dir.name, version_dir / MODEL_FILE))
    return found, problems


def _specs(args: list) -> tuple[TensorSpec, ...]:
    specs = []
    for arg in args:
        datatype = ONNX_DATATYPES.get(arg.type)
        if datatype is None:
            raise ValueError(f"tensor '{arg.name}' has type {arg.type}, which this server does not serve")
        shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape)
        specs.append(TensorSpec(arg.name, datatype, shape))
    return tuple(specs)


def _zeros(inputs: tuple[TensorSpec, ...], rows: int) -> dict[str, np.ndarray]:
    """Zero inputs with `rows` in every variable dimension."""
    return {spec.name: np.zeros([rows if d == -1 else d for d in spec.shape], dtype=spec.dtype) for spec in inputs}


def _warm_up(session: ort.InferenceSession, inputs: tuple[TensorSpec, ...]) -> None:
    session.run(None, _zeros(inputs, 1))


def run_seconds(loaded: LoadedVersion, rows: int, repeats: int = 3) -> float:
    """The fastest of `repeats` runs of the first session on zero inputs of `rows` rows."""
    session, feeds = loaded.sessions[0], _zeros(loaded.inputs, rows)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feeds)
        best = min(best, time.perf_counter() - start)
    return best


def rows_within(loaded: LoadedVersion, max_rows: int, budget_s: float) -> tuple[int, float]:
    """The largest batch, from `max_rows` halving down to 1 row, whose run (`run_seconds`) takes at most
    `budget_s`, and that run's time; (0, time of the last one tried) when not even 1 row fits.
    A budget of 0 tries nothing: (0, 0.0)."""
    if budget_s <= 0:
        return 0, 0.0
    rows = max(1, max_rows)
    while True:
        seconds = run_seconds(loaded, rows)
        if seconds <= budget_s:
            return rows, seconds
        if rows == 1:
            return 0, seconds
        rows //= 2


def load_version(where: VersionPath, settings: SessionSettings, instances: int) -> LoadedVersion:
    """Opens `instances` sessions on the model file and warms each up; raises with the reason on failure."""
    if not where.path.is_file():
        raise FileNotFoundError(f"{where.path} does not exist")
    sessions = [open_session(where.path, settings) for _ in range(instances)]
    first = sessions[0]
    inputs, outputs = _specs(first.get_inputs()), _specs(first.get_outputs())
    for session in sessions:
        _warm_up(session, inputs)
    properties = dict(first.get_modelmeta().custom_metadata_map)
    loaded = LoadedVersion(
        model=where.model,
        version=where.version,
        path=where.path,
        inputs=inputs,
        outputs=outputs,
        sessions=sessions,
        providers=tuple(first.get_providers()),
        properties=properties,
    )
    log.info(
        "event=model_loaded model=%s version=%s provider=%s instances=%d inputs=%s outputs=%s",
        where.model,
        where.version,
        primary_provider(first),
        instances,
        ",".join(f"{s.name}:{s.datatype}{list(s.shape)}".replace(" ", "") for s in inputs),
        ",".join(f"{s.name}:{s.datatype}{list(s.shape)}".replace(" ", "") for s in outputs),
    )
    return loaded
