"""Offline rendering and validation of the kvcluster Helm chart (helm/kvcluster).

Rendering and linting go through helm-python-sdk (Helm v4's Go SDK through a C ABI: no helm
binary, no cluster). Built-in kinds are validated with kubernetes-validate in strict mode; the
RayService and ServiceMonitor custom resources against the minimal schemas vendored beside this
file (see their $comment for where they come from).
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pytest

helm = pytest.importorskip("helm_python", reason="helm-python-sdk not installed (pip install '.[helm]')")

import jsonschema  # noqa: E402  (kubernetes-validate depends on it)
import kubernetes_validate  # noqa: E402
import yaml  # noqa: E402
from kubernetes_validate import utils as kv_utils  # noqa: E402
from referencing import Registry, Resource  # noqa: E402

HERE = Path(__file__).resolve().parent
CHART = HERE.parents[1] / "helm" / "kvcluster"
RELEASE = "kv"
NAMESPACE = "ml"
# Kubernetes versions the manifests are validated against: the oldest the chart supports
# (Chart.yaml kubeVersion >= 1.27 -> 1.29 here, a version still common in managed clusters) and a
# recent one whose schemas kubernetes-validate ships.
K8S_VERSIONS = ("1.29.0", "1.35.0")

CUSTOM_SCHEMAS = {
    ("ray.io/v1", "RayService"): HERE / "kuberay_rayservice_v1.schema.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): HERE / "servicemonitor_v1.schema.json",
}

helm.disable_logging()


@functools.lru_cache(maxsize=1)
def chart() -> Any:
    return helm.Chart.load(str(CHART))


def _freeze(values: dict | None) -> str:
    return json.dumps(values or {}, sort_keys=True)


@functools.lru_cache(maxsize=64)
def _render_cached(frozen: str) -> tuple[tuple[str, str], ...]:
    rendered = chart().render(json.loads(frozen), name=RELEASE, namespace=NAMESPACE, is_install=True)
    return tuple(sorted(rendered.items()))


def render_files(values: dict | None = None) -> dict[str, str]:
    """Template path -> rendered text (NOTES.txt included). Raises helm errors."""
    return dict(_render_cached(_freeze(values)))


def render(values: dict | None = None) -> list[dict]:
    """The rendered Kubernetes objects (NOTES.txt and empty documents left out)."""
    docs: list[dict] = []
    for path, text in render_files(values).items():
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.append(doc)
    return docs


def notes(values: dict | None = None) -> str:
    return next(t for p, t in render_files(values).items() if p.endswith("NOTES.txt"))


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[d['metadata']['name'] for d in found]}"
    return found[0]


# --- validation ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _k8s_validator(version: str, schema_file: str) -> jsonschema.protocols.Validator:
    """A strict validator for one schema file of kubernetes-validate (e.g. podtemplatespec-v1)."""
    base = f"kubernetes-json-schema/v{version}-local-strict"
    schema = kv_utils.schema_contents(f"{base}/{schema_file}.json", version)
    defs = kv_utils.schema_contents(f"{base}/_definitions.json", version)
    registry = Resource.from_contents(defs) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.validators.Draft202012Validator(schema, registry=registry)


def validate_pod_template(template: dict, version: str) -> None:
    """Full strict validation of a pod template embedded in a custom resource."""
    _k8s_validator(version, "podtemplatespec-v1").validate(template)


@functools.lru_cache(maxsize=None)
def _custom_validator(path: Path) -> jsonschema.protocols.Validator:
    schema = json.loads(path.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def validate(doc: dict) -> None:
    """Validate one rendered object: built-ins with kubernetes-validate (strict, every version in
    K8S_VERSIONS), custom resources with the vendored CRD schemas."""
    key = (doc["apiVersion"], doc["kind"])
    if key in CUSTOM_SCHEMAS:
        _custom_validator(CUSTOM_SCHEMAS[key]).validate(doc)
        if key == ("ray.io/v1", "RayService"):
            spec = doc["spec"]["rayClusterConfig"]
            templates = [spec["headGroupSpec"]["template"]]
            templates += [g["template"] for g in spec.get("workerGroupSpecs", [])]
            for version in K8S_VERSIONS:
                for template in templates:
                    validate_pod_template(template, version)
        return
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


def rayservice(docs: list[dict]) -> dict:
    return one(docs, "RayService")


def worker_group(docs: list[dict]) -> dict:
    groups = rayservice(docs)["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert len(groups) == 1
    return groups[0]


def container(template: dict) -> dict:
    containers = template["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def config_text(docs: list[dict]) -> str:
    return one(docs, "ConfigMap")["data"]["config.yaml"]


def env_of(template: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container(template)["env"]}
