"""deploy/kserve/, checked without a cluster (docs/kubernetes.md, "KServe"): every document loaded strictly into
the KServe SDK's typed models and serialized back without loss, the runtime's container validated against the
pinned Kubernetes schemas, the InferenceService checked against the runtime as KServe's controller matches
them, and the container run as the runtime runs it: probed, asked one inference, drained.

The loader: a document's apiVersion and kind name its root model (`kserve.models.V1alpha1ServingRuntime`,
`V1beta1InferenceService`); each model's `attribute_map` names the keys it takes and `openapi_types` their
types: another model (looked up in `kserve.models`, then `kubernetes.client.models`), 'list[X]',
'dict(str, X)' (or the typing spellings of the Kubernetes client), a primitive, or 'object'. A key no model
knows, a value of the wrong type or a model's own refusal fails with the key's path
(`spec.containers[0].imagePullPolicyy`).
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import re
import signal
import sys
from pathlib import Path

import grpc
import kubernetes.client.models
import kubernetes_validate
import numpy as np
import pytest
import yaml
from conftest import infer_request, outputs_of
from manifests import KUBERNETES, SERVING, free_port, probe, running, xorserve_command

from serving._proto import grpc_service_pb2_grpc


def _kserve_openapi():
    """The KServe SDK's generated OpenAPI half (kserve.models, kserve.api_client), imported without running
    kserve/__init__.py: that imports KServe's model server, whose compiled Open Inference Protocol messages
    (inference.* from grpc_predict_v2.proto) cannot share the default protobuf pool with serving._proto's (the
    same names from grpc_service.proto). The package is registered unexecuted; its generated half imports
    nothing else of it."""
    if "kserve" not in sys.modules:
        sys.modules["kserve"] = importlib.util.module_from_spec(importlib.util.find_spec("kserve"))
    return importlib.import_module("kserve.models"), importlib.import_module("kserve.api_client")


kserve_models, kserve_api_client = _kserve_openapi()
ROOT = Path(__file__).resolve().parent.parent
KSERVE = ROOT / "deploy" / "kserve"
MANIFESTS = sorted(KSERVE.glob("*.yaml"))
MODEL_DIR = "/mnt/models"  # where KServe's storage initializer puts the storageUri's contents
CONTAINER = "kserve-container"  # the container KServe merges the predictor into and mounts MODEL_DIR in
PROTOCOLS = {"v1", "v2", "grpc-v1", "grpc-v2"}  # KServe's InferenceServiceProtocol values
ISVC_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")  # KServe's webhook refuses other names
ROOT_MODELS = {
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "V1alpha1ServingRuntime",
    ("serving.kserve.io/v1beta1", "InferenceService"): "V1beta1InferenceService",
}


class ManifestError(Exception):
    """A document the typed models do not take as it is; the message starts with the offending key's path."""


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _model_class(name: str):
    for module in (kserve_models, kubernetes.client.models):
        cls = getattr(module, name, None)
        if cls is not None and hasattr(cls, "attribute_map"):
            return cls
    return None


def _primitive_ok(value, type_name: str) -> bool:
    if type_name == "object":
        return True
    if type_name == "bool":
        return isinstance(value, bool)
    if type_name == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if type_name == "float":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, str)  # str, and datetime / date as the API writes them


def typed(value, type_name: str, path: str = ""):
    """`value` (parsed YAML) as an instance of the SDK type `type_name`; ManifestError naming `path` otherwise."""
    where = path or "<document>"
    if match := re.fullmatch(r"(?:list|List)\[(.+)\]", type_name):
        if not isinstance(value, list):
            raise ManifestError(f"{where}: expected a list ({type_name}), got {type(value).__name__} {value!r}")
        return [typed(item, match[1], f"{path}[{i}]") for i, item in enumerate(value)]
    if match := re.fullmatch(r"dict\(str, (.+)\)|Dict\[str, (.+)\]", type_name):
        if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
            raise ManifestError(f"{where}: expected a mapping ({type_name}), got {type(value).__name__} {value!r}")
        return {key: typed(item, match[1] or match[2], _join(path, key)) for key, item in value.items()}
    if type_name in ("str", "int", "bool", "float", "object", "datetime", "date"):
        if not _primitive_ok(value, type_name):
            raise ManifestError(f"{where}: expected {type_name}, got {type(value).__name__} {value!r}")
        return value
    cls = _model_class(type_name)
    if cls is None:
        raise ManifestError(f"{where}: no model {type_name} in kserve.models or kubernetes.client.models")
    if not isinstance(value, dict):
        raise ManifestError(f"{where}: expected a {type_name} mapping, got {type(value).__name__} {value!r}")
    attributes = {key: attribute for attribute, key in cls.attribute_map.items()}
    for key in value:
        if key not in attributes:
            raise ManifestError(f"{_join(path, key)}: unknown field; {type_name} takes {', '.join(sorted(attributes))}")
    fields = {
        attributes[key]: typed(item, cls.openapi_types[attributes[key]], _join(path, key))
        for key, item in value.items()
    }
    try:
        return cls(**fields)
    except (TypeError, ValueError) as exc:  # a required field missing; pydantic's ValidationError is a ValueError
        raise ManifestError(f"{where}: {type_name} refused it: {exc}") from None


