"""End to end through submit(): real SmolLM2, real embedded Qdrant (on disk, in tmp folders),
the real IndexService and the DHD engine. The model, tokenizer and embedder load once for the
module; each test builds its own cluster(s) over them."""
from __future__ import annotations

import asyncio
import logging
import threading

import pytest

import kvcluster
from kvcluster.client import EmbeddedClient
from kvcluster.config import ConfigError
from kvcluster.types import EmptyPromptError, InvalidRequestError, PromptTooLongError, UnknownScopeError
from kvcluster.workloads import heldout_paragraphs, split_sentences

pytestmark = pytest.mark.slow
MAX_TOKENS = 2


@pytest.fixture(scope="module")
def shared():
    from index_service.embedder import Embedder
    from workers.model_loader import load_runner, load_tokenizer
    emb = Embedder()
    emb.warmup()
    return {"runner": load_runner("smollm2-135m", dtype="float32", device="cpu"),
            "tokenizer": load_tokenizer("smollm2-135m"), "embedder": emb}


@pytest.fixture(scope="module")
def docs():
    """Three real Wikipedia lead paragraphs, cut to their first sentences (~50-70 tokens each)."""
    out = []
    for p in heldout_paragraphs(20, offset=0):
        keep = ""
        for sent in split_sentences(p):
            if len(keep) + len(sent) > 300:
                break
            keep = f"{keep} {sent}".strip()
        if len(keep) >= 150:
            out.append(keep)
    assert len(out) >= 3
    return out[:3]


def make(shared, path, **sections):
    from kvcluster.embedded import EmbeddedCluster
    cfg = {"index": {"qdrant_path": str(path)}, "model": {"max_context": 1024}, "serve": {"max_tokens_limit": 2048}}
    for k, v in sections.items():
        cfg.setdefault(k, {}).update(v)
    return EmbeddedCluster(cfg, **shared)


def qa(docs, order, question):
    body = "\n\n".join(f"Document {i + 1}: {docs[j]}" for i, j in enumerate(order))
    return f"Read the documents and answer.\n\n{body}\n\nQuestion: {question}"


def test_reordered_and_reworded_prompts_reuse_kv(shared, docs, tmp_path):
    with make(shared, tmp_path / "q") as c:
        donor = c.submit(qa(docs, [0, 1, 2], "What do these documents have in common?"), max_tokens=MAX_TOKENS)
        assert donor.source == "miss" and donor.cached_tokens == 0 and donor.segment_id
        # the same documents in another order: moved spans, found semantically
        r = c.submit(qa(docs, [2, 0, 1], "What do these documents have in common?"), max_tokens=MAX_TOKENS)
        assert r.source == "semantic", r
        assert r.cached_tokens > 0.5 * r.prompt_tokens and donor.segment_id in r.donor_ids
        assert r.recomputed_tokens > 0  # DHD repaired some of the reused tokens
        assert r.text and r.finish_reason in ("stop", "length") and r.ttft_s > 0
        # the question reworded and moved to the front: no common prefix beyond the template
        q = "Which topic do the documents share?\n\n" + "\n\n".join(docs)
        r2 = c.submit(q, max_tokens=MAX_TOKENS)
        assert r2.source == "semantic" and r2.cached_tokens > 0.4 * r2.prompt_tokens
        # the exact same prompt again: an exact prefix hit, nothing new stored
        r3 = c.submit(qa(docs, [2, 0, 1], "What do these documents have in common?"), max_tokens=MAX_TOKENS)
        assert r3.source == "prefix" and r3.segment_id is None
        assert r3.cached_tokens >= r3.prompt_tokens - 1 and r3.text == r.text
        assert c.stats["requests"] == 4 and c.stats["semantic"] == 2


