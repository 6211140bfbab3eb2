"""The client API without a model: validation, typed errors, config errors, address hooks, the
lazily started default client. Nothing here loads SmolLM2 (a bad request must fail before that)."""
from __future__ import annotations

import asyncio
import math
import threading

import pytest

import kvcluster
from kvcluster import client as client_mod
from kvcluster.config import ConfigError
from kvcluster.types import (BackendUnavailableError, EmptyPromptError, InvalidParameterError,
                             InvalidRequestError, MalformedPromptError, PromptTooLongError, SubmitResult,
                             UnknownScopeError, validate_request)
from workers.errors import KVClusterInputError


@pytest.fixture
def no_model(monkeypatch):
    """Any attempt to start an embedded cluster fails the test."""
    def boom(config):
        raise AssertionError("a bad request started the embedded cluster")
    monkeypatch.setattr(client_mod, "_make_embedded", boom)


BAD_REQUESTS = [
    (dict(prompt=""), EmptyPromptError),
    (dict(prompt="   \n"), EmptyPromptError),
    (dict(prompt=None), MalformedPromptError),
    (dict(prompt=123), MalformedPromptError),
    (dict(prompt=b"bytes"), MalformedPromptError),
    (dict(prompt={"role": "user", "content": "hi"}), MalformedPromptError),
    (dict(prompt=[]), EmptyPromptError),
    (dict(prompt=["hello"]), MalformedPromptError),
    (dict(prompt=[{"role": "user"}]), MalformedPromptError),
    (dict(prompt=[{"role": "robot", "content": "hi"}]), MalformedPromptError),
    (dict(prompt=[{"role": "user", "content": 5}]), MalformedPromptError),
    (dict(prompt=[{"role": "user", "content": "hi", "extra": 1}]), MalformedPromptError),
    (dict(prompt=[{"role": "user", "content": " "}]), EmptyPromptError),
    (dict(prompt=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]), MalformedPromptError),
    (dict(prompt="x" * 200_001), PromptTooLongError),
    (dict(prompt="hi", max_tokens=0), InvalidParameterError),
    (dict(prompt="hi", max_tokens=-3), InvalidParameterError),
    (dict(prompt="hi", max_tokens=513), InvalidParameterError),
    (dict(prompt="hi", max_tokens=2.0), InvalidParameterError),
    (dict(prompt="hi", max_tokens=True), InvalidParameterError),
    (dict(prompt="hi", max_tokens="8"), InvalidParameterError),
    (dict(prompt="hi", temperature=-0.1), InvalidParameterError),
    (dict(prompt="hi", temperature=math.nan), InvalidParameterError),
    (dict(prompt="hi", top_p=0.0), InvalidParameterError),
    (dict(prompt="hi", top_p=1.5), InvalidParameterError),
    (dict(prompt="hi", seed=1.5), InvalidParameterError),
    (dict(prompt="hi", share="world"), UnknownScopeError),
    (dict(prompt="hi", share=None), UnknownScopeError),
    (dict(prompt="hi", tenant=""), InvalidParameterError),
    (dict(prompt="hi", tenant=7), InvalidParameterError),
    (dict(prompt="hi", cache_salt=""), InvalidParameterError),
    (dict(prompt="hi", cache_salt=5), InvalidParameterError),
]


@pytest.mark.parametrize("kwargs,err", BAD_REQUESTS, ids=[f"{i}-{e.__name__}" for i, (_, e) in enumerate(BAD_REQUESTS)])
def test_bad_requests_raise_typed_errors_before_any_model(no_model, kwargs, err):
    c = kvcluster.connect(config={})
    with pytest.raises(err) as info:
        c.submit(**kwargs)
    assert isinstance(info.value, InvalidRequestError) and isinstance(info.value, ValueError)
    assert not c.started


def test_invalid_request_error_covers_engine_errors():
    from workers.errors import PromptTooLongError as EnginePromptTooLong
    assert InvalidRequestError is KVClusterInputError
    assert issubclass(EnginePromptTooLong, InvalidRequestError)
    assert issubclass(UnknownScopeError, InvalidRequestError)


def test_max_tokens_limit_comes_from_config(no_model):
    c = kvcluster.connect(config={"serve": {"max_tokens_limit": 8}})
    with pytest.raises(InvalidParameterError, match="serve.max_tokens_limit"):
        c.submit("hi", max_tokens=9)
    with pytest.raises(PromptTooLongError):
        kvcluster.connect(config={"serve": {"max_prompt_chars": 10}}).submit("x" * 11)


def test_asubmit_validates_too(no_model):
    c = kvcluster.connect(config={})
    with pytest.raises(UnknownScopeError):
        asyncio.run(c.asubmit("hi", share="everyone"))