def load(document: dict):
    key = (document.get("apiVersion"), document.get("kind"))
    if key not in ROOT_MODELS:
        raise ManifestError(f"<document>: apiVersion/kind {key} is none of {sorted(ROOT_MODELS)}")
    return typed(document, ROOT_MODELS[key])


def documents() -> list[tuple[str, dict]]:
    return [(path.name, doc) for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def the(kind: str) -> dict:
    (found,) = [doc for _, doc in documents() if doc["kind"] == kind]
    return copy.deepcopy(found)


def runtime_container(runtime: dict) -> dict:
    (container,) = [c for c in runtime["spec"]["containers"] if c["name"] == CONTAINER]
    return container


def zero_values_added(serialized, document, path: str = "") -> list[str]:
    """Compares the SDK's serialization of a loaded document with the document: every key and value must come back
    as it was (same type too), or the assertion names what was lost or changed. Keys the document lacks may come
    back only holding Go's zero values ('', 0, False), which the SDK's constructors give fields KServe's Go types
    declare without omitempty (and which KServe writes the same way); returns their paths."""
    if isinstance(document, dict):
        assert isinstance(serialized, dict), f"{path}: a mapping came back as {serialized!r}"
        lost = [key for key in document if key not in serialized]
        assert not lost, f"{path or '<document>'}: lost {lost}"
        added = []
        for key, value in serialized.items():
            if key in document:
                added += zero_values_added(value, document[key], _join(path, key))
            else:
                assert isinstance(value, str | int | bool) and not value, f"{_join(path, key)}: added {value!r}"
                added.append(_join(path, key))
        return added
    if isinstance(document, list):
        assert isinstance(serialized, list) and len(serialized) == len(document), f"{path}: {serialized!r}"
        return [
            p
            for i, (s, d) in enumerate(zip(serialized, document, strict=True))
            for p in zero_values_added(s, d, f"{path}[{i}]")
        ]
    assert type(serialized) is type(document) and serialized == document, (
        f"{path}: {document!r} came back {serialized!r}"
    )
    return []


# What the SDK adds to each kind: V1beta1ModelSpec.name defaults to '' (Go's `Name string` of the container it
# embeds); KServe refuses a non-empty one in predictor.model, and '' is what an omitted name is in Go.
ZERO_VALUES_ADDED = {"ServingRuntime": [], "InferenceService": ["spec.predictor.model.name"]}


@pytest.mark.parametrize(("where", "doc"), documents(), ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_every_document_loads_into_the_kserve_models_without_loss(where, doc):
    serialized = kserve_api_client.ApiClient().sanitize_for_serialization(load(doc))
    assert zero_values_added(serialized, doc) == ZERO_VALUES_ADDED[doc["kind"]]


@pytest.mark.parametrize(
    ("serialized", "document"),
    [
        ({"a": {"b": 1}}, {"a": {"b": 1, "c": "x"}}),  # a key lost
        ({"a": [1, 2]}, {"a": [1, 2, 3]}),  # an item lost
        ({"a": "1"}, {"a": 1}),  # a type changed
        ({"a": True}, {"a": 1}),  # bool is no int here
        ({"a": 1, "b": "set"}, {"a": 1}),  # a key added that is no zero value
    ],
)
def test_the_round_trip_comparison_fails_on_a_loss_or_a_change(serialized, document):
    with pytest.raises(AssertionError):
        zero_values_added(serialized, document)


def test_deploy_kserve_holds_one_runtime_and_one_inference_service():
    assert sorted(doc["kind"] for _, doc in documents()) == ["InferenceService", "ServingRuntime"]


# (document kind, a key's path, a value for it): each a mistake the loader must name by its path
BROKEN = [
    ("ServingRuntime", "spec.containers[0].imagePullPolicyy", "IfNotPresent"),  # a typo: unknown field
    ("ServingRuntime", "spec.containers[0].readinessProbe.grpc.servce", "liveness"),  # deep in a Kubernetes model
    ("ServingRuntime", "spec.supportedModelFormats[0].autoselect", True),  # KServe's own model, wrong case
    ("ServingRuntime", "spec.containers[0].args", "xorserve serve --model-repository /mnt/models"),  # str for list
    ("ServingRuntime", "spec.protocolVersions", "grpc-v2"),  # str for list[str]
    ("ServingRuntime", "spec.containers[0].ports[0].containerPort", "8001"),  # str for int
    ("ServingRuntime", "spec.supportedModelFormats[0].autoSelect", "true"),  # str for bool
    ("ServingRuntime", "spec.supportedModelFormats[0].version", 1),  # int for str
    ("ServingRuntime", "spec.containers[0].resources.limits", ["cpu", "2"]),  # list for dict(str, str)
    ("InferenceService", "spec.predictor.model.storageURI", "gs://YOUR-BUCKET/xorserve/models"),
    ("InferenceService", "spec.predictor.minReplicas", "2"),
    ("InferenceService", "spec.predictor.model.modelFormat", "onnx"),  # str for a model
    ("InferenceService", "spec.predictorr", {}),
]


def set_path(document: dict, path: str, value) -> None:
    *parents, last = re.findall(r"[^.\[\]]+|\[\d+\]", path)
    node = document
    for part in parents:
        node = node[int(part[1:-1])] if part.startswith("[") else node[part]
    node[last] = value


@pytest.mark.parametrize(("kind", "path", "value"), BROKEN, ids=[f"{k}:{p}" for k, p, _ in BROKEN])
def test_the_loader_refuses_an_unknown_field_or_a_wrong_type_naming_its_path(kind, path, value):
    document = the(kind)
    load(document)  # as shipped: fine
    set_path(document, path, value)
    with pytest.raises(ManifestError, match=rf"^{re.escape(path)}: "):
        load(document)


def test_the_loader_refuses_a_missing_required_field_and_an_unknown_kind():
    runtime = the("ServingRuntime")
    del runtime_container(runtime)["name"]
    with pytest.raises(ManifestError, match=r"^spec\.containers\[0\]: V1Container refused it"):
        load(runtime)
    service = the("InferenceService")
    del service["spec"]["predictor"]["model"]["modelFormat"]
    with pytest.raises(ManifestError, match=r"^spec\.predictor\.model: V1beta1ModelSpec refused it"):
        load(service)
    with pytest.raises(ManifestError, match="apiVersion/kind"):
        load({**the("ServingRuntime"), "kind": "ClusterServingRuntimes"})


def runtime_pod(runtime: dict, service: dict) -> dict:
    """A Pod of the runtime's containers and volumes, with the predictor's pod-level field used here: what the
    Kubernetes API will be asked to run, less what KServe adds (the storage initializer and its volume)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": service["metadata"]["name"]},
        "spec": {
            "containers": runtime["spec"]["containers"],
            "volumes": runtime["spec"].get("volumes", []),
            "terminationGracePeriodSeconds": service["spec"]["predictor"]["terminationGracePeriodSeconds"],
        },
    }


def test_the_runtime_pod_is_valid_against_the_kubernetes_schemas_strictly():
    kubernetes_validate.validate(runtime_pod(the("ServingRuntime"), the("InferenceService")), KUBERNETES, strict=True)


def test_a_probe_field_newer_than_the_pinned_kubernetes_fails_there_though_the_sdk_takes_it():
    """The SDK's Kubernetes models are those of the newest API (client 37); the cluster's may be older."""
    runtime = the("ServingRuntime")
    runtime_container(runtime)["readinessProbe"]["grpc"]["mode"] = "TLS"
    load(runtime)
    with pytest.raises(kubernetes_validate.ValidationError, match="mode"):
        kubernetes_validate.validate(runtime_pod(runtime, the("InferenceService")), KUBERNETES, strict=True)


def test_the_inference_service_gets_this_runtime_as_kserve_matches_them():
    runtime, service = the("ServingRuntime"), the("InferenceService")
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    # KServe's labels: mt:NAME, and mt:NAME:VERSION where the runtime gives a version (autoSelect matters only
    # when the InferenceService names no runtime).
    supported = set()
    for fmt in runtime["spec"]["supportedModelFormats"]:
        supported |= {f"mt:{fmt['name']}"} | ({f"mt:{fmt['name']}:{fmt['version']}"} if "version" in fmt else set())
    wanted = model["modelFormat"]
    assert f"mt:{wanted['name']}" + (f":{wanted['version']}" if "version" in wanted else "") in supported
    assert all(fmt["autoSelect"] for fmt in runtime["spec"]["supportedModelFormats"])
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    assert runtime["spec"]["protocolVersions"] == ["grpc-v2"]  # no REST endpoint: never v1 or v2
    assert set(runtime["spec"]["protocolVersions"]) | {model["protocolVersion"]} <= PROTOCOLS


def test_the_runtime_serves_the_storage_initializers_folder_on_a_first_port_named_h2c():
    runtime = the("ServingRuntime")
    container = runtime_container(runtime)
    served = xorserve_command(container)  # every flag, variable and value one `xorserve serve` takes
    assert container["args"][:2] == ["xorserve", "serve"]
    assert served.model_repository == Path(MODEL_DIR) and served.host == "0.0.0.0"
    first, *others = container["ports"]
    assert (first["name"], first["containerPort"]) == ("h2c", served.port)  # KServe's Service: port 80 -> first
    assert {p["name"]: p["containerPort"] for p in others} == {"metrics": served.metrics_port}
    assert all(p["protocol"] == "TCP" for p in container["ports"])
    annotations = runtime["spec"]["annotations"]
    assert annotations["prometheus.kserve.io/port"] == str(served.metrics_port)
    assert annotations["prometheus.kserve.io/path"] == "/metrics"
    mounts = container.get("volumeMounts", [])
    assert MODEL_DIR not in {m["mountPath"] for m in mounts}  # KServe mounts it; a second mount would clash
    assert {m["name"] for m in mounts} <= {v["name"] for v in runtime["spec"].get("volumes", [])}


def test_the_runtime_probes_over_grpc_health_and_runs_as_non_root_on_a_read_only_root_filesystem():
    container = runtime_container(the("ServingRuntime"))
    served = xorserve_command(container)
    for name in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[name]["grpc"]["port"] == served.port, name
    assert container["readinessProbe"]["grpc"].get("service", "") == ""
    assert container["livenessProbe"]["grpc"]["service"] == "liveness"  # stays SERVING through a drain
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] != 0
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["requests"] and container["resources"]["limits"]


def test_the_inference_service_waits_for_the_drain_and_scales_as_a_raw_deployment(shipped_model_repository):
    service, runtime = the("InferenceService"), the("ServingRuntime")
    predictor = service["spec"]["predictor"]
    served = xorserve_command(runtime_container(runtime))
    assert 0 < served.drain_delay_s < served.grace_s < predictor["terminationGracePeriodSeconds"]
    assert 2 <= predictor["minReplicas"] <= predictor["maxReplicas"]
    assert service["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    # Recent KServe validates these as Knative (KPA) settings unless the annotation reads Standard.
    assert not {"scaleMetric", "scaleTarget", "deploymentStrategy", "autoScaling"} & set(predictor)
    # Clients send the InferenceService's name as the model's: it must be the model's folder in the repository.
    name = service["metadata"]["name"]
    assert ISVC_NAME.fullmatch(name)
    assert (shipped_model_repository / name / "1" / "model.onnx").is_file()
    uri = predictor["model"]["storageUri"]
    assert re.fullmatch(r"(gs|s3|pvc|https?|hdfs|webhdfs)://\S+", uri)
    assert not uri.rstrip("/").endswith(f"/{name}")  # the repository holding the model's folder, not the folder


@pytest.mark.slow
def test_the_runtime_container_passes_its_probes_answers_xor_and_drains(shipped_model_repository):
    """The container's args and env, with the model folder replaced by the shipped repository and the ports by
    free ones; probed as the kubelet probes; one ModelInfer to the InferenceService's name; then SIGTERM."""
    container = runtime_container(the("ServingRuntime"))
    name = the("InferenceService")["metadata"]["name"]
    port, metrics_port = free_port(), free_port()
    replace = {MODEL_DIR: str(shipped_model_repository), "8001": str(port), "8002": str(metrics_port)}
    with running(container, replace) as process:
        for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert probe(port, container[probe_name]["grpc"].get("service", "")) == SERVING, probe_name
        corners = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float32)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            response = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                infer_request(corners, model=name), timeout=10
            )
        assert response.model_name == name
        labels = (outputs_of(response)["probability"][:, 0] > 0.5).astype(int)
        assert labels.tolist() == [0, 1, 1, 0]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=xorserve_command(container).grace_s + 5) == 0
