"""deploy/k8s and deploy/ray: every manifest passes its schema offline (Kubernetes' own for the core kinds,
the vendored CRD schemas under deploy/crds for RayService and InferenceService, Serve's own for the Serve
config), unknown keys fail as `kubectl apply --validate=strict` fails them, and the manifests keep the
promises the compose file makes (hardening, GPU, health checks)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
CRDS = ROOT / "deploy" / "crds"
#: The Kubernetes release whose schemas the core kinds are checked against (kubernetes-validate's latest).
KUBERNETES = "1.37.0"
CRD_FILES = {"RayService": "ray.io_rayservices.yaml",
             "InferenceService": "serving.kserve.io_inferenceservices.yaml"}


def documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def every_document() -> list[dict[str, Any]]:
    return [d for path in sorted(K8S.glob("*.yaml")) for d in documents(path.name)]


def kubernetes_validate() -> Any:
    return pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """A CRD's openAPIV3Schema as JSON Schema that refuses unknown keys, as the API server's strict field
    validation does: `additionalProperties: false` wherever properties are listed and unknown fields are
    not preserved."""
    schema = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
                node.setdefault("additionalProperties", False)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def crd_schema(kind: str) -> dict[str, Any]:
    crd = yaml.safe_load((CRDS / CRD_FILES[kind]).read_text())
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == kind
    return strict(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])


def validate_custom(document: dict[str, Any]) -> None:
    crd = yaml.safe_load((CRDS / CRD_FILES[document["kind"]]).read_text())
    group, version = document["apiVersion"].split("/")
    assert group == crd["spec"]["group"] and version in [v["name"] for v in crd["spec"]["versions"]]
    jsonschema.validate(document, crd_schema(document["kind"]))


def pod_templates(document: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every pod template of a manifest, as `{"metadata", "spec"}`."""
    spec = document["spec"]
    if document["kind"] == "Deployment":
        yield spec["template"]
    elif document["kind"] == "RayService":
        cluster = spec["rayClusterConfig"]
        yield cluster["headGroupSpec"]["template"]
        yield from (group["template"] for group in cluster["workerGroupSpecs"])
    elif document["kind"] == "InferenceService":
        predictor = spec["predictor"]
        yield {"spec": {"containers": predictor["containers"], "volumes": predictor["volumes"]}}


@pytest.mark.parametrize("kind", ["Deployment", "Service", "HorizontalPodAutoscaler"])
def test_core_kinds_pass_kubernetes_schema_strictly(kind: str) -> None:
    kv = kubernetes_validate()
    found = [d for d in every_document() if d["kind"] == kind]
    assert found, kind
    for document in found:
        kv.validate(document, KUBERNETES, strict=True)


def test_strict_kubernetes_validation_refuses_a_misspelt_key() -> None:
    kv = kubernetes_validate()
    deployment = next(d for d in every_document() if d["kind"] == "Deployment")
    broken = copy.deepcopy(deployment)
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["readynessProbe"] = container.pop("readinessProbe")
    with pytest.raises(kv.ValidationError, match="readynessProbe"):
        kv.validate(broken, KUBERNETES, strict=True)


@pytest.mark.parametrize("kind", sorted(CRD_FILES))
def test_custom_resources_pass_their_vendored_crd_schema(kind: str) -> None:
    found = [d for d in every_document() if d["kind"] == kind]
    assert len(found) == 1
    validate_custom(found[0])


@pytest.mark.parametrize(("kind", "path", "key"), [
    ("RayService", ("spec", "rayClusterConfig", "workerGroupSpecs", 0), "maxReplica"),
    ("RayService", ("spec",), "serveConfig"),
    ("InferenceService", ("spec", "predictor"), "minReplica"),
], ids=["worker-group", "rayservice-spec", "predictor"])
def test_vendored_crd_schema_refuses_a_misspelt_key(kind: str, path: tuple[Any, ...], key: str) -> None:
    document = copy.deepcopy(next(d for d in every_document() if d["kind"] == kind))
    node: Any = document
    for step in path:
        node = node[step]
    node[key] = 1
    with pytest.raises(jsonschema.ValidationError, match=key):
        validate_custom(document)


