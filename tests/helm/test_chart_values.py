"""Bad values fail at install time with a message that names the key."""
from __future__ import annotations

import pytest

from . import chart as C

# (values, substrings the error must contain). Schema errors come from values.schema.json
# (draft-07) as Helm reports them: "at '/json/pointer': <what is wrong>".
SCHEMA_ERRORS = {
    "negative-replicas": ({"rayService": {"worker": {"replicas": -1}}},
                          ["at '/rayService/worker/replicas'", "minimum: got -1, want 0"]),
    "negative-maxReplicas": ({"rayService": {"worker": {"maxReplicas": -3}}},
                             ["at '/rayService/worker/maxReplicas'", "minimum"]),
    "negative-gpus": ({"rayService": {"worker": {"gpus": -1}}}, ["at '/rayService/worker/gpus'", "minimum"]),
    "unknown-config-key": ({"config": {"reuse": {"recompute_raito": 0.2}}},
                           ["at '/config/reuse'", "additional properties 'recompute_raito' not allowed"]),
    "unknown-config-section": ({"config": {"scheduler": {"mode": "x"}}},
                               ["at '/config'", "additional properties 'scheduler' not allowed"]),
    "unknown-top-level-key": ({"replicaCount": 3}, ["additional properties 'replicaCount' not allowed"]),
    "unknown-worker-key": ({"rayService": {"worker": {"gpu": 2}}},
                           ["at '/rayService/worker'", "additional properties 'gpu' not allowed"]),
    "unknown-redis-key": ({"redis": {"maxMemory": "1gb"}}, ["at '/redis'", "additional properties 'maxMemory' not allowed"]),
    "missing-model-name": ({"config": {"model": {"name": None}}}, ["at '/config/model'", "missing property 'name'"]),
    "empty-model-name": ({"config": {"model": {"name": ""}}}, ["at '/config/model/name'", "minLength"]),
    "gpus-wrong-type": ({"rayService": {"worker": {"gpus": "two"}}},
                        ["at '/rayService/worker/gpus'", "got string, want integer"]),
    "replicas-wrong-type": ({"rayService": {"worker": {"replicas": 1.5}}},
                            ["at '/rayService/worker/replicas'", "want integer"]),
    "autoscaling-wrong-type": ({"autoscaling": {"enabled": "yes"}}, ["at '/autoscaling/enabled'", "want boolean"]),
    "recompute-ratio-range": ({"config": {"reuse": {"recompute_ratio": 1.5}}},
                              ["at '/config/reuse/recompute_ratio'", "maximum"]),
    "reuse-mode-enum": ({"config": {"reuse": {"mode": "magic"}}}, ["at '/config/reuse/mode'", "value must be one of 'full', 'prefix', 'naive', 'cacheblend', 'epic', 'dhd'"]),
    "api-keys-not-in-config": ({"config": {"serve": {"api_keys": {"k": "t"}}}},
                               ["at '/config/serve'", "additional properties 'api_keys' not allowed"]),
    "chart-owned-url": ({"config": {"index": {"qdrant_url": "http://x:6333"}}},
                        ["at '/config/index'", "additional properties 'qdrant_url' not allowed"]),
    "api-key-tenant-type": ({"apiKeys": {"keys": {"sk-1": 7}}}, ["at '/apiKeys/keys/sk-1'", "want string"]),
    "maxmemory-policy-enum": ({"redis": {"maxmemoryPolicy": "lru"}}, ["at '/redis/maxmemoryPolicy'", "value must be one of"]),
    "maxmemory-format": ({"redis": {"maxmemory": "lots"}}, ["at '/redis/maxmemory'", "does not match pattern"]),
    "qdrant-off-without-url": ({"qdrant": {"enabled": False}}, ["at '/qdrant/externalUrl'", "minLength"]),
    "redis-url-scheme": ({"redis": {"enabled": False, "externalUrl": "http://redis:6379"}},
                         ["at '/redis/externalUrl'", "does not match pattern"]),
    "import-path-format": ({"rayService": {"serve": {"importPath": "kvcluster.serve_app"}}},
                           ["at '/rayService/serve/importPath'", "does not match pattern"]),
    "service-type": ({"service": {"type": "Ingress"}}, ["at '/service/type'", "value must be one of"]),
    "port-range": ({"service": {"port": 70000}}, ["at '/service/port'", "maximum"]),
}

