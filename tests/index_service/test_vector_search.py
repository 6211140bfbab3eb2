"""The in-process cache must give the same top-k as Qdrant's exact filtered search."""
import numpy as np
import pytest

from index_service.prefix_index import owner_key
from index_service.qdrant_store import QdrantStore, SegmentMeta
from index_service.vector_cache import VectorCache


@pytest.fixture(scope="module")
def populated():
    rng = np.random.default_rng(0)
    n, dim = 600, 384
    vecs = rng.standard_normal((n, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    metas = [SegmentMeta(f"s{i}", ["fpA", "fpB"][i % 2], f"t{i % 5}", "public" if i % 7 == 0 else "private",
                         "" if i % 11 else "salty", 10, 0.0) for i in range(n)]
    store = QdrantStore(path=":memory:")
    assert store.upsert(metas, vecs)
    cache = VectorCache(dim)
    for m, v in zip(metas, vecs):
        cache.add(m.segment_id, v, m.fingerprint, m.salt, owner_key(m.tenant, m.scope == "public"))
    return store, cache, rng


@pytest.mark.parametrize("fp, tenant, salt", [("fpA", "t0", ""), ("fpB", "t3", ""), ("fpA", "t1", "salty"),
                                              ("fpA", "nobody", ""), ("fpC", "t0", "")])
def test_cache_matches_qdrant_exact(populated, fp, tenant, salt):
    store, cache, rng = populated
    for _ in range(5):
        q = rng.standard_normal(384).astype(np.float32)
        want = store.search(q, fp, tenant, salt, top_k=5)
        keys = [(fp, salt, owner_key(tenant, False)), (fp, salt, owner_key(tenant, True))]
        got = cache.search(q, keys, 5)
        assert [s for s, _ in got] == [s for s, _ in want]
        np.testing.assert_allclose([x for _, x in got], [x for _, x in want], atol=1e-5)


def test_cache_remove_and_replace():
    c = VectorCache(4)
    c.add("a", [1, 0, 0, 0], "fp", "", "t:x")
    c.add("b", [0, 1, 0, 0], "fp", "", "t:x")
    c.add("c", [0.9, 0.1, 0, 0], "fp", "", "t:x")
    c.remove("a")
    assert [s for s, _ in c.search([1, 0, 0, 0], [("fp", "", "t:x")], 3)] == ["c", "b"]
    c.add("b", [1, 0, 0, 0], "fp", "", "public")  # moved to another partition
    assert [s for s, _ in c.search([1, 0, 0, 0], [("fp", "", "t:x")], 3)] == ["c"]
    assert len(c) == 2
    assert c.search([1, 0, 0, 0], [("fp", "", "t:x")], 3, min_score=0.999) == []
