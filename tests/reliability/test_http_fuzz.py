"""Fuzzing the OpenAI-compatible HTTP API with hypothesis-generated requests (bodies, raw bytes,
headers), in process: the real ingress class ``KVClusterServer`` (validation, auth, tokenizing,
Router, metrics) with in-process Workers on the tiny model instead of Ray actors, behind a FastAPI
app whose routes call the ingress's own handlers (the Serve deployment's routes are methods of that
class). 1,000 cases by default, ``KVREL_HTTP_FUZZ_CASES=10000`` for the long run. Every answer must come within
the deadline, be 200 or a 4xx with OpenAI's error shape (never 5xx), and a 200 must be a complete
completion (or an SSE stream ending in [DONE]).

Also: the API key decides the tenant (a ``tenant`` in the body is ignored), a bad key is 401, and
``cache_salt`` keeps two requests of the same tenant apart."""
from __future__ import annotations

import json
import os

import pytest
from fastapi import FastAPI, Request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.reliability.harness import LocalCluster

CASES = int(os.environ.get("KVREL_HTTP_FUZZ_CASES", "1000"))
KEYS = {"sk-alpha": "alpha", "sk-beta": "beta"}


class _FakeRayCluster:
    """What KVClusterServer uses of RayCluster, over the in-process cluster."""

    def __init__(self, lc: LocalCluster, reuse: bool = True) -> None:
        self.lc = lc
        self.router, self.scheduler, self.reuse = lc.router, lc.scheduler, reuse
        self.max_context = 2048
        self.handles = dict(lc.workers)
        self.infos = {"w0": {"model": "tiny"}}
        self.fingerprint = lc.fingerprint

    async def worker_stats(self, timeout_s: float = 2.0):
        return {w: x.stats() for w, x in self.lc.workers.items()}


@pytest.fixture(scope="module")
def api(tiny_model):
    from fastapi.testclient import TestClient

    from kvcluster.config import config_from_dict
    from kvcluster.metrics import Metrics
    from kvcluster.serve_app import KVClusterServer
    from workers.model_loader import load_tokenizer

    lc = LocalCluster(1, tiny_model)
    srv = object.__new__(KVClusterServer)  # the ingress without RayCluster.__init__
    srv.cfg = config_from_dict({"model": {"name": str(tiny_model)},
                                "serve": {"api_keys": KEYS, "max_tokens_limit": 4, "max_queue": 8,
                                          "max_prompt_chars": 4000}})
    srv.metrics = Metrics()
    srv.tokenizer = load_tokenizer(str(tiny_model))
    srv.cluster = _FakeRayCluster(lc)
    srv.model_names = {str(tiny_model), "tiny"}
    srv.model_id = str(tiny_model)
    srv._keys = dict(KEYS)
    srv._active, srv._retries_seen, srv._service_s = 0, 0, 5.0

    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await srv._handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await srv._handle(request, chat=True)

    @app.get("/v1/models")
    async def models(request: Request):
        return await KVClusterServer.models(srv, request)

    @app.get("/metrics")
    async def metrics():
        return await KVClusterServer.metrics_endpoint(srv)

    with TestClient(app, raise_server_exceptions=True) as client:
        yield client, srv, lc
    srv.__del__ = None
    lc.close()


_json = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False)
                     | st.text(max_size=30),
                     lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                     max_leaves=8)
_text = st.text(max_size=120)
_msg = st.one_of(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]),
                                        "content": st.one_of(_text, _json,
                                                             st.lists(st.fixed_dictionaries(
                                                                 {"type": st.sampled_from(["text", "image_url"]),
                                                                  "text": _text}), max_size=2))}), _json)
_common = {
    "model": st.one_of(st.none(), st.sampled_from(["tiny", "gpt-4", ""]), _json),
    "max_tokens": st.one_of(st.none(), st.integers(-3, 8), _json),
    "temperature": st.one_of(st.floats(-1, 3), _json), "top_p": st.one_of(st.floats(-0.5, 1.5), _json),
    "stream": st.one_of(st.booleans(), _json), "stream_options": st.one_of(st.just({"include_usage": True}), _json),
    "stop": st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=6), _json),
    "n": st.one_of(st.integers(0, 3), _json), "seed": st.one_of(st.integers(-2**70, 2**70), _json),
    "cache_salt": st.one_of(st.text(max_size=20), _json), "share": st.one_of(st.sampled_from(["private", "public"]), _json),
    "tenant": st.text(max_size=10), "logprobs": st.one_of(st.booleans(), _json), "echo": st.booleans(),
    "user": _json, "best_of": st.integers(0, 3), "suffix": st.one_of(st.none(), _text),
}
_completion = st.fixed_dictionaries({}, optional={
    "prompt": st.one_of(_text, st.lists(st.integers(-5, 60000), max_size=20), st.lists(_text, max_size=2), _json),
    **_common})