def test_chat_messages_reworded_last_turn(shared, tmp_path):
    convo = [{"role": "system", "content": "You are a friendly chat partner. Keep replies short."},
             {"role": "user", "content": "Have you seen any good movies lately? I watched a documentary about the deep sea."},
             {"role": "assistant", "content": "Not yet, but I love ocean documentaries. Which one was it?"},
             {"role": "user", "content": "It was about anglerfish and the creatures living near hydrothermal vents."}]
    with make(shared, tmp_path / "q") as c:
        c.submit(convo, max_tokens=MAX_TOKENS)
        reworded = convo[:-1] + [{"role": "user", "content": "The film was about anglerfish and creatures near hydrothermal vents."}]
        r = c.submit(reworded, max_tokens=MAX_TOKENS)
        assert r.source in ("prefix", "semantic") and r.cached_tokens > 0.6 * r.prompt_tokens


def test_tenants_never_share_private_kv_but_share_public(shared, docs, tmp_path):
    with make(shared, tmp_path / "q") as c:
        secret = qa(docs, [0, 1], "Summarize document 1.")
        a = c.submit(secret, tenant="alice", max_tokens=MAX_TOKENS)
        # bob sends a reordered copy, eve the very same prompt: neither may touch alice's KV
        for tenant, prompt in (("bob", qa(docs, [1, 0], "Summarize document 1.")), ("eve", secret)):
            b = c.submit(prompt, tenant=tenant, max_tokens=MAX_TOKENS)
            assert b.source == "miss" and b.cached_tokens == 0 and b.recomputed_tokens == 0
            assert a.segment_id not in b.donor_ids
        # alice herself reuses it
        assert c.submit(secret, tenant="alice", max_tokens=MAX_TOKENS).source == "prefix"
        # a public segment is shared with every tenant, exactly and semantically
        pub = c.submit(qa(docs, [2, 1], "List the main facts."), tenant="alice", share="public", max_tokens=MAX_TOKENS)
        carol = c.submit(qa(docs, [2, 1], "List the main facts."), tenant="carol", max_tokens=MAX_TOKENS)
        assert carol.source == "prefix" and carol.donor_ids == [pub.segment_id]
        dave = c.submit(qa(docs, [1, 2], "List the main facts."), tenant="dave", max_tokens=MAX_TOKENS)
        assert dave.cached_tokens > 0 and pub.segment_id in dave.donor_ids
        # a cache salt separates even the same tenant's KV
        salted = c.submit(secret, tenant="alice", cache_salt="s1", max_tokens=MAX_TOKENS)
        assert salted.source == "miss"
        assert c.submit(secret, tenant="alice", cache_salt="s1", max_tokens=MAX_TOKENS).source == "prefix"


def test_restart_keeps_the_index_consistent_with_the_store(shared, docs, tmp_path, caplog):
    from index_service.service import IndexService
    path = tmp_path / "q"
    prompt = qa(docs, [0, 2], "What is document 2 about?")
    with make(shared, path) as c1:
        sid = c1.submit(prompt, max_tokens=MAX_TOKENS).segment_id
        assert sid and len(c1.index) == 1
    # the index persisted on disk: opened alone, it still offers the old segment as a donor...
    ix = IndexService(qdrant_path=str(path), embedder=shared["embedder"])
    plan = ix.lookup(shared["tokenizer"](prompt)["input_ids"], prompt, "default", shared["runner"].fingerprint)
    assert sid in plan.donor_ids or len(ix) == 1
    ix.close()
    # ...but a new process starts with an empty segment store, so its cluster drops it on start
    with caplog.at_level(logging.INFO, logger="kvcluster.embedded"):
        c2 = make(shared, path)
    with c2:
        assert len(c2.index) == 0 and c2.index.store.count() == 0
        assert "dropped 1 segments" in caplog.text
        r = c2.submit(prompt, max_tokens=MAX_TOKENS)
        assert r.source == "miss" and r.fallback is None and r.donor_ids == []
        assert len(c2.index) == 1 and c2.store.contains(r.segment_id)


