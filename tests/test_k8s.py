"""deploy/k8s/, checked without a cluster (docs/kubernetes.md): every manifest against the Kubernetes OpenAPI
schemas of a pinned version (kubernetes-validate, strict: an unknown field fails), every command line and
variable against the commands themselves, the GPU overlay as kustomize would build it, and the server's
container run as the manifest runs it, probed as the kubelet would probe it, through a drain.

No kustomize binary here: `overlay` applies the overlay's strategic-merge patch with the rules that patch
uses (maps merge, containers merge by name, other lists are replaced), and the test checks that the
kustomizations name exactly the files it reads.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from manifests import KUBERNETES, NOT_SERVING, SERVING, free_port, probe, running, xorserve_command
from test_compose import parse_locust, parse_xorserve

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
MANIFESTS = sorted(path for path in K8S.glob("*.yaml") if path.name != "kustomization.yaml")


def documents() -> list[tuple[str, dict]]:
    return [(path.name, doc) for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def by_kind(kind: str) -> list[dict]:
    return [doc for _, doc in documents() if doc["kind"] == kind]


def server_deployment() -> dict:
    (deployment,) = [d for d in by_kind("Deployment") if d["metadata"]["name"] == "xorserve"]
    return deployment


def server_container(deployment: dict) -> dict:
    (container,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "server"]
    return container


@pytest.mark.parametrize(("where", "doc"), documents(), ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_every_manifest_is_valid_against_the_kubernetes_schemas_strictly(where, doc):
    kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_a_field_the_schema_does_not_know_fails_the_check():
    wrong = server_deployment()
    wrong["spec"]["template"]["spec"]["containers"][0]["argz"] = ["xorserve"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong, KUBERNETES, strict=True)


def containers() -> list[dict]:
    found = []
    for _, doc in documents():
        spec = doc.get("spec", {})
        pod = spec.get("template", {}).get("spec")
        if pod:
            found += pod.get("initContainers", []) + pod["containers"]
    return found


@pytest.mark.parametrize("container", containers(), ids=lambda c: c["name"])
def test_every_command_and_variable_is_one_the_command_takes(container):
    command = container.get("args") or container.get("command")
    if command[0] == "xorserve":
        xorserve_command(container)
    else:
        parse_locust(command)


@pytest.mark.parametrize("container", containers(), ids=lambda c: c["name"])
def test_every_container_runs_as_non_root_on_a_read_only_root_filesystem(container):
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["resources"]["requests"] and container["resources"]["limits"]


def test_the_model_the_init_container_trains_is_where_the_server_reads_it():
    pod = server_deployment()["spec"]["template"]["spec"]
    (train,) = pod["initContainers"]
    trained = parse_xorserve(train["command"])
    served = parse_xorserve(server_container(server_deployment())["args"])
    mounts = {m["name"]: m["mountPath"] for m in train["volumeMounts"]}
    server_mounts = {m["name"]: m for m in server_container(server_deployment())["volumeMounts"]}
    assert str(trained.out).startswith(mounts["models"] + "/")
    assert served.model_repository == Path(server_mounts["models"]["mountPath"])
    assert server_mounts["models"]["readOnly"] is True
    assert {v["name"]: v for v in pod["volumes"]}["models"]["emptyDir"] == {}


def test_the_service_autoscaler_and_budget_point_at_the_server():
    deployment = server_deployment()
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    container = server_container(deployment)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    served = parse_xorserve(container["args"])
    assert ports == {"grpc": served.port, "metrics": served.metrics_port}
    (service,) = [s for s in by_kind("Service") if s["metadata"]["name"] == "xorserve"]
    assert service["spec"]["selector"] == labels
    grpc_port = {p["name"]: p for p in service["spec"]["ports"]}["grpc"]
    assert grpc_port["targetPort"] == "grpc" and grpc_port["appProtocol"] == "kubernetes.io/h2c"
    (hpa,) = by_kind("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] >= 2
    (pdb,) = by_kind("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == labels
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]  # a node can still be drained


def test_the_kubelet_waits_for_the_drain_and_a_rolling_update_keeps_every_replica():
    deployment = server_deployment()
    served = parse_xorserve(server_container(deployment)["args"])
    assert served.drain_delay_s > 0  # the endpoints drop the pod while it still answers
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > served.grace_s
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    master = [j for j in by_kind("Job") if j["metadata"]["name"] == "xorserve-locust-master"][0]
    host = master["spec"]["template"]["spec"]["containers"][0]["command"]
    assert host[host.index("--host") + 1] == f"xorserve:{served.port}"


@pytest.mark.slow
def test_the_server_container_as_the_manifest_runs_it_passes_its_probes_and_drains(shipped_model_repository):
    """The container's args and env, with two substitutions that a test machine needs: the models volume's
    mount path becomes the shipped models/ folder, and the ports free ones. The probes are the kubelet's:
    grpc.health.v1 Check on the probe's port and service."""
    container = server_container(server_deployment())
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    port, metrics_port = free_port(), free_port()
    replace = {mounts["models"]: str(shipped_model_repository), "8001": str(port), "8002": str(metrics_port)}
    with running(container, replace) as process:
        probes = {name: container[name] for name in ("startupProbe", "readinessProbe", "livenessProbe")}
        for name, spec in probes.items():
            assert spec["grpc"]["port"] == 8001, name
            assert probe(port, spec["grpc"].get("service", "")) == SERVING, name
        process.send_signal(signal.SIGTERM)
        time.sleep(1.0)  # within --drain-delay-s: still answering, but not ready
        ready, live = probes["readinessProbe"]["grpc"].get("service", ""), probes["livenessProbe"]["grpc"]["service"]
        assert probe(port, ready) == NOT_SERVING
        assert probe(port, live) == SERVING  # a liveness probe must not restart a draining pod
        served = parse_xorserve(container["args"])
        assert process.wait(timeout=served.grace_s + 5) == 0


