"""A model's optional `config.pbtxt`, in Triton's format: what it sets, checked against the ONNX graph.

The file is the protobuf text format of Triton's ModelConfig (the subset in protos/model_config.proto).
xorserve uses:
- `max_batch_size` (0: the model is served without batching, its dims are the full shapes);
- `dynamic_batching { max_queue_delay_microseconds }`: as in Triton, requests are batched only when
  `dynamic_batching` is present;
- `instance_group [{ count, kind }]`: sessions per version; KIND_CPU and KIND_GPU choose the device;
- `version_policy`: `latest { num_versions }`, `all {}` or `specific { versions }` (Triton's default,
  `latest { num_versions: 1 }`, when a config.pbtxt does not say);
- `input` and `output`: names, `data_type` and `dims`, which must match the graph.

Everything else in the file (Triton has many more fields) is read past and logged once as ignored. Without
a config.pbtxt the server's flags apply to the model, and every version folder is served.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format

from serving._proto import model_config_pb2 as mc
from serving.protocol import TensorSpec, shape_text

log = logging.getLogger(__name__)

CONFIG_FILE = "config.pbtxt"
# The fields xorserve acts on, as dotted paths; anything else in a config.pbtxt is logged as ignored.
USED_FIELDS = frozenset(
    {
        "name",
        "platform",
        "backend",
        "max_batch_size",
        "dynamic_batching",
        "dynamic_batching.max_queue_delay_microseconds",
        "instance_group",
        "instance_group.count",
        "instance_group.kind",
        "version_policy",
        "version_policy.latest",
        "version_policy.latest.num_versions",
        "version_policy.all",
        "version_policy.specific",
        "version_policy.specific.versions",
        "input",
        "input.name",
        "input.data_type",
        "input.dims",
        "output",
        "output.name",
        "output.data_type",
        "output.dims",
    }
)
DEVICES_BY_KIND = {mc.ModelInstanceGroup.KIND_CPU: "cpu", mc.ModelInstanceGroup.KIND_GPU: "cuda"}


class ConfigError(ValueError):
    """A config.pbtxt that cannot be read, or that does not match the model; the message says where."""


@dataclass(frozen=True)
class VersionPolicy:
    """Which version folders are served: the newest `latest` ones, all of them, or those listed."""

    latest: int | None = None
    specific: tuple[int, ...] | None = None

    def choose(self, versions: list[int]) -> list[int]:
        """The versions to serve out of those in the repository (sorted)."""
        if self.specific is not None:
            return sorted(v for v in versions if v in self.specific)
        if self.latest is not None:
            return sorted(versions)[-self.latest :] if self.latest > 0 else []
        return sorted(versions)


ALL_VERSIONS = VersionPolicy()


@dataclass(frozen=True)
class ModelSettings:
    """What a config.pbtxt sets for a model; None: the server's flag applies."""

    max_batch_size: int | None = None
    batching: bool | None = None  # None: the flags decide; False: no dynamic_batching in the file
    max_queue_delay_us: int | None = None
    instances: int | None = None
    device: str | None = None
    version_policy: VersionPolicy = ALL_VERSIONS
    inputs: tuple[mc.ModelInput, ...] = ()
    outputs: tuple[mc.ModelOutput, ...] = ()
    ignored: tuple[str, ...] = ()


