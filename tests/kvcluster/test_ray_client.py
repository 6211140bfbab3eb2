"""kvcluster.ray_client without a cluster: address dispatch, result mapping, Retry-After."""
from __future__ import annotations

import pytest

from kvcluster.ray_client import HTTPClient, _result, connect, retry_after_s
from kvcluster.types import ClusterConnectionError, InvalidRequestError, SubmitResult


def test_connect_dispatches_on_the_scheme():
    c = connect("http://127.0.0.1:9", {"serve": {"api_keys": {"k1": "acme"}}})
    try:
        assert isinstance(c, HTTPClient) and c.tenant == "acme" and c.api_key == "k1"
    finally:
        c.close()
    with pytest.raises(ClusterConnectionError):
        connect("grpc://x:1")
    with pytest.raises(ClusterConnectionError):
        connect(None)  # type: ignore[arg-type]


def test_http_client_refuses_a_tenant_it_cannot_honour_and_reports_unreachable_servers():
    c = HTTPClient("http://127.0.0.1:9", {"serve": {"api_keys": {"k1": "acme"}}}, timeout_s=2)
    try:
        with pytest.raises(InvalidRequestError):
            c.submit("hi", tenant="someone-else")
        with pytest.raises(InvalidRequestError):
            c.submit("hi", max_tokens=0)  # validated before anything is sent
        with pytest.raises(ClusterConnectionError):
            c.submit("hi", max_tokens=1)  # nothing listens on port 9
    finally:
        c.close()


def test_result_mapping_keeps_only_submit_result_fields():
    d = {"text": "x", "token_ids": [1], "prompt_tokens": 3, "cached_tokens": 1, "recomputed_tokens": 1,
         "source": "semantic", "ttft_s": 0.1, "decode_s": 0.2, "finish_reason": "length", "segment_id": "s",
         "worker": "w0", "fetch": {}}
    r = _result(d)
    assert isinstance(r, SubmitResult) and r.reused_tokens == 2 and not hasattr(r, "worker")


def test_retry_after_is_the_queue_drain_time():
    assert retry_after_s(0, 2, 5.0) == 1
    assert retry_after_s(10, 2, 3.0) == 15
    assert retry_after_s(4, 0, 0.0) == 1


def test_example_serve_config_is_valid_and_builds():
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from kvcluster.config import ConfigError
    from kvcluster.serve_app import app_builder

    root = Path(__file__).resolve().parents[2]
    schema = ServeDeploySchema(**yaml.safe_load((root / "examples" / "serve_config.yaml").read_text()))
    app_cfg = schema.applications[0]
    assert app_cfg.import_path == "kvcluster.serve_app:app_builder"
    args = dict(app_cfg.args)
    args["config"] = str(root / args["config"])
    app = app_builder(args)  # binds the deployment; nothing starts until serve.run
    assert type(app).__name__ == "Application"
    with pytest.raises(ConfigError):
        app_builder({"nonsense": "1"})


def test_caching_embedder_embeds_a_text_once():
    import numpy as np

    from kvcluster.ray_client import CachingEmbedder

    class Fake:
        dim = 4
        calls = 0

        def embed_one(self, text):
            Fake.calls += 1
            return np.full(4, len(text), dtype=np.float32)

    e = CachingEmbedder(Fake(), size=2)
    assert e.dim == 4
    e.embed_one("aa")
    e.embed_one("aa")
    assert Fake.calls == 1 and e.hits == 1
    e.embed_one("b")
    e.embed_one("c")  # evicts "aa"
    e.embed_one("aa")
    assert Fake.calls == 4