def strategic_merge(base, patch):
    """The strategic-merge rules the GPU patch relies on: maps merge key by key; a list of maps with `name`
    (containers) merges item by item by name; any other list is replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        return {**base, **{k: strategic_merge(base[k], v) if k in base else v for k, v in patch.items()}}
    if (
        isinstance(base, list)
        and isinstance(patch, list)
        and all(isinstance(i, dict) and "name" in i for i in base + patch)
    ):
        merged = {item["name"]: item for item in base}
        for item in patch:
            merged[item["name"]] = strategic_merge(merged[item["name"]], item) if item["name"] in merged else item
        return list(merged.values())
    return patch


def gpu_deployment() -> dict:
    base = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(base["resources"]) == sorted(path.name for path in MANIFESTS)
    overlay = yaml.safe_load((K8S / "gpu" / "kustomization.yaml").read_text())
    assert overlay["resources"] == [".."]
    (patch_file,) = [p["path"] for p in overlay["patches"]]
    patch = yaml.safe_load((K8S / "gpu" / patch_file).read_text())
    assert (patch["kind"], patch["metadata"]["name"]) == ("Deployment", "xorserve")
    return strategic_merge(server_deployment(), patch)


def test_the_gpu_overlay_asks_for_one_gpu_serves_with_cuda_and_differs_in_nothing_else():
    gpu, cpu = gpu_deployment(), server_deployment()
    kubernetes_validate.validate(gpu, KUBERNETES, strict=True)
    container = server_container(gpu)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["resources"]["limits"]["cpu"] == server_container(cpu)["resources"]["limits"]["cpu"]
    served, base_args = parse_xorserve(container["args"]), parse_xorserve(server_container(cpu)["args"])
    assert served.device == "cuda" and base_args.device == "cpu"
    assert {**vars(served), "device": "cpu"} == vars(base_args)  # the same flags otherwise
    assert container["readinessProbe"] == server_container(cpu)["readinessProbe"]  # kept by the merge
    assert gpu["spec"]["template"]["spec"]["initContainers"] == cpu["spec"]["template"]["spec"]["initContainers"]
