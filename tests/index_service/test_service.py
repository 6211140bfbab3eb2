import logging

import numpy as np
import pytest

from index_service.qdrant_store import QdrantStore
from index_service.service import SIDECAR, IndexService

from .texts import DOCS, QUESTION, tokens


@pytest.fixture
def svc(embedder):
    s = IndexService(qdrant_path=":memory:", embedder=embedder)
    yield s
    s.close()


def add_docs(s, sid="seg1", tenant="alice", scope="private", salt=None, docs=DOCS, fp="fp1"):
    text = " ".join(docs)
    assert s.add(sid, tokens(text), text, tenant, scope, fp, cache_salt=salt)
    return text


def test_reordered_prompt_finds_earlier(svc):
    add_docs(svc)
    add_docs(svc, sid="other", docs=["Completely unrelated: a recipe for bread with flour, water, salt and yeast."])
    new = " ".join([DOCS[2], DOCS[0], DOCS[3], DOCS[1], QUESTION])
    plan, tm = svc.lookup_timed(tokens(new), new, "alice", "fp1")
    assert plan.source == "semantic" and plan.donor_ids == ["seg1"]
    assert plan.reuse_rate > 0.85
    assert tm.candidates[0][0] == "seg1" and tm.embed_ms > 0 and tm.align_ms > 0


def test_reworded_prompt_finds_earlier(svc):
    add_docs(svc, docs=[DOCS[0]])
    add_docs(svc, sid="photo", docs=[DOCS[1]])
    reworded = ("Named after engineer Gustave Eiffel, whose company designed and built the tower from 1887 to "
                "1889, the Eiffel Tower is a lattice tower of wrought iron in Paris, France.")
    plan, tm = svc.lookup_timed(tokens(reworded), reworded, "alice", "fp1")
    assert tm.candidates[0][0] == "seg1"
    assert plan.donor_ids[:1] == ["seg1"] and plan.source == "semantic"


def test_exact_repeat_is_prefix_and_skips_search(svc):
    text = add_docs(svc)
    plan, tm = svc.lookup_timed(tokens(text), text, "alice", "fp1")
    assert plan.source == "prefix" and plan.prefix_len == plan.n_tokens and tm.embed_ms == 0


def test_tenants_isolated_public_shared(svc):
    add_docs(svc, sid="alice-private")
    add_docs(svc, sid="shared", tenant="bob", scope="public", docs=DOCS[::-1])
    text = " ".join(DOCS)
    plan = svc.lookup(tokens(text), text, "carol", "fp1")
    assert plan.donor_ids == ["shared"]  # never alice's private one, though it matches better
    svc.remove("shared")
    plan = svc.lookup(tokens(text), text, "carol", "fp1")
    assert plan.spans == [] and plan.source == "miss"
    assert svc.lookup(tokens(text), text, "alice", "fp1").donor_ids == ["alice-private"]
    assert svc.lookup(tokens(text), text, "alice", "other-model").source == "miss"


def test_cache_salt_separates(svc):
    text = add_docs(svc, salt="team-a")
    assert svc.lookup(tokens(text), text, "alice", "fp1").source == "miss"
    assert svc.lookup(tokens(text), text, "alice", "fp1", cache_salt="team-b").source == "miss"
    assert svc.lookup(tokens(text), text, "alice", "fp1", cache_salt="team-a").source == "prefix"
    new = " ".join(DOCS[::-1])
    assert svc.lookup(tokens(new), new, "alice", "fp1", cache_salt="team-b").source == "miss"
    assert svc.lookup(tokens(new), new, "alice", "fp1", cache_salt="team-a").source == "semantic"


def test_remove_and_reconcile(svc):
    add_docs(svc, sid="a")
    add_docs(svc, sid="b", docs=DOCS[:2])
    add_docs(svc, sid="c", docs=DOCS[2:])
    svc.remove("a")
    assert svc.reconcile(["b", "zzz"]) == ["c"]
    assert len(svc) == 1 and len(svc.cache) == 1 and svc.store.count() == 1
    new = " ".join(DOCS[::-1])
    assert svc.lookup(tokens(new), new, "alice", "fp1").donor_ids == ["b"]


