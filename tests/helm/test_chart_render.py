"""Lint and render the chart for several value sets and validate every object offline."""
from __future__ import annotations

import yaml
import pytest

from . import chart as C

EXTERNAL_QDRANT = "http://qdrant.vector.svc.cluster.local:6333"
EXTERNAL_REDIS = "redis://redis-master.cache.svc.cluster.local:6379/2"

VALUE_SETS: dict[str, dict] = {
    "defaults": {},
    "external-services": {
        "qdrant": {"enabled": False, "externalUrl": EXTERNAL_QDRANT},
        "redis": {"enabled": False, "externalUrl": EXTERNAL_REDIS},
    },
    "gpus-0": {"rayService": {"worker": {"gpus": 0, "tolerations": []}}},
    "gpus-1": {"rayService": {"worker": {"gpus": 1}}},
    "gpus-8": {
        "rayService": {"worker": {
            "gpus": 8, "replicas": 2, "minReplicas": 2, "maxReplicas": 2,
            "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
            "resources": {"requests": {"cpu": "32", "memory": "256Gi"}, "limits": {"memory": "256Gi"}},
        }},
        "config": {"model": {"name": "/models/llama-3-8b", "dtype": "bfloat16"}},
    },
    "autoscaling": {
        "autoscaling": {"enabled": True, "idleTimeoutSeconds": 300, "upscalingMode": "Conservative"},
        "rayService": {"worker": {"replicas": 1, "minReplicas": 1, "maxReplicas": 10}},
    },
    "existing-secret": {"apiKeys": {"existingSecret": "team-keys", "secretKey": "keys.yaml"}},
    "inline-keys-monitoring-lb": {
        "apiKeys": {"keys": {"sk-alpha-0001": "alpha", "sk-beta-0002": "beta"}},
        "monitoring": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
        "service": {"type": "LoadBalancer", "annotations": {"service.beta.kubernetes.io/aws-load-balancer-type": "nlb"}},
        "redis": {"maxmemory": "12gb", "maxmemoryPolicy": "allkeys-lfu"},
        "rayService": {"extraEnv": [{"name": "HF_HUB_OFFLINE", "value": "1"}],
                       "serve": {"deployments": [{"name": "KVClusterIngress", "num_replicas": 2}],
                                 "importPath": "kvcluster.serve_app:build"}},
    },
}

IDS = list(VALUE_SETS)


def _docs(name: str) -> list[dict]:
    return C.render(VALUE_SETS[name])


@pytest.mark.parametrize("name", IDS)
def test_lint_strict_clean(name: str) -> None:
    report = C.helm.lint(str(C.CHART), VALUE_SETS[name], strict=True, kube_version="v1.29.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


@pytest.mark.parametrize("name", IDS)
def test_rendered_objects_validate(name: str) -> None:
    docs = _docs(name)
    assert docs
    for doc in docs:
        try:
            C.validate(doc)
        except Exception as e:  # name the object in the failure
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} ({name}): {e}")
    # every object is namespaced to the release namespace and carries the release labels
    for doc in docs:
        assert doc["metadata"]["namespace"] == C.NAMESPACE
        assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == C.RELEASE


def test_default_objects() -> None:
    docs = _docs("defaults")
    kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs)
    assert kinds == sorted([
        "ConfigMap/kv-kvcluster-config",
        "Secret/kv-kvcluster-api-keys",
        "ServiceAccount/kv-kvcluster",
        "RayService/kv-kvcluster",
        "Service/kv-kvcluster",
        "Service/kv-kvcluster-metrics",
        "Service/kv-kvcluster-qdrant",
        "Service/kv-kvcluster-qdrant-headless",
        "StatefulSet/kv-kvcluster-qdrant",
        "Service/kv-kvcluster-redis",
        "Deployment/kv-kvcluster-redis",
    ])