def test_valid_request_is_normalised():
    req = validate_request([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
                           max_tokens=5, temperature=0, top_p=1, seed=3, share="public")
    assert req.prompt == [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert req.text == "system: s\nuser: u" and req.temperature == 0.0 and req.share == "public"


@pytest.mark.parametrize("config,key", [
    ({"reuse": {"mode": "magic"}}, "reuse.mode"),
    ({"reuse": {"recompute_ratio": 1.5}}, "reuse.recompute_ratio"),
    ({"index": {"top_k": 0}}, "index.top_k"),
    ({"serve": {"max_tokens_limit": "lots"}}, "serve.max_tokens_limit"),
    ({"modle": {}}, "modle"),
    ({"model": {"cuda_graph_tokens": -1}}, "model.cuda_graph_tokens"),
])
def test_malformed_config_names_the_key(config, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        kvcluster.connect(config=config)


def test_malformed_config_from_yaml_and_env(tmp_path, monkeypatch):
    p = tmp_path / "bad.yaml"
    p.write_text("tiers:\n  block_tokens: -1\n")
    with pytest.raises(ConfigError, match=r"tiers\.block_tokens"):
        kvcluster.connect(config=str(p))
    monkeypatch.setenv("KVCLUSTER_INDEX__MIN_SCORE", "7")
    with pytest.raises(ConfigError, match=r"index\.min_score"):
        kvcluster.connect()
    with pytest.raises(ConfigError):
        kvcluster.connect(config=42)


@pytest.mark.parametrize("address,module", [("ray://head:10001", "ray_client"), ("auto", "ray_client"),
                                            ("http://127.0.0.1:8000", "ray_client"),
                                            ("https://kv.example", "ray_client")])
def test_remote_addresses_say_what_is_missing(address, module, monkeypatch):
    import importlib
    real = importlib.import_module

    def fake_import(name, *a, **k):  # pretend the backend modules are not there (yet)
        if name.endswith(module):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(client_mod.importlib, "import_module", fake_import)
    with pytest.raises(BackendUnavailableError, match=module) as info:
        kvcluster.connect(address)
    assert isinstance(info.value, NotImplementedError)


def test_bad_addresses_are_config_errors():
    with pytest.raises(ConfigError, match="cluster.address"):
        kvcluster.connect("gopher://x")
    with pytest.raises(ConfigError, match="cluster.address"):
        kvcluster.connect("localhost:8000")


def test_register_backend_and_config_address(monkeypatch):
    seen = {}

    class Fake:
        def __init__(self, address, config):
            seen["args"] = (address, config.serve.port)

    monkeypatch.setitem(client_mod._BACKENDS, "http", Fake)
    c = kvcluster.connect(config={"cluster": {"address": "http://h:1"}, "serve": {"port": 9}})
    assert isinstance(c, Fake) and seen["args"] == ("http://h:1", 9)


def test_default_client_starts_lazily_once(monkeypatch):
    made = []

    class FakeCluster:
        def __init__(self, config):
            made.append(config)
            self.config = config
            self.closed = False

        def submit_request(self, req, t0=None):
            return SubmitResult(text=req.text.upper(), token_ids=[1], prompt_tokens=3, cached_tokens=0,
                                recomputed_tokens=0, source="miss", ttft_s=0.0, decode_s=0.0,
                                finish_reason="length", segment_id=None, tenant=req.tenant)

        def close(self):
            self.closed = True

    monkeypatch.setattr(client_mod, "_make_embedded", FakeCluster)
    monkeypatch.delenv("KVCLUSTER_CONFIG", raising=False)
    prev = kvcluster.set_default_client(None)
    try:
        c = kvcluster.default_client()
        assert isinstance(c, kvcluster.EmbeddedClient) and not c.started and not made
        results = []
        threads = [threading.Thread(target=lambda: results.append(kvcluster.submit("abc", tenant="t")))
                   for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(made) == 1 and len(results) == 8 and results[0].text == "ABC" and results[0].tenant == "t"
        r = asyncio.run(kvcluster.asubmit("xyz", max_tokens=2))
        assert r.text == "XYZ" and kvcluster.default_client() is c and len(made) == 1
        cluster = c.cluster
        kvcluster.shutdown()
        assert cluster.closed
    finally:
        kvcluster.set_default_client(prev)


def test_submit_result_accounting():
    r = SubmitResult(text="", token_ids=[1, 2], prompt_tokens=10, cached_tokens=6, recomputed_tokens=2,
                     source="semantic", ttft_s=0.1, decode_s=0.2, finish_reason="stop", segment_id="s")
    assert r.reused_tokens == 8 and r.hit_rate == 0.8 and r.completion_tokens == 2
    assert r.to_dict()["reused_tokens"] == 8