@pytest.mark.parametrize("kind", sorted(CRD_FILES))
def test_pod_templates_of_custom_resources_pass_kubernetes_schema(kind: str) -> None:
    kv = kubernetes_validate()
    document = next(d for d in every_document() if d["kind"] == kind)
    for template in pod_templates(document):
        kv.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"},
                     "template": template}, KUBERNETES, strict=True)


def serving_containers(document: dict[str, Any]) -> list[dict[str, Any]]:
    """The containers that serve or hold GPU work (a RayService's head does neither)."""
    templates = list(pod_templates(document))
    if document["kind"] == "RayService":
        templates = templates[1:]
    return [c for t in templates for c in t["spec"]["containers"]]


@pytest.mark.parametrize("kind", ["Deployment", "RayService", "InferenceService"])
def test_every_pod_is_hardened_like_the_compose_service(kind: str) -> None:
    document = next(d for d in every_document() if d["kind"] == kind)
    for template in pod_templates(document):
        pod = template["spec"]
        mounts = [m for c in pod["containers"] for m in c.get("volumeMounts", [])]
        tmp = {m["name"] for m in mounts if m["mountPath"] == "/tmp"}
        assert tmp and all("emptyDir" in v for v in pod["volumes"] if v["name"] in tmp)
        for container in pod["containers"]:
            context = {**pod.get("securityContext", {}), **container["securityContext"]}
            assert context["runAsNonRoot"] is True and context["runAsUser"] == 10001
            assert context["readOnlyRootFilesystem"] is True
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"] and "add" not in context["capabilities"]
            assert context["seccompProfile"]["type"] == "RuntimeDefault"


@pytest.mark.parametrize("kind", ["Deployment", "RayService", "InferenceService"])
def test_serving_pods_ask_for_one_gpu(kind: str) -> None:
    document = next(d for d in every_document() if d["kind"] == kind)
    containers = serving_containers(document)
    assert containers
    for container in containers:
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


@pytest.mark.parametrize("kind", ["Deployment", "InferenceService"])
def test_probes_ask_for_liveness_and_readiness(kind: str) -> None:
    document = next(d for d in every_document() if d["kind"] == kind)
    (container,) = serving_containers(document)
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"


def test_service_and_autoscaler_point_at_the_deployment() -> None:
    docs = {d["kind"]: d for d in documents("deployment.yaml")}
    deployment, service, hpa = docs["Deployment"], docs["Service"], docs["HorizontalPodAutoscaler"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    ports = {p["name"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert service["spec"]["ports"][0]["targetPort"] in ports
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert hpa["spec"]["minReplicas"] >= 1 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]


def test_inference_service_declares_open_inference_protocol_v2() -> None:
    (document,) = documents("inferenceservice.yaml")
    (container,) = document["spec"]["predictor"]["containers"]
    assert container["name"] == "kserve-container"
    assert {"name": "PROTOCOL", "value": "v2"} in container["env"]
    port = container["ports"][0]["containerPort"]
    assert container["readinessProbe"]["httpGet"]["port"] == port == 8000


def test_rayservice_carries_the_serve_config_applications() -> None:
    (document,) = documents("rayservice.yaml")
    config = yaml.safe_load((ROOT / "deploy" / "ray" / "serve_config.yaml").read_text())
    assert yaml.safe_load(document["spec"]["serveConfigV2"])["applications"] == config["applications"]


def test_serve_config_passes_serves_schema_and_names_the_apps_deployment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("ray")
    import importlib

    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((ROOT / "deploy" / "ray" / "serve_config.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    (application,) = config["applications"]
    module_name, attribute = application["import_path"].split(":")
    monkeypatch.syspath_prepend(str(ROOT))
    module = importlib.import_module(module_name)
    assert isinstance(getattr(module, attribute), serve.Application)
    assert [d["name"] for d in application["deployments"]] == [module.Segmenter.name]
    gpus = application["deployments"][0]["ray_actor_options"]["num_gpus"]
    assert gpus == 1 and application["runtime_env"]["env_vars"]["WBC_DEVICE"] == "cuda"
