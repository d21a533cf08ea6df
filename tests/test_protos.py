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
    ("inference.ServerMetadataResponse", "parameters"),
    ("inference.ModelMetadataResponse", "parameters"),
    ("inference.ModelMetadataResponse.TensorMetadata", "parameters"),
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
    # protobuf names a map field's entry type after the field: parameters -> ParametersEntry.
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


def _v2_with_extensions():
    """Message types of the Open Inference Protocol with the parameters extensions as Seldon MLServer and KServe
    declare them (map<string, InferParameter> at ModelMetadataResponse 6 and TensorMetadata 4), built in a pool
    of their own."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    field = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="v2_extensions.proto", package="v2ext", syntax="proto3")
    parameter = proto.message_type.add(name="InferParameter")
    parameter.oneof_decl.add(name="parameter_choice")
    for number, (name, kind) in enumerate(
        [("bool_param", field.TYPE_BOOL), ("int64_param", field.TYPE_INT64), ("string_param", field.TYPE_STRING)], 1
    ):
        parameter.field.add(name=name, number=number, type=kind, label=field.LABEL_OPTIONAL, oneof_index=0)

    def scalar(message, name, number, kind, repeated=False):
        label = field.LABEL_REPEATED if repeated else field.LABEL_OPTIONAL
        message.field.add(name=name, number=number, type=kind, label=label)

    def parameters(message, path: str, number: int) -> None:
        entry = message.nested_type.add(name="ParametersEntry")
        entry.options.map_entry = True
        scalar(entry, "key", 1, field.TYPE_STRING)
        entry.field.add(
            name="value",
            number=2,
            type=field.TYPE_MESSAGE,
            label=field.LABEL_OPTIONAL,
            type_name=".v2ext.InferParameter",
        )
        message.field.add(
            name="parameters",
            number=number,
            type=field.TYPE_MESSAGE,
            label=field.LABEL_REPEATED,
            type_name=f".v2ext.{path}.ParametersEntry",
        )

    server = proto.message_type.add(name="ServerMetadataResponse")
    scalar(server, "name", 1, field.TYPE_STRING)
    scalar(server, "version", 2, field.TYPE_STRING)
    scalar(server, "extensions", 3, field.TYPE_STRING, repeated=True)
    model = proto.message_type.add(name="ModelMetadataResponse")
    tensor = model.nested_type.add(name="TensorMetadata")
    scalar(tensor, "name", 1, field.TYPE_STRING)
    scalar(tensor, "datatype", 2, field.TYPE_STRING)
    scalar(tensor, "shape", 3, field.TYPE_INT64, repeated=True)
    parameters(tensor, "ModelMetadataResponse.TensorMetadata", 4)
    scalar(model, "name", 1, field.TYPE_STRING)
    scalar(model, "versions", 2, field.TYPE_STRING, repeated=True)
    scalar(model, "platform", 3, field.TYPE_STRING)
    for name, number in (("inputs", 4), ("outputs", 5)):
        model.field.add(
            name=name,
            number=number,
            type=field.TYPE_MESSAGE,
            label=field.LABEL_REPEATED,
            type_name=".v2ext.ModelMetadataResponse.TensorMetadata",
        )
    parameters(model, "ModelMetadataResponse", 6)
    infer = proto.message_type.add(name="ModelInferResponse")
    output = infer.nested_type.add(name="InferOutputTensor")
    scalar(output, "name", 1, field.TYPE_STRING)
    scalar(output, "datatype", 2, field.TYPE_STRING)
    scalar(output, "shape", 3, field.TYPE_INT64, repeated=True)
    parameters(output, "ModelInferResponse.InferOutputTensor", 4)
    scalar(infer, "model_name", 1, field.TYPE_STRING)
    scalar(infer, "model_version", 2, field.TYPE_STRING)
    scalar(infer, "id", 3, field.TYPE_STRING)
    parameters(infer, "ModelInferResponse", 4)
    infer.field.add(
        name="outputs",
        number=5,
        type=field.TYPE_MESSAGE,
        label=field.LABEL_REPEATED,
        type_name=".v2ext.ModelInferResponse.InferOutputTensor",
    )
    scalar(infer, "raw_output_contents", 6, field.TYPE_BYTES, repeated=True)
    for name, flag in (
        ("ServerLiveResponse", "live"),
        ("ServerReadyResponse", "ready"),
        ("ModelReadyResponse", "ready"),
    ):
        scalar(proto.message_type.add(name=name), flag, 1, field.TYPE_BOOL)
    index = proto.message_type.add(name="RepositoryIndexResponse")
    entry = index.nested_type.add(name="ModelIndex")
    for number, name in enumerate(("name", "version", "state", "reason"), 1):
        scalar(entry, name, number, field.TYPE_STRING)
    index.field.add(
        name="models",
        number=1,
        type=field.TYPE_MESSAGE,
        label=field.LABEL_REPEATED,
        type_name=".v2ext.RepositoryIndexResponse.ModelIndex",
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return {m: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"v2ext.{m}")) for m in proto_names(proto)}


def proto_names(proto) -> list[str]:
    return [message.name for message in proto.message_type]


def test_every_answer_parses_with_the_v2_extensions_stubs_declare(server):
    import grpc
    import numpy as np
    from conftest import infer_request

    types = _v2_with_extensions()
    calls = {
        "ServerLive": (grpc_service_pb2.ServerLiveRequest(), "ServerLiveResponse"),
        "ServerReady": (grpc_service_pb2.ServerReadyRequest(), "ServerReadyResponse"),
        "ModelReady": (grpc_service_pb2.ModelReadyRequest(name="xor"), "ModelReadyResponse"),
        "ServerMetadata": (grpc_service_pb2.ServerMetadataRequest(), "ServerMetadataResponse"),
        "ModelMetadata": (grpc_service_pb2.ModelMetadataRequest(name="xor"), "ModelMetadataResponse"),
        "ModelInfer": (infer_request(np.zeros((3, 2), np.float32), request_id="r"), "ModelInferResponse"),
        "RepositoryIndex": (grpc_service_pb2.RepositoryIndexRequest(), "RepositoryIndexResponse"),
    }
    parsed = {}
    with grpc.insecure_channel(server.address) as channel:
        for rpc, (request, answer) in calls.items():
            call = channel.unary_unary(
                f"/inference.GRPCInferenceService/{rpc}", request_serializer=type(request).SerializeToString
            )
            parsed[rpc] = types[answer].FromString(call(request, timeout=10))  # raises if the wire types differ
    assert parsed["ModelMetadata"].parameters["providers"].string_param == "CPUExecutionProvider"
    assert parsed["ModelMetadata"].inputs[0].name == "input"
    assert parsed["ServerMetadata"].name == "xorserve"
    assert parsed["ModelInfer"].id == "r" and len(parsed["ModelInfer"].raw_output_contents) == 2
    assert [m.state for m in parsed["RepositoryIndex"].models] == ["READY"]