def test_dangling_donor_falls_back_to_recompute(shared, docs, tmp_path, caplog):
    prompt = qa(docs, [1, 0], "Name one fact from each document.")
    with make(shared, tmp_path / "q") as c:
        first = c.submit(prompt, max_tokens=MAX_TOKENS)
        c.store.evict(first.segment_id, notify=False)  # KV gone, index entry left behind
        with caplog.at_level(logging.WARNING, logger="kvcluster.embedded"):
            r = c.submit(prompt, max_tokens=MAX_TOKENS)
        assert r.fallback and "DonorMissingError" in r.fallback and "recomputing" in caplog.text
        assert r.source == "miss" and r.cached_tokens == 0 and r.text == first.text
        assert first.segment_id not in c.index.table.ids()  # the dangling entry is gone
        # eviction through the store's budget removes the segment from the index too
        c.store.evict(r.segment_id)
        assert r.segment_id not in c.index.table.ids()


def test_unopenable_qdrant_still_answers(shared, docs, tmp_path, caplog):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the Qdrant folder should be")
    with caplog.at_level(logging.WARNING):
        c = make(shared, blocker)
    with c:
        r = c.submit(qa(docs, [0], "Who is this about?"), max_tokens=MAX_TOKENS)
        assert r.source == "miss" and r.text
        assert "Qdrant" in caplog.text
        r2 = c.submit(qa(docs, [0], "Who is it about?"), max_tokens=MAX_TOKENS)  # still no failure
        assert r2.text


def test_index_that_cannot_start_is_a_miss(shared, tmp_path, monkeypatch, caplog):
    import index_service.service as svc

    def broken(*a, **k):
        raise RuntimeError("index down")

    monkeypatch.setattr(svc, "IndexService", broken)
    with caplog.at_level(logging.WARNING, logger="kvcluster.embedded"):
        c = make(shared, tmp_path / "q")
    with c:
        assert c.index is None and "index down" in caplog.text
        for _ in range(2):
            r = c.submit("Tell me a fact about the sea.", max_tokens=MAX_TOKENS)
            assert r.source == "miss" and r.segment_id is None and r.text


def test_bad_inputs_on_a_running_cluster(shared, docs, tmp_path):
    with make(shared, tmp_path / "q") as c:
        client = EmbeddedClient(cluster=c)
        long_prompt = " ".join(docs * 12)  # ~1.5k tokens > the 1024-token context of these tests
        with pytest.raises(PromptTooLongError, match="context"):
            client.submit(long_prompt, max_tokens=4)
        fits = c.tokenize(docs[0])
        with pytest.raises(PromptTooLongError):
            client.submit(docs[0], max_tokens=1024 - len(fits) + 1)
        for bad, err in [(dict(prompt=""), EmptyPromptError), (dict(prompt="hi", share="all"), UnknownScopeError),
                         (dict(prompt=[{"role": "user", "content": 1}]), InvalidRequestError),
                         (dict(prompt="hi", max_tokens=0), InvalidRequestError)]:
            with pytest.raises(err):
                client.submit(**bad)
        assert c.stats["requests"] == 0
        assert client.submit(docs[0], max_tokens=2).prompt_tokens == len(fits)
    with pytest.raises(ConfigError, match=r"reuse\.check_layer"):
        make(shared, tmp_path / "q2", reuse={"check_layer": 40})


def test_module_submit_asubmit_and_threads(shared, docs, tmp_path):
    c = make(shared, tmp_path / "q")
    prev = kvcluster.set_default_client(EmbeddedClient(cluster=c))
    try:
        r = kvcluster.submit(docs[1], max_tokens=MAX_TOKENS, tenant="t1", share="public")
        assert r.tenant == "t1" and r.segment_id
        r2 = asyncio.run(kvcluster.asubmit(docs[1], max_tokens=MAX_TOKENS, tenant="t2"))
        assert r2.source == "prefix" and r.segment_id in r2.donor_ids
        out, errs = [], []

        def go(i):
            try:
                out.append(kvcluster.submit(f"{docs[2]}\n\nQuestion {i}: what is the first word?",
                                            max_tokens=2, tenant="t3"))
            except Exception as e:  # noqa: BLE001
                errs.append(e)

        threads = [threading.Thread(target=go, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errs and len(out) == 3 and all(o.text for o in out)
        # requests queue for the engine and look up under its lock: later ones reuse the first one's KV
        assert sum(o.cached_tokens > 0 for o in out) == 2
    finally:
        kvcluster.set_default_client(prev)
        c.close()
