"""The model repository: `<root>/<model>/[config.pbtxt]`, `<root>/<model>/<version>/model.onnx`, found on
disk and loaded into sessions.

Versions are positive integers; an empty version means the latest. Hidden folders and files (a leading
dot: the trainer's `.1.xxxx.tmp` staging folders) are not looked at, so a version still being written is
never taken for one. A model's optional config.pbtxt (serving.server.modelconfig) chooses its versions and
sets its batching and instances. Loading one version opens one ONNX Runtime session per instance
(through serving.runtime, the one place that picks providers), reads the tensors and metadata_props
from the graph, checks them against the config.pbtxt, and runs a warm-up inference on each session.
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
from serving.server import modelconfig
from serving.server.modelconfig import ConfigError, ModelSettings

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
PLATFORM = "onnxruntime_onnx"


@dataclass(frozen=True)
class VersionPath:
    model: str
    version: str
    path: Path  # the model.onnx
    # What tells a changed file (inode, size, modification time), or None where there is no model.onnx.
    signature: tuple[int, int, int] | None = None


@dataclass(frozen=True)
class ModelFolder:
    """One model's folder as found on disk: its config.pbtxt and the versions its policy serves."""

    name: str
    path: Path
    settings: ModelSettings | None  # None: no config.pbtxt, the flags apply
    config_signature: tuple[int, int, int] | None
    versions: tuple[VersionPath, ...]  # chosen by the version policy, oldest first
    on_disk: tuple[str, ...]  # every version folder, oldest first
    problem: str | None = None  # why nothing of the model can be served (no version, bad config.pbtxt)


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


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def model_names(root: Path) -> list[str]:
    """The model folders under root (not hidden). Raises FileNotFoundError when root is not a folder."""
    if not root.is_dir():
        raise FileNotFoundError(f"model repository {root} is not a directory")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_model(root: Path, name: str) -> ModelFolder | None:
    """What `root/name` holds now; None when there is no such model folder."""
    model_dir = root / name
    if not model_dir.is_dir() or name.startswith(".") or "/" in name or name in ("", ".."):
        return None
    numbers = []
    for version_dir in model_dir.iterdir():
        if version_dir.name.startswith("."):
            continue
        if version_dir.is_dir() and version_dir.name.isdigit() and int(version_dir.name) > 0:
            numbers.append(int(version_dir.name))
        elif version_dir.name != modelconfig.CONFIG_FILE:
            log.warning("event=repository_skip path=%s reason=not_a_positive_integer_version", version_dir)
    on_disk = tuple(str(n) for n in sorted(numbers))
    config_signature = _signature(model_dir / modelconfig.CONFIG_FILE)
    try:
        settings = modelconfig.read(model_dir)
    except ConfigError as exc:
        return ModelFolder(name, model_dir, None, config_signature, (), on_disk, str(exc))
    policy = settings.version_policy if settings is not None else modelconfig.ALL_VERSIONS
    chosen = policy.choose(numbers)
    versions = tuple(
        VersionPath(name, str(n), model_dir / str(n) / MODEL_FILE, _signature(model_dir / str(n) / MODEL_FILE))
        for n in chosen
    )
    problem = None
    if not numbers:
        problem = f"no version folders (positive integers) in {model_dir}"
    elif not versions:
        problem = f"the version_policy of {model_dir / modelconfig.CONFIG_FILE} chooses none of {list(on_disk)}"
    return ModelFolder(name, model_dir, settings, config_signature, versions, on_disk, problem)


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


def load_version(
    where: VersionPath, settings: SessionSettings, instances: int, config: ModelSettings | None = None
) -> LoadedVersion:
    """Opens `instances` sessions on the model file, checks the graph against the model's config.pbtxt, and
    warms each session up; raises with the reason on failure (ConfigError for a mismatch with the config)."""
    if not where.path.is_file():
        raise FileNotFoundError(f"{where.path} does not exist")
    first = open_session(where.path, settings)
    inputs, outputs = _specs(first.get_inputs()), _specs(first.get_outputs())
    if config is not None:
        modelconfig.check(config, inputs, outputs)
    sessions = [first] + [open_session(where.path, settings) for _ in range(instances - 1)]
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
