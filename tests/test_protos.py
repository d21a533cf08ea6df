"""The committed gRPC modules match protos/, and our messages are wire-compatible with Triton's client."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from serving import protogen
from serving._proto import grpc_service_pb2, model_config_pb2

# Fields xorserve adds that Triton's definitions lack (numbers unused there, so Triton's client skips them).
EXTENSIONS = {
    ("inference.ServerMetadataResponse", "properties"),
    ("inference.ModelMetadataResponse", "properties"),
}

# Dumps every message's fields and every enum's values from tritonclient's generated modules.
# It runs in a subprocess: tritonclient registers the same `inference.*` names in protobuf's default pool.
_DUMP_TRITON = textwrap.dedent(
    """
    import json
    from tritonclient.grpc import model_config_pb2, service_pb2

    def walk(desc, out):
        out[desc.full_name] = {f.name: [f.number, f.type, f.is_repeated] for f in desc.fields}
        for nested in desc.nested_types:
            walk(nested, out)
        for enum in desc.enum_types:
            out[enum.full_name] = {v.name: v.number for v in enum.values}

    out = {}
    for module in (service_pb2, model_config_pb2):
        for message in module.DESCRIPTOR.message_types_by_name.values():
            walk(message, out)
        for enum in module.DESCRIPTOR.enum_types_by_name.values():
            out[enum.full_name] = {v.name: v.number for v in enum.values}
    service = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    out["rpc"] = {m.name: [m.input_type.full_name, m.output_type.full_name] for m in service.methods}
    print(json.dumps(out))
    """
)


def _ours() -> dict:
    def walk(desc, out):
        out[desc.full_name] = {f.name: [f.number, f.type, f.is_repeated] for f in desc.fields}
        for nested in desc.nested_types:
            walk(nested, out)
        for enum in desc.enum_types:
            out[enum.full_name] = {v.name: v.number for v in enum.values}

    out: dict = {}
    for module in (grpc_service_pb2, model_config_pb2):
        for message in module.DESCRIPTOR.message_types_by_name.values():
            walk(message, out)
        for enum in module.DESCRIPTOR.enum_types_by_name.values():
            out[enum.full_name] = {v.name: v.number for v in enum.values}
    service = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    out["rpc"] = {m.name: [m.input_type.full_name, m.output_type.full_name] for m in service.methods}
    return out


@pytest.fixture(scope="module")
def triton() -> dict:
    done = subprocess.run([sys.executable, "-c", _DUMP_TRITON], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def test_committed_modules_match_a_fresh_generation(tmp_path: Path):
    fresh = protogen.generate(tmp_path)
    committed = protogen.OUT
    assert sorted(p.name for p in fresh) == sorted(p.name for p in committed.iterdir() if p.is_file()), (
        "serving/_proto/ holds other files than protogen writes; run `make protos`"
    )
    for path in fresh:
        assert path.read_text() == (committed / path.name).read_text(), f"{path.name} drifted; run `make protos`"


def test_generated_modules_import_as_a_package():
    assert grpc_service_pb2.DESCRIPTOR.dependencies[0].name == model_config_pb2.DESCRIPTOR.name
    request = grpc_service_pb2.ModelConfigResponse(config=model_config_pb2.ModelConfig(max_batch_size=8))
    assert grpc_service_pb2.ModelConfigResponse.FromString(request.SerializeToString()).config.max_batch_size == 8


def test_every_rpc_has_tritons_request_and_response_types(triton: dict):
    ours = _ours()["rpc"]
    assert set(ours) >= {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer"}
    assert {"ModelStreamInfer", "ModelConfig"} <= set(ours)
    for rpc, types in ours.items():
        assert triton["rpc"][rpc] == types, rpc


def test_every_field_has_tritons_name_number_and_type(triton: dict):
    ours = _ours()
    del ours["rpc"]
    # protobuf names a map field's entry type after the field: properties -> PropertiesEntry.
    extension_entries = {f"{message}.{field.title().replace('_', '')}Entry" for message, field in EXTENSIONS}
    for name, fields in ours.items():
        if name in extension_entries:
            continue
        assert name in triton, f"{name} is not a Triton message or enum"
        theirs = triton[name]
        for field, spec in fields.items():
            if (name, field) in EXTENSIONS:
                numbers = {value[0] if isinstance(value, list) else value for value in theirs.values()}
                number = spec[0]
                assert number not in numbers, f"{name}.{field} reuses Triton's field number {number}"
                continue
            assert field in theirs, f"{name}.{field} is not in Triton's definition"
            assert theirs[field] == spec, f"{name}.{field}: ours {spec}, Triton's {theirs[field]}"