# Cross-field rules JSON schema cannot state; the templates `fail` with these messages.
TEMPLATE_ERRORS = {
    "min-above-max": ({"rayService": {"worker": {"replicas": 5, "minReplicas": 5, "maxReplicas": 2}}},
                      ["rayService.worker.minReplicas (5) must not exceed rayService.worker.maxReplicas (2)"]),
    "replicas-out-of-bounds": ({"rayService": {"worker": {"replicas": 9, "minReplicas": 1, "maxReplicas": 4}}},
                               ["rayService.worker.replicas (9) must lie between minReplicas (1) and maxReplicas (4)"]),
}


@pytest.mark.parametrize("case", list(SCHEMA_ERRORS))
def test_schema_rejects(case: str) -> None:
    values, expected = SCHEMA_ERRORS[case]
    # validate_schema is the check `helm install/upgrade/template` runs before rendering ...
    with pytest.raises(C.helm.HelmValuesError) as err:
        C.chart().validate_schema(values)
    for text in expected:
        assert text in str(err.value), str(err.value)
    # ... and render refuses the values too
    with pytest.raises(C.helm.HelmValuesError) as err:
        C.chart().render(values, name=C.RELEASE, namespace=C.NAMESPACE)
    assert "values don't meet the specifications of the schema" in str(err.value)
    for text in expected:
        assert text in str(err.value), str(err.value)


@pytest.mark.parametrize("case", list(TEMPLATE_ERRORS))
def test_template_rejects(case: str) -> None:
    values, expected = TEMPLATE_ERRORS[case]
    C.chart().validate_schema(values)  # each value alone is fine
    with pytest.raises(C.helm.HelmError) as err:
        C.chart().render(values, name=C.RELEASE, namespace=C.NAMESPACE)
    for text in expected:
        assert text in str(err.value), str(err.value)


def test_lint_reports_schema_errors() -> None:
    report = C.helm.lint(str(C.CHART), {"rayService": {"worker": {"replicas": -1}}}, strict=True)
    assert any("/rayService/worker/replicas" in m["error"] and m["severity"] == 3 for m in report["messages"]), report


def test_set_strings_are_checked_too() -> None:
    """`helm install --set rayService.worker.gpus=eight` arrives as a string and is refused."""
    values = C.helm.parse_set_string("rayService.worker.gpus=eight")
    with pytest.raises(C.helm.HelmValuesError, match="got string, want integer"):
        C.chart().validate_schema(values)
    values = C.helm.parse_set_string("rayService.worker.gpus=8,rayService.worker.replicas=2,rayService.worker.maxReplicas=2,"
                                     "rayService.worker.minReplicas=2")
    C.chart().validate_schema(values)
    assert C.worker_group(C.render(values))["rayStartParams"]["num-gpus"] == "8"


def _schema_paths(schema: dict, prefix: tuple = ()) -> set[tuple]:
    paths = set()
    for key, sub in schema.get("properties", {}).items():
        paths.add(prefix + (key,))
        paths |= _schema_paths(sub, prefix + (key,))
    return paths


def test_values_yaml_documents_every_key() -> None:
    """Each key of values.yaml that the schema knows has a comment right above it (or its
    section has one), and the schema knows every key values.yaml sets."""
    import re

    known = _schema_paths(C.chart().schema)
    lines = (C.CHART / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, str]] = []
    undocumented, unknown = [], []
    for i, line in enumerate(lines):
        m = re.match(r"^( *)([A-Za-z_][\w.-]*):", line)
        if not m or line.lstrip().startswith("#"):
            continue
        indent, key = len(m.group(1)), m.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = tuple(k for _, k in stack) + (key,)
        stack.append((indent, key))
        if any(path[:k] in known and not _schema_paths(_sub(C.chart().schema, path[:k]))
               for k in range(1, len(path))):
            continue  # inside a free-form default (resources, probes, ...)
        if path not in known:
            unknown.append(".".join(path))
            continue
        prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        if not prev.lstrip().startswith("#") and not line.rstrip().endswith(":"):
            undocumented.append(".".join(path))
    assert unknown == [], f"values.yaml keys missing from values.schema.json: {unknown}"
    assert undocumented == [], f"values.yaml keys without a comment: {undocumented}"


def _sub(schema: dict, path: tuple) -> dict:
    for key in path:
        schema = schema["properties"][key]
    return schema


def test_chart_packages() -> None:
    """`helm package` works and the archive renders like the directory."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        archive = C.helm.package(str(C.CHART), destination=tmp)
        assert archive.endswith("kvcluster-0.1.0.tgz")
        with open(archive, "rb") as f:
            packed = C.helm.Chart.load_archive(f.read())
        rendered = packed.render({}, name=C.RELEASE, namespace=C.NAMESPACE, is_install=True)
        assert rendered == C.render_files({})
        assert packed.schema == C.chart().schema