_chat = st.fixed_dictionaries({}, optional={"messages": st.one_of(st.lists(_msg, max_size=3), _json),
                                             "max_completion_tokens": st.one_of(st.integers(-1, 8), _json),
                                             **_common})
_auth = st.sampled_from([None, "Bearer sk-alpha", "Bearer sk-beta", "Bearer sk-nope", "sk-alpha", "Bearer ",
                         "Basic sk-alpha", "bearer sk-alpha"])


@st.composite
def requests_(draw):
    chat = draw(st.booleans())
    kind = draw(st.sampled_from(["body", "body", "body", "raw", "json"]))
    if kind == "body":
        body = json.dumps(draw(_chat if chat else _completion)).encode()
    elif kind == "json":
        body = json.dumps(draw(_json)).encode()
    else:
        body = draw(st.binary(max_size=200))
    return chat, body, draw(_auth)


@settings(max_examples=CASES, deadline=10_000, suppress_health_check=list(HealthCheck),
          database=None)
@given(requests_())
def test_http_api_never_5xx_and_every_refusal_is_a_clear_4xx(api, case):
    client, srv, _ = api
    chat, body, auth = case
    headers = {"content-type": "application/json"}
    if auth is not None:
        headers["authorization"] = auth
    r = client.post("/v1/chat/completions" if chat else "/v1/completions", content=body, headers=headers)
    assert r.status_code in (200, 400, 401, 404, 429), (r.status_code, r.text[:300])
    if r.status_code != 200:
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"] and err["type"]
        return
    if r.headers["content-type"].startswith("text/event-stream"):
        lines = [x for x in r.text.split("\n\n") if x]
        assert lines[-1] == "data: [DONE]"
        assert not any('"error"' in x for x in lines), lines[-3:]
    else:
        d = r.json()
        assert d["choices"][0]["finish_reason"] in ("stop", "length")
        assert 1 <= d["usage"]["completion_tokens"] <= 4
    assert srv._active == 0  # every admitted request was released


def _tenants_of(lc):
    return {m.segment_id: (m.tenant, salt) for m, salt, _ in lc.index.table.scan()}


def test_api_key_decides_the_tenant_and_salt_separates(api):
    client, srv, lc = api
    text = "The orchard ledger lists forty apple trees, twelve pear trees and nine plum trees by the river wall."
    before = set(_tenants_of(lc))
    r = client.post("/v1/completions", json={"prompt": text, "max_tokens": 2, "tenant": "beta"},
                    headers={"authorization": "Bearer sk-alpha"})
    assert r.status_code == 200
    new = {k: v for k, v in _tenants_of(lc).items() if k not in before}
    assert list(new.values()) == [("alpha", None)]  # the key's tenant, not the body's
    sid = next(iter(new))
    # beta (another key) does not get alpha's private KV for the very same prompt
    r = client.post("/v1/completions", json={"prompt": text, "max_tokens": 2},
                    headers={"authorization": "Bearer sk-beta"})
    assert r.status_code == 200 and sid not in r.json()["kvcluster"]["donor_ids"]
    assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    # alpha with a cache_salt does not get its own unsalted KV; alpha without one does
    r = client.post("/v1/completions", json={"prompt": text, "max_tokens": 2, "cache_salt": "s1"},
                    headers={"authorization": "Bearer sk-alpha"})
    assert sid not in r.json()["kvcluster"]["donor_ids"]
    r = client.post("/v1/completions", json={"prompt": text + " Again.", "max_tokens": 2},
                    headers={"authorization": "Bearer sk-alpha"})
    assert sid in r.json()["kvcluster"]["donor_ids"]
    for auth in (None, "Bearer sk-nope"):
        h = {"authorization": auth} if auth else {}
        r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1}, headers=h)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert client.get("/v1/models").status_code == 401
