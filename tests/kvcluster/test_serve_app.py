"""The Ray Serve app on a local Ray cluster: 2 CPU workers running SmolLM2, the index actor over
embedded Qdrant, a real Redis tier (127.0.0.1:6379) under this module's own key prefix.

One cluster for the module (starting it loads the model twice and the embedder once, ~1 min on
the 2-core machine); the worker-kill test runs last because it takes a worker down.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import time
import uuid

import pytest

pytestmark = pytest.mark.slow

API_KEYS = {"sk-test-alpha": "alpha", "sk-test-beta": "beta"}
MAX_QUEUE = 6
DOCS = [
    "The Danube flows through ten countries, more than any other river in the world, from the Black Forest "
    "in Germany to the Black Sea.",
    "The Rhine rises in the Swiss Alps and flows north through Germany and the Netherlands into the North Sea.",
    "The Volga is the longest river in Europe; it flows through central Russia into the Caspian Sea.",
]


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _redis_up() -> bool:
    try:
        import redis
        return bool(redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=1).ping())
    except Exception:
        return False


@pytest.fixture(scope="module")
def served():
    if not _redis_up():
        pytest.skip("no Redis server on 127.0.0.1:6379")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from kvcluster.config import config_from_dict
    from kvcluster.serve_app import build_app

    prefix = f"kvtest-serve-{uuid.uuid4().hex[:10]}:"
    port = _free_port()
    cfg = config_from_dict({
        "model": {"max_context": 1024},
        "cluster": {"num_workers": 2, "scheduler": "cache_aware"},
        "serve": {"api_keys": API_KEYS, "max_tokens_limit": 64, "max_queue": MAX_QUEUE, "port": port},
        "index": {"qdrant_path": ":memory:"},
        "tiers": {"redis_url": "redis://127.0.0.1:6379/0", "redis_prefix": prefix, "redis_ttl_s": 900,
                  "host_bytes": 256 << 20},
    })
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(cfg), name="kvcluster", route_prefix="/", blocking=False)
        yield {"base": f"http://127.0.0.1:{port}", "cfg": cfg, "prefix": prefix}
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            import redis
            r = redis.Redis(host="127.0.0.1", port=6379)
            for _ in range(2):  # again after a moment: a worker's last write-through may land late (TTL 900 s anyway)
                keys = list(r.scan_iter(match=prefix + "*", count=1000))
                if keys:
                    r.delete(*keys)
                time.sleep(2)


@pytest.fixture(scope="module")
def oai(served):
    import openai
    return openai.OpenAI(base_url=served["base"] + "/v1", api_key="sk-test-alpha", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def ray_client(served):
    from kvcluster.client import connect
    return connect("auto", served["cfg"])


def _prompt(order, question):
    return " ".join(DOCS[i] for i in order) + "\nQuestion: " + question


# ---- OpenAI client, unchanged -----------------------------------------------------------------

def test_openai_client_chat_and_completions(oai):
    r = oai.chat.completions.create(model="smollm2-135m", max_tokens=6, temperature=0,
                                    messages=[{"role": "user", "content": _prompt([0, 1, 2], "Which is longest?")}])
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content and r.choices[0].finish_reason in ("stop", "length")
    u = r.usage
    assert u.prompt_tokens > 60 and 1 <= u.completion_tokens <= 6
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.prompt_tokens_details.cached_tokens == 0  # nothing stored before
    # the same documents in another order: the index finds the donor, the KV is reused
    r2 = oai.chat.completions.create(model="smollm2-135m", max_tokens=6, temperature=0,
                                     messages=[{"role": "user", "content": _prompt([2, 0, 1], "Which is longest?")}])
    assert r2.usage.prompt_tokens_details.cached_tokens > 0.4 * r2.usage.prompt_tokens
    c = oai.completions.create(model="smollm2-135m", prompt="The capital of France is", max_tokens=4, temperature=0)
    assert c.object == "text_completion" and c.choices[0].text and c.usage.completion_tokens >= 1
    assert [m.id for m in oai.models.list().data] == ["smollm2-135m"]


def test_openai_client_streaming(oai):
    msgs = [{"role": "user", "content": _prompt([1, 0], "Where does the Rhine rise?")}]
    plain = oai.chat.completions.create(model="smollm2-135m", max_tokens=8, temperature=0, messages=msgs)
    chunks = list(oai.chat.completions.create(model="smollm2-135m", max_tokens=8, temperature=0, messages=msgs,
                                              stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    usage = [ch.usage for ch in chunks if ch.usage is not None]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert finish and len(usage) == 1 and usage[0].completion_tokens == plain.usage.completion_tokens
    assert text  # the second run reuses the first one's whole prompt, so the text may differ slightly
    assert usage[0].prompt_tokens_details.cached_tokens > 0
    stream = oai.completions.create(model="smollm2-135m", prompt="Once upon a time", max_tokens=5, temperature=0,
                                    stream=True)
    parts = list(stream)
    assert "".join(p.choices[0].text for p in parts) and parts[-1].choices[0].finish_reason in ("stop", "length")


def test_stop_strings_cut_the_text(oai):
    r = oai.completions.create(model="smollm2-135m", prompt="1, 2, 3, 4, 5,", max_tokens=12, temperature=0,
                               stop=[" 8"])
    assert " 8" not in r.choices[0].text and r.choices[0].finish_reason == "stop"


# ---- auth and errors ------------------------------------------------------------------------------

def test_wrong_or_missing_api_key_is_401(served):
    import httpx
    import openai
    bad = openai.OpenAI(base_url=served["base"] + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    r = httpx.post(served["base"] + "/v1/completions", json={"prompt": "hi", "max_tokens": 1})
    assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(served["base"] + "/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401


def test_bad_requests_get_openai_errors(served, oai):
    import httpx
    import openai
    url, h = served["base"] + "/v1/chat/completions", {"Authorization": "Bearer sk-test-alpha"}
    msgs = [{"role": "user", "content": "hi"}]

    def post(body, raw=None):
        r = httpx.post(url, headers={**h, "Content-Type": "application/json"},
                       content=raw if raw is not None else json.dumps(body), timeout=60)
        return r.status_code, r.json()["error"]

    assert post(None, raw=b"{not json")[0] == 400
    assert post(None, raw=b"[1, 2]")[0] == 400
    status, err = post({"messages": msgs, "max_tokens": "many"})
    assert status == 400 and "max_tokens" in err["message"]
    assert post({"messages": "hello"})[0] == 400
    assert post({"messages": [{"role": "wizard", "content": "x"}]})[0] == 400
    status, err = post({"messages": msgs, "max_tokens": 65})  # over serve.max_tokens_limit = 64
    assert status == 400 and "max_tokens" in err["message"]
    long = " ".join(DOCS) * 20  # ~1,700 tokens > model.max_context = 1024
    status, err = post({"messages": [{"role": "user", "content": long}], "max_tokens": 4})
    assert status == 400 and err["code"] == "context_length_exceeded"
    assert post({"messages": msgs, "n": 2})[0] == 400
    assert post({"messages": msgs, "model": "gpt-5"})[0] == 404
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model="smollm2-135m", messages=msgs, max_tokens=100)


def test_tenant_comes_from_the_key_not_the_body(served):
    import httpx
    url = served["base"] + "/v1/chat/completions"
    msgs = [{"role": "user", "content": _prompt([2, 1], "Name a sea.")}]
    a = httpx.post(url, headers={"Authorization": "Bearer sk-test-alpha"},
                   json={"messages": msgs, "max_tokens": 2, "temperature": 0}, timeout=120).json()
    # beta claims to be alpha in the body: ignored; beta must not reuse alpha's private KV
    b = httpx.post(url, headers={"Authorization": "Bearer sk-test-beta"},
                   json={"messages": msgs, "max_tokens": 2, "temperature": 0, "tenant": "alpha"}, timeout=120).json()
    assert b["usage"]["prompt_tokens_details"]["cached_tokens"] == 0 and b["kvcluster"]["donor_ids"] == []
    # alpha again: its own KV, fully reused; a different cache_salt separates it
    a2 = httpx.post(url, headers={"Authorization": "Bearer sk-test-alpha"},
                    json={"messages": msgs, "max_tokens": 2, "temperature": 0}, timeout=120).json()
    assert a2["usage"]["prompt_tokens_details"]["cached_tokens"] > 0 and a["kvcluster"]["segment_id"]
    a3 = httpx.post(url, headers={"Authorization": "Bearer sk-test-alpha"},
                    json={"messages": msgs, "max_tokens": 2, "temperature": 0, "cache_salt": "other"},
                    timeout=120).json()
    assert a3["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_queue_bound_answers_429_with_retry_after(served):
    import httpx

    async def main():
        async with httpx.AsyncClient(base_url=served["base"], timeout=300,
                                     headers={"Authorization": "Bearer sk-test-alpha"}) as c:
            body = {"prompt": "Count slowly: one, two,", "max_tokens": 6, "temperature": 0}
            return await asyncio.gather(*[c.post("/v1/completions", json=body) for _ in range(MAX_QUEUE + 4)])

    rs = asyncio.run(main())
    codes = sorted(r.status_code for r in rs)
    assert codes.count(429) >= 1 and codes.count(200) >= MAX_QUEUE - 1 and set(codes) <= {200, 429}
    r429 = next(r for r in rs if r.status_code == 429)
    assert int(r429.headers["Retry-After"]) >= 1 and r429.json()["error"]["code"] == "rate_limit_exceeded"


# ---- across workers --------------------------------------------------------------------------------

def test_donor_on_worker_a_is_reused_on_worker_b_through_the_ray_channel(ray_client):
    from kvcluster.types import SubmitResult
    donor_prompt = _prompt([0, 1, 2], "Which river flows into the Caspian Sea?")
    first = ray_client.submit(donor_prompt, max_tokens=2, tenant="gamma", pin="w0")
    assert isinstance(first, SubmitResult) and first.segment_id and first.reused_tokens == 0
    before = ray_client.cluster_stats()["workers"]["w1"]
    p = ray_client._payload(_prompt([1, 2, 0], "Which river flows into the North Sea?"), 2, 0.0, "gamma",
                            "private", None, 1.0, None, "w1")
    second = ray_client._handle.submit.remote(p).result(timeout_s=300)
    assert second["worker"] == "w1" and first.segment_id in second["donor_ids"]
    f = second["fetch"]
    assert f["fetched"] == [first.segment_id] and f["channel"] == "ray" and f["peer_blocks"] >= 2
    assert second["reused_tokens"] > 0.5 * second["prompt_tokens"]
    after = ray_client.cluster_stats()["workers"]
    peer = after["w1"]["tiers"]["peer"]
    assert peer["hits"] > before["tiers"].get("peer", {}).get("hits", 0) and peer["corrupt"] == 0
    assert after["w1"]["transfer"]["ray"]["bytes"] == f["peer_bytes"] + before["transfer"].get("ray", {}).get("bytes", 0)
    assert after["w0"]["counters"]["blocks_exported"] >= f["peer_blocks"]
    assert after["w0"]["tiers"]["redis"]["bytes_in"] > 0  # written through to the shared tier too


def test_http_client_returns_submit_results(served):
    from kvcluster.ray_client import HTTPClient
    from kvcluster.types import SubmitResult
    c = HTTPClient(served["base"], served["cfg"], api_key="sk-test-beta")
    try:
        r = c.submit("Say hello.", max_tokens=3)
        assert isinstance(r, SubmitResult) and r.tenant == "beta" and r.text and len(r.token_ids) <= 3
    finally:
        c.close()


def test_metrics_expose_the_series(served, oai):
    import httpx
    from prometheus_client.parser import text_string_to_metric_families
    oai.completions.create(model="smollm2-135m", prompt="Metrics are", max_tokens=3, temperature=0)
    text = httpx.get(served["base"] + "/metrics", timeout=30).text
    samples = {s.name: s for fam in text_string_to_metric_families(text) for s in fam.samples}
    names = set(samples)
    for n in ("kvcluster:requests_total", "kvcluster:prompt_tokens_total", "kvcluster:reused_tokens_total",
              "kvcluster:recomputed_tokens_total", "kvcluster:cached_tokens_total",
              "kvcluster:generation_tokens_total", "kvcluster:time_to_first_token_seconds_bucket",
              "kvcluster:time_per_output_token_seconds_bucket", "kvcluster:e2e_request_latency_seconds_count",
              "kvcluster:tier_bytes", "kvcluster:tier_hits_total", "kvcluster:tier_misses_total",
              "kvcluster:transfer_bytes_total", "kvcluster:transfer_latency_seconds_bucket",
              "kvcluster:workers_up"):
        assert n in names, n
    assert all(n.startswith("kvcluster:") for n in names)
    assert samples["kvcluster:reused_tokens_total"].value > 0
    tiers = {s.labels["tier"] for fam in text_string_to_metric_families(text) for s in fam.samples
             if s.name == "kvcluster:tier_hits_total"}
    assert {"host", "redis"} <= tiers


# ---- a worker dies with requests in flight (last: it takes w0 down) ------------------------------------

def test_killed_worker_loses_no_request(served, ray_client):
    import httpx

    n_tokens = 12

    async def streamed(c, i):
        body = {"messages": [{"role": "user", "content": f"Story {i}: " + DOCS[i % 3]}], "max_tokens": n_tokens,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        text, usage, finish = [], None, None
        async with c.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                d = json.loads(line[6:])
                assert "error" not in d, d
                if d.get("usage"):
                    usage = d
                elif d["choices"]:
                    text.append(d["choices"][0]["delta"].get("content") or "")
                    finish = d["choices"][0]["finish_reason"] or finish
        return "".join(text), usage, finish

    async def w0_busy(deadline_s: float = 90.0) -> None:
        # polled, not a fixed sleep: on a loaded 2-core machine a pinned request can take seconds
        # to reach the worker, and a kill before that loses nothing to retry
        end = time.time() + deadline_s
        while time.time() < end:
            stats = await asyncio.to_thread(ray_client.cluster_stats)
            if stats["router"]["scheduler"]["workers"]["w0"]["running"] >= 1:
                await asyncio.sleep(0.3)  # into its decode
                return
            await asyncio.sleep(0.1)
        raise AssertionError("no request reached w0 within the deadline")

    async def main():
        async with httpx.AsyncClient(base_url=served["base"], timeout=300,
                                     headers={"Authorization": "Bearer sk-test-alpha"}) as c:
            pinned = [ray_client.asubmit(f"Tell me about river number {i}. " + DOCS[i % 3], max_tokens=n_tokens,
                                         tenant=f"kill{i}", pin="w0") for i in range(3)]
            streams = [streamed(c, i) for i in range(2)]
            tasks = [asyncio.ensure_future(x) for x in pinned + streams]
            await w0_busy()  # w0 is in the middle of a pinned request
            await asyncio.to_thread(ray_client.kill_worker, "w0", True)
            return await asyncio.gather(*tasks)

    t0 = time.time()
    results = asyncio.run(main())
    subs, streams = results[:3], results[3:]
    for r in subs:  # each pinned request finished once, with all its tokens (none lost, none repeated)
        assert r.finish_reason in ("length", "stop")
        assert len(r.token_ids) == n_tokens or r.finish_reason == "stop"
    for text, usage, finish in streams:  # each stream: one finish, every token once
        assert usage is not None and text and finish in ("length", "stop")
        u = usage["usage"]
        assert u["completion_tokens"] == len(usage["kvcluster"]["token_ids"])
        assert u["completion_tokens"] == n_tokens or finish == "stop"
    stats = ray_client.cluster_stats()["router"]
    assert stats["retries"] >= 1 and stats["workers_lost"] == 1
    assert time.time() - t0 < 180