def test_restart_same_path_consistent(embedder, tmp_path):
    s = IndexService(qdrant_path=str(tmp_path), embedder=embedder)
    add_docs(s, sid="keep")
    add_docs(s, sid="evict", docs=DOCS[:1])
    s.remove("evict")
    s.close()
    assert (tmp_path / SIDECAR).exists()
    # a point without donor tokens (a crash between writes, a failed delete) must not survive
    store = QdrantStore(path=str(tmp_path))
    from index_service.qdrant_store import SegmentMeta
    assert store.upsert([SegmentMeta("orphan", "fp1", "alice", "private", "", 3, 0.0)], embedder.embed([DOCS[0]]))
    store.close()

    s = IndexService(qdrant_path=str(tmp_path), embedder=embedder)
    try:
        assert len(s) == 1 and len(s.cache) == 1 and s.store.count() == 1
        new = " ".join(DOCS[::-1])
        plan = s.lookup(tokens(new), new, "alice", "fp1")
        assert plan.donor_ids == ["keep"]
        text = " ".join(DOCS)
        assert s.lookup(tokens(text), text, "alice", "fp1").source == "prefix"
        assert s.reconcile([]) == ["keep"]
    finally:
        s.close()
    s = IndexService(qdrant_path=str(tmp_path), embedder=embedder)
    assert len(s) == 0 and s.store.count() == 0
    s.close()


@pytest.mark.parametrize("where", ["file", "closed-port"])
def test_unopenable_qdrant_is_a_miss(embedder, tmp_path, caplog, where):
    if where == "file":
        f = tmp_path / "not-a-dir"
        f.write_text("x")
        kw = {"qdrant_path": str(f)}
    else:
        kw = {"qdrant_url": "http://127.0.0.1:9", "sidecar_path": str(tmp_path / "side.sqlite")}
    with caplog.at_level(logging.WARNING):
        s = IndexService(embedder=embedder, **kw)
        text = " ".join(DOCS)
        assert s.add("s", tokens(text), text, "alice", "private", "fp1") is False
        new = " ".join(DOCS[::-1])
        for _ in range(3):
            plan = s.lookup(tokens(new), new, "alice", "fp1")
            assert plan.source == "miss" and plan.spans == []
        s.remove("s")
        s.close()
    warnings = [r for r in caplog.records if r.name == "index_service.qdrant_store"]
    assert len(warnings) == 1  # one warning, not one per call


@pytest.mark.parametrize("kwargs, exc", [
    ({"tokens": []}, ValueError),
    ({"tokens": "abc"}, TypeError),
    ({"tokens": [1.5]}, TypeError),
    ({"tenant": ""}, ValueError),
    ({"tenant": 3}, TypeError),
    ({"fingerprint": None}, TypeError),
    ({"text": 5}, TypeError),
    ({"cache_salt": 5}, TypeError),
    ({"top_k": -1}, ValueError),
])
def test_lookup_bad_input(svc, kwargs, exc):
    args = {"tokens": [1, 2, 3], "text": "hi", "tenant": "t", "fingerprint": "fp"} | kwargs
    with pytest.raises(exc):
        svc.lookup(**args)


def test_add_bad_input(svc):
    with pytest.raises(ValueError):
        svc.add("s", [], "x", "t", "private", "fp")
    with pytest.raises(ValueError):
        svc.add("s", [1, 2], "x", "t", "shared", "fp")
    with pytest.raises(TypeError):
        svc.add(5, [1, 2], "x", "t", "private", "fp")
    with pytest.raises(ValueError):
        svc.add("s", [1, 2], "x", "t", "private", "fp", vector=np.zeros(3))


def test_add_many_with_vectors(svc, embedder):
    vecs = embedder.embed(DOCS)
    n = svc.add_many({"segment_id": f"d{i}", "token_ids": tokens(d), "tenant": "t", "scope": "private",
                      "fingerprint": "fp", "vector": v} for i, (d, v) in enumerate(zip(DOCS, vecs)))
    assert n == 4
    plan, tm = svc.lookup_timed(tokens(DOCS[2]), DOCS[2], "t", "fp")
    assert plan.source == "prefix" and plan.donor_ids == ["d2"]
    q = DOCS[3] + " " + DOCS[1]
    plan, tm = svc.lookup_timed(tokens(q), q, "t", "fp")
    assert set(plan.donor_ids) == {"d3", "d1"} and plan.reuse_rate == 1.0
