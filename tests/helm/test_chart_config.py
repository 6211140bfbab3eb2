"""The config the chart renders is the config `kvcluster serve` reads (kvcluster.config)."""
from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from . import chart as C
from .test_chart_render import VALUE_SETS

from kvcluster.config import KVClusterConfig, load_config  # noqa: E402

# Keys of the config tree that the chart fills in itself; values.schema.json leaves them out of
# `config` on purpose (service URLs, listen address, Ray address, and API keys from the Secret).
CHART_OWNED = {
    ("index", "qdrant_url"), ("index", "qdrant_path"), ("tiers", "redis_url"),
    ("serve", "host"), ("serve", "port"), ("serve", "api_keys"), ("cluster", "address"),
}


def _pod_env(docs: list[dict], secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    """The KVCLUSTER_* environment a Ray worker pod gets, resolving secretKeyRefs against
    `secrets` (name -> key -> decoded value)."""
    env: dict[str, str] = {}
    for name, e in C.env_of(C.worker_group(docs)["template"]).items():
        if "value" in e:
            env[name] = e["value"]
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            env[name] = secrets[ref["name"]][ref["key"]]
    return env


def _rendered_secrets(docs: list[dict]) -> dict[str, dict[str, str]]:
    return {s["metadata"]["name"]: {k: base64.b64decode(v).decode() for k, v in s.get("data", {}).items()}
            for s in C.find(docs, "Secret")}


def _load(docs: list[dict], tmp_path: Path, secrets: dict[str, dict[str, str]] | None = None) -> KVClusterConfig:
    path = tmp_path / "config.yaml"
    path.write_text(C.config_text(docs))
    env = _pod_env(docs, {**_rendered_secrets(docs), **(secrets or {})})
    # the pod's KVCLUSTER_CONFIG names the mounted file; here it is the extracted copy
    assert env.pop("KVCLUSTER_CONFIG") == "/etc/kvcluster/config.yaml"
    return load_config(path, env=env)


@pytest.mark.parametrize("name", [n for n in VALUE_SETS if n != "existing-secret"])
def test_rendered_config_loads(name: str, tmp_path: Path) -> None:
    docs = C.render(VALUE_SETS[name])
    cfg = _load(docs, tmp_path)
    assert cfg.serve.host == "0.0.0.0" and cfg.serve.port == 8000
    assert cfg.cluster.address == "auto"
    assert cfg.cluster.num_workers >= 1
    assert cfg.serve.api_keys == VALUE_SETS[name].get("apiKeys", {}).get("keys", {})


def test_defaults_match_values(tmp_path: Path) -> None:
    cfg = _load(C.render({}), tmp_path)
    values = C.chart().values["config"]
    assert cfg.model.name == values["model"]["name"] == "smollm2-135m"
    assert cfg.model.dtype == "bfloat16"
    assert cfg.reuse.mode == "dhd" and cfg.reuse.recompute_ratio == 0.15
    assert cfg.tiers.gpu_bytes == 2 << 30 and cfg.tiers.host_bytes == 4 << 30
    assert cfg.index.qdrant_url == "http://kv-kvcluster-qdrant.ml.svc.cluster.local:6333"
    assert cfg.tiers.redis_url == "redis://kv-kvcluster-redis.ml.svc.cluster.local:6379/0"
    assert cfg.serve.api_keys == {}


def test_every_config_key_passes_through(tmp_path: Path) -> None:
    overrides = {
        "model": {"name": "/models/qwen2", "gguf_file": "q.gguf", "dtype": "float16", "device": "cuda",
                  "max_context": 8192, "kv_sharing_strategy": "/models/qwen2/kvsharer.json",
                  "tensor_parallel_size": 2},
        "reuse": {"mode": "cacheblend", "recompute_ratio": 0.3, "check_layer": 2, "decode_recompute": 0,
                  "min_run": 8, "epic_tokens": 16, "suffix_tokens": 2, "min_recompute": 24},
        "index": {"collection": "segs", "top_k": 8, "min_score": -0.5, "block_tokens": 32},
        "tiers": {"block_tokens": 32, "gpu_bytes": 80 << 30, "host_bytes": 512 << 30, "redis_prefix": "p:",
                  "redis_ttl_s": 60, "max_block_bytes": 1 << 30},
        "serve": {"max_tokens_limit": 4096, "max_queue": 1000, "max_prompt_chars": 1_000_000},
        "cluster": {"num_workers": 16, "scheduler": "round_robin", "max_wait_s": 0.5, "load_bound": 2.0},
    }
    cfg = _load(C.render({"config": overrides}), tmp_path)
    for section, keys in overrides.items():
        for key, value in keys.items():
            assert getattr(getattr(cfg, section), key) == value, f"{section}.{key}"


def test_tensor_parallel_divides_the_worker_count(tmp_path: Path) -> None:
    # 2 replicas x 4 GPUs = 8 GPUs; 2 shards per model replica -> 4 workers
    values = {"rayService": {"worker": {"replicas": 2, "gpus": 4}},
              "config": {"model": {"tensor_parallel_size": 2}}}
    cfg = _load(C.render(values), tmp_path)
    assert cfg.model.tensor_parallel_size == 2 and cfg.cluster.num_workers == 4


def test_api_keys_from_created_secret(tmp_path: Path) -> None:
    docs = C.render(VALUE_SETS["inline-keys-monitoring-lb"])
    cfg = _load(docs, tmp_path)
    assert cfg.serve.api_keys == {"sk-alpha-0001": "alpha", "sk-beta-0002": "beta"}


@pytest.mark.parametrize("content", [
    json.dumps({"sk-x": "tenant-x", "sk-y": "tenant-y"}),
    "sk-x: tenant-x\nsk-y: tenant-y\n",  # YAML works too: the loader parses env values with safe_load
])
def test_api_keys_from_existing_secret(content: str, tmp_path: Path) -> None:
    docs = C.render(VALUE_SETS["existing-secret"])
    cfg = _load(docs, tmp_path, secrets={"team-keys": {"keys.yaml": content}})
    assert cfg.serve.api_keys == {"sk-x": "tenant-x", "sk-y": "tenant-y"}


def test_schema_config_section_tracks_the_loader() -> None:
    """values.schema.json's `config` has exactly the loader's sections and keys, less the keys the
    chart owns: a key added to or removed from kvcluster/config.py fails here until the chart
    follows."""
    schema = C.chart().schema["properties"]["config"]
    assert schema["additionalProperties"] is False
    assert set(schema["properties"]) == set(KVClusterConfig.model_fields)
    for section, field in KVClusterConfig.model_fields.items():
        model_keys = set(field.annotation.model_fields)
        sub = schema["properties"][section]
        assert sub["additionalProperties"] is False, section
        assert set(sub["properties"]) == model_keys - {k for s, k in CHART_OWNED if s == section}, section
    # values.yaml documents every settable key
    values = C.chart().values["config"]
    for section, sub in schema["properties"].items():
        missing = set(sub["properties"]) - set(values.get(section, {}))
        # keys whose default is null are dropped by Helm when it reads values.yaml
        nullable = {k for k in missing if "null" in str(sub["properties"][k].get("type"))}
        assert missing == nullable, (section, missing - nullable)


def test_scale_from_zero_still_gives_a_valid_config(tmp_path: Path) -> None:
    values = {"autoscaling": {"enabled": True},
              "rayService": {"worker": {"replicas": 0, "minReplicas": 0, "maxReplicas": 8, "gpus": 2}}}
    docs = C.render(values)
    for doc in docs:
        C.validate(doc)
    assert _load(docs, tmp_path).cluster.num_workers == 1