def read(model_dir: Path) -> ModelSettings | None:
    """The settings of `model_dir/config.pbtxt`, or None when there is none. Raises ConfigError."""
    path = model_dir / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        text = path.read_text()
        config = text_format.Parse(text, mc.ModelConfig(), allow_unknown_field=True)
    except (OSError, UnicodeDecodeError, text_format.ParseError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    if config.name and config.name != model_dir.name:
        raise ConfigError(f"{path}: name '{config.name}' is not the model's folder name '{model_dir.name}'")
    if config.max_batch_size < 0:
        raise ConfigError(f"{path}: max_batch_size {config.max_batch_size} must be 0 or more")
    if len(config.instance_group) > 1:
        raise ConfigError(f"{path}: {len(config.instance_group)} instance_groups; xorserve serves one per model")
    group = config.instance_group[0] if config.instance_group else None
    if group is not None and group.count < 0:
        raise ConfigError(f"{path}: instance_group count {group.count} must be 1 or more")
    batching = config.HasField("dynamic_batching")
    return ModelSettings(
        max_batch_size=config.max_batch_size,
        batching=batching and config.max_batch_size > 0,
        max_queue_delay_us=config.dynamic_batching.max_queue_delay_microseconds if batching else None,
        instances=(group.count or None) if group is not None else None,
        device=DEVICES_BY_KIND.get(group.kind) if group is not None else None,
        version_policy=_version_policy(config),
        inputs=tuple(config.input),
        outputs=tuple(config.output),
        ignored=_ignored(_fields(text)),
    )


def _version_policy(config: mc.ModelConfig) -> VersionPolicy:
    if not config.HasField("version_policy"):
        return VersionPolicy(latest=1)  # Triton's default
    choice = config.version_policy.WhichOneof("policy_choice")
    if choice == "all":
        return ALL_VERSIONS
    if choice == "specific":
        return VersionPolicy(specific=tuple(config.version_policy.specific.versions))
    return VersionPolicy(latest=config.version_policy.latest.num_versions or 1)


def _ignored(fields: set[str]) -> tuple[str, ...]:
    """The fields not acted on, without the children of a field that is ignored as a whole."""
    unused = {field for field in fields if field not in USED_FIELDS}
    return tuple(sorted(f for f in unused if not any(f.startswith(parent + ".") for parent in unused)))


def _fields(text: str) -> set[str]:
    """Every field named in a protobuf text message, as a dotted path, known to the schema or not.

    Text format is `name: value`, `name { ... }` or `name [ values or { ... } ]`; a stack of the messages
    and lists the tokens are inside tells names from values."""
    tokenizer = text_format.Tokenizer(text.splitlines())
    frames: list[tuple[str, str]] = [("message", "")]  # ("message" or "list", dotted path)
    names: set[str] = set()

    def advance() -> str | None:
        tokenizer.NextToken()
        return None if tokenizer.AtEnd() else tokenizer.token

    token = None if tokenizer.AtEnd() else tokenizer.token
    while token is not None:
        kind, path = frames[-1]
        if token in ("}", ">", "]"):
            if len(frames) > 1:
                frames.pop()
        elif token in (",", ";"):
            pass
        elif kind == "list":
            if token in ("{", "<"):
                frames.append(("message", path))
        else:
            field = f"{path}.{token}" if path else token
            names.add(field)
            token = advance()
            if token == ":":
                token = advance()
            if token in ("{", "<"):
                frames.append(("message", field))
            elif token == "[":
                frames.append(("list", field))
        token = advance()
    return names


def check(settings: ModelSettings, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]) -> None:
    """Raises ConfigError, naming the tensor and what differs, unless the config's tensors match the graph's."""
    batch = 1 if settings.max_batch_size else 0
    for kind, declared, graph in (("input", settings.inputs, inputs), ("output", settings.outputs, outputs)):
        specs = {spec.name: spec for spec in graph}
        for tensor in declared:
            spec = specs.get(tensor.name)
            if spec is None:
                raise ConfigError(
                    f"config.pbtxt {kind} '{tensor.name}' is not an {kind} of model.onnx (its {kind}s: {list(specs)})"
                )
            datatype = mc.DataType.Name(tensor.data_type).removeprefix("TYPE_")
            if tensor.data_type and datatype != spec.datatype:
                raise ConfigError(
                    f"config.pbtxt {kind} '{tensor.name}' has data_type TYPE_{datatype}; model.onnx has {spec.datatype}"
                )
            dims = tuple(tensor.dims)
            graph_dims = spec.shape[batch:]
            mismatch = len(dims) != len(graph_dims) or any(
                d != g and -1 not in (d, g) for d, g in zip(dims, graph_dims, strict=False)
            )
            if dims and mismatch:
                raise ConfigError(
                    f"config.pbtxt {kind} '{tensor.name}' has dims {shape_text(dims)}; model.onnx has "
                    f"{shape_text(graph_dims)}" + (" after the batch axis" if batch else "")
                )
    if settings.max_batch_size and not all(spec.shape and spec.shape[0] == -1 for spec in (*inputs, *outputs)):
        raise ConfigError(
            f"config.pbtxt sets max_batch_size {settings.max_batch_size}, but model.onnx has no batch axis on every "
            "tensor; set max_batch_size: 0"
        )