def test_rayservice_shape() -> None:
    docs = _docs("defaults")
    rs = C.rayservice(docs)
    cluster = rs["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())
    head_c = C.container(head["template"])
    assert "nvidia.com/gpu" not in str(head_c.get("resources"))
    for probe in ("livenessProbe", "readinessProbe"):
        assert "localhost:8265/api/gcs_healthz" in head_c[probe]["exec"]["command"][-1]
    w = C.worker_group(docs)
    assert w["groupName"] == "gpu-workers"
    assert (w["replicas"], w["minReplicas"], w["maxReplicas"]) == (1, 1, 4)
    assert cluster["enableInTreeAutoscaling"] is False and "autoscalerOptions" not in cluster
    wc = C.container(w["template"])
    for probe in ("livenessProbe", "readinessProbe"):
        assert "localhost:52365/api/local_raylet_healthz" in wc[probe]["exec"]["command"][-1]
    assert "localhost:8000/-/healthz" in wc["readinessProbe"]["exec"]["command"][-1]
    # null leaves the probes to KubeRay's defaults
    docs_no_probes = C.render({"rayService": {"worker": {"livenessProbe": None, "readinessProbe": None}}})
    assert "readinessProbe" not in C.container(C.worker_group(docs_no_probes)["template"])
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in w["template"]["spec"]["tolerations"]
    # the Serve app: import path from values, config path passed as an argument
    serve = yaml.safe_load(rs["spec"]["serveConfigV2"])
    (app,) = serve["applications"]
    assert app["import_path"] == "kvcluster.serve_app:app_builder"
    assert app["args"] == {"config": "/etc/kvcluster/config.yaml"}
    assert app["route_prefix"] == "/"
    assert serve["http_options"] == {"host": "0.0.0.0", "port": 8000}
    # config mounted where $KVCLUSTER_CONFIG points, from the chart's ConfigMap, on head and workers
    cm = C.one(docs, "ConfigMap")["metadata"]["name"]
    for template in (head["template"], w["template"]):
        c = C.container(template)
        mount = next(m for m in c["volumeMounts"] if m["name"] == "kvcluster-config")
        assert C.env_of(template)["KVCLUSTER_CONFIG"]["value"] == mount["mountPath"] + "/config.yaml"
        vol = next(v for v in template["spec"]["volumes"] if v["name"] == "kvcluster-config")
        assert vol["configMap"]["name"] == cm
        assert any(m["mountPath"] == "/dev/shm" for m in c["volumeMounts"])


@pytest.mark.parametrize("gpus", [0, 1, 8])
def test_gpus_per_worker(gpus: int) -> None:
    docs = _docs(f"gpus-{gpus}")
    w = C.worker_group(docs)
    res = C.container(w["template"]).get("resources", {})
    assert w["rayStartParams"]["num-gpus"] == str(gpus)
    if gpus:
        assert res["limits"]["nvidia.com/gpu"] == gpus
        assert res["requests"]["nvidia.com/gpu"] == gpus
    else:
        assert "nvidia.com/gpu" not in res.get("limits", {})
        assert "nvidia.com/gpu" not in res.get("requests", {})
        assert "tolerations" not in w["template"]["spec"]
    cfg = yaml.safe_load(C.config_text(docs))
    assert cfg["cluster"]["num_workers"] == w["replicas"] * max(1, gpus)
    if gpus == 8:
        assert w["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
        assert res["requests"]["memory"] == "256Gi"
        assert cfg["model"]["name"] == "/models/llama-3-8b"


def test_autoscaling() -> None:
    docs = _docs("autoscaling")
    cluster = C.rayservice(docs)["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"] == {"upscalingMode": "Conservative", "idleTimeoutSeconds": 300}
    w = C.worker_group(docs)
    assert (w["minReplicas"], w["maxReplicas"]) == (1, 10)
    assert w["minReplicas"] <= w["replicas"] <= w["maxReplicas"]


def test_external_services() -> None:
    docs = _docs("external-services")
    assert not C.find(docs, "StatefulSet") and not C.find(docs, "Deployment")
    assert [s["metadata"]["name"] for s in C.find(docs, "Service")] == ["kv-kvcluster", "kv-kvcluster-metrics"]
    cfg = yaml.safe_load(C.config_text(docs))
    assert cfg["index"]["qdrant_url"] == EXTERNAL_QDRANT
    assert cfg["tiers"]["redis_url"] == EXTERNAL_REDIS
    assert "(external)" in C.notes(VALUE_SETS["external-services"])


def test_redis_off_without_url_means_no_redis_tier() -> None:
    docs = C.render({"redis": {"enabled": False}})
    assert not C.find(docs, "Deployment")
    assert yaml.safe_load(C.config_text(docs))["tiers"]["redis_url"] is None


def test_in_chart_services_and_urls() -> None:
    docs = _docs("defaults")
    cfg = yaml.safe_load(C.config_text(docs))
    assert cfg["index"]["qdrant_url"] == "http://kv-kvcluster-qdrant.ml.svc.cluster.local:6333"
    assert cfg["tiers"]["redis_url"] == "redis://kv-kvcluster-redis.ml.svc.cluster.local:6379/0"
    sts = C.one(docs, "StatefulSet")
    assert sts["spec"]["serviceName"] == "kv-kvcluster-qdrant-headless"
    (pvc,) = sts["spec"]["volumeClaimTemplates"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "10Gi"
    qc = C.container(sts["spec"]["template"])
    assert {m["name"] for m in qc["volumeMounts"]} == {pvc["metadata"]["name"]}
    assert qc["readinessProbe"]["httpGet"]["path"] == "/readyz"
    qsvc = C.one(docs, "Service", "kv-kvcluster-qdrant")
    assert qsvc["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    redis = C.one(docs, "Deployment")
    args = C.container(redis["spec"]["template"])["args"]
    assert args[args.index("--maxmemory") + 1] == "3gb"
    assert args[args.index("--maxmemory-policy") + 1] == "allkeys-lru"
    rsvc = C.one(docs, "Service", "kv-kvcluster-redis")
    assert rsvc["spec"]["selector"].items() <= redis["spec"]["template"]["metadata"]["labels"].items()


def test_redis_memory_settable() -> None:
    docs = _docs("inline-keys-monitoring-lb")
    args = C.container(C.one(docs, "Deployment")["spec"]["template"])["args"]
    assert args[args.index("--maxmemory") + 1] == "12gb"
    assert args[args.index("--maxmemory-policy") + 1] == "allkeys-lfu"
    docs = C.render({"redis": {"maxmemory": 4_000_000_000}})
    args = C.container(C.one(docs, "Deployment")["spec"]["template"])["args"]
    assert args[args.index("--maxmemory") + 1] == "4000000000"


def test_api_service_reaches_serve_pods() -> None:
    docs = _docs("inline-keys-monitoring-lb")
    svc = C.one(docs, "Service", "kv-kvcluster")
    assert svc["spec"]["type"] == "LoadBalancer"
    assert svc["metadata"]["annotations"] == {"service.beta.kubernetes.io/aws-load-balancer-type": "nlb"}
    selector = dict(svc["spec"]["selector"])
    # ray.io/serve is set by KubeRay on pods with a healthy Serve proxy; the rest must be on the templates
    assert selector.pop("ray.io/serve") == "true"
    cluster = C.rayservice(docs)["spec"]["rayClusterConfig"]
    for template in (cluster["headGroupSpec"]["template"], C.worker_group(docs)["template"]):
        assert selector.items() <= template["metadata"]["labels"].items()
        ports = {p["name"]: p["containerPort"] for p in C.container(template)["ports"]}
        assert ports[svc["spec"]["ports"][0]["targetPort"]] == 8000
    assert "ray.io/serve" not in str(cluster["headGroupSpec"]["template"]["metadata"]["labels"])


def test_service_monitor() -> None:
    assert not C.find(_docs("defaults"), "ServiceMonitor")
    docs = _docs("inline-keys-monitoring-lb")
    sm = C.one(docs, "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    metrics = C.one(docs, "Service", "kv-kvcluster-metrics")
    assert sm["spec"]["selector"]["matchLabels"].items() <= metrics["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"] and sm["spec"]["endpoints"][0]["port"] == metrics["spec"]["ports"][0]["name"]
    cluster = C.rayservice(docs)["spec"]["rayClusterConfig"]
    for template in (cluster["headGroupSpec"]["template"], C.worker_group(docs)["template"]):
        selector = {k: v for k, v in metrics["spec"]["selector"].items() if not k.startswith("ray.io/")}
        assert selector.items() <= template["metadata"]["labels"].items()
        assert any(p["name"] == "metrics" and p["containerPort"] == 8080 for p in C.container(template)["ports"])
    assert cluster["headGroupSpec"]["rayStartParams"]["metrics-export-port"] == "8080"


def test_serve_app_overrides() -> None:
    docs = _docs("inline-keys-monitoring-lb")
    serve = yaml.safe_load(C.rayservice(docs)["spec"]["serveConfigV2"])
    (app,) = serve["applications"]
    assert app["import_path"] == "kvcluster.serve_app:build"
    assert app["deployments"] == [{"name": "KVClusterIngress", "num_replicas": 2}]
    w = C.worker_group(docs)
    assert C.env_of(w["template"])["HF_HUB_OFFLINE"]["value"] == "1"


def test_secret_created_or_existing() -> None:
    docs = _docs("defaults")
    secret = C.one(docs, "Secret")
    assert set(secret["data"]) == {"api-keys.json"}
    for template in (C.rayservice(docs)["spec"]["rayClusterConfig"]["headGroupSpec"]["template"],
                     C.worker_group(docs)["template"]):
        ref = C.env_of(template)["KVCLUSTER_SERVE__API_KEYS"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": secret["metadata"]["name"], "key": "api-keys.json"}
    assert "WARNING: no API keys" in C.notes({})

    docs = _docs("existing-secret")
    assert not C.find(docs, "Secret")
    for template in (C.rayservice(docs)["spec"]["rayClusterConfig"]["headGroupSpec"]["template"],
                     C.worker_group(docs)["template"]):
        ref = C.env_of(template)["KVCLUSTER_SERVE__API_KEYS"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "team-keys", "key": "keys.yaml"}
    assert "WARNING" not in C.notes(VALUE_SETS["existing-secret"])
    # the keys never land in the ConfigMap or the RayService
    docs = _docs("inline-keys-monitoring-lb")
    for kind in ("ConfigMap", "RayService"):
        assert "sk-alpha-0001" not in yaml.safe_dump(C.one(docs, kind))


def test_config_change_rolls_the_cluster() -> None:
    def checksum(values: dict) -> str:
        rs = C.rayservice(C.render(values))
        return rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["metadata"]["annotations"]["checksum/config"]
    assert checksum({}) != checksum({"config": {"reuse": {"mode": "cacheblend"}}})


def test_long_release_names_fit() -> None:
    rendered = C.helm.Chart.load(str(C.CHART)).render({}, name="a" * 53, namespace="ns")
    rs = next(d for p, t in rendered.items() if not p.endswith("NOTES.txt")
              for d in yaml.safe_load_all(t) if d and d["kind"] == "RayService")
    assert len(rs["metadata"]["name"]) <= 40


def test_validators_catch_mistakes() -> None:
    """The validation above is not a no-op: typical slips in rendered objects are caught."""
    import copy

    import jsonschema

    docs = _docs("defaults")
    rs = C.rayservice(docs)
    for mutate, expect in [
        (lambda d: d["spec"]["rayClusterConfig"]["headGroupSpec"].pop("rayStartParams"), "'rayStartParams' is a required property"),
        (lambda d: d["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].pop("groupName"), "'groupName' is a required property"),
        (lambda d: d["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].update(replicas="2"), "'2' is not of type 'integer'"),
        (lambda d: d["spec"]["rayClusterConfig"].update(enableInTreeAutoScaling=True), "Additional properties are not allowed"),
        (lambda d: d["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"].update({"num-gpus": 0}), "0 is not of type 'string'"),
        (lambda d: C.container(d["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]).update(livenessprobe={}), "livenessprobe"),
        (lambda d: d["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"].update(tolerations={}), "is not of type 'array'"),
    ]:
        bad = copy.deepcopy(rs)
        mutate(bad)
        with pytest.raises(jsonschema.ValidationError, match=expect.replace("(", r"\(")):
            C.validate(bad)
    sts = copy.deepcopy(C.one(docs, "StatefulSet"))
    sts["spec"]["volumeClaimTemplates"][0]["spec"]["storageClass"] = "fast"
    with pytest.raises(jsonschema.ValidationError, match="storageClass"):
        C.validate(sts)


def test_readme_gpu_example_renders_and_validates() -> None:
    """The GPU values file shown in helm/README.md is valid and does what it says."""
    readme = (C.CHART.parent / "README.md").read_text()
    block = readme.split("```yaml\n# gpu-values.yaml", 1)[1].split("\n", 1)[1].split("```", 1)[0]
    values = yaml.safe_load(block)
    docs = C.render(values)
    for doc in docs:
        C.validate(doc)
    w = C.worker_group(docs)
    assert C.container(w["template"])["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in C.container(w["template"])["volumeMounts"]
    cfg = yaml.safe_load(C.config_text(docs))
    assert cfg["cluster"]["num_workers"] == 16 and cfg["tiers"]["gpu_bytes"] == 40 << 30
