import numpy as np
import pytest

from index_service.prefix_index import PrefixIndex


def toks(n, seed=0):
    return np.random.default_rng(seed).integers(0, 32000, n).tolist()


def test_longest_prefix_full_blocks_and_tail():
    idx = PrefixIndex(block_tokens=16)
    a = toks(100)
    idx.add("a", a, "alice", "fp")
    assert idx.longest_prefix(a, "alice", "fp") == ("a", 100)  # exact repeat, partial last block
    assert idx.longest_prefix(a + [1, 2], "alice", "fp") == ("a", 100)
    assert idx.longest_prefix(a[:40] + [7] * 60, "alice", "fp") == ("a", 32)  # block granularity
    assert idx.longest_prefix(a[:99] + [a[99] + 1], "alice", "fp") == ("a", 99)  # tail compared per token
    assert idx.longest_prefix([5] + a[1:], "alice", "fp") == (None, 0)
    assert idx.longest_prefix(a[:10], "alice", "fp") == (None, 0)  # shorter than a block, not a tail


def test_short_segment_tail_at_root():
    idx = PrefixIndex(block_tokens=64)
    idx.add("s", [1, 2, 3, 4, 5], "t", "fp")
    assert idx.longest_prefix([1, 2, 3, 4, 5, 6], "t", "fp") == ("s", 5)
    assert idx.longest_prefix([1, 2, 3, 9], "t", "fp") == ("s", 3)


def test_tenants_public_fingerprint_salt():
    idx = PrefixIndex(block_tokens=8)
    a, b = toks(64, 1), toks(64, 2)
    idx.add("priv", a, "alice", "fp")
    idx.add("pub", b, "alice", "fp", public=True)
    idx.add("salted", a, "carol", "fp", cache_salt="s1")
    assert idx.longest_prefix(a, "alice", "fp") == ("priv", 64)
    assert idx.longest_prefix(a, "bob", "fp") == (None, 0)
    assert idx.longest_prefix(b, "bob", "fp") == ("pub", 64)
    assert idx.longest_prefix(a, "alice", "other-model") == (None, 0)
    assert idx.longest_prefix(a, "carol", "fp") == (None, 0)
    assert idx.longest_prefix(a, "carol", "fp", cache_salt="s2") == (None, 0)
    assert idx.longest_prefix(a, "carol", "fp", cache_salt="s1") == ("salted", 64)
    assert idx.longest_prefix(b, "bob", "fp", cache_salt="s1") == (None, 0)


def test_tenant_named_public_is_not_public_scope():
    idx = PrefixIndex(block_tokens=8)
    a = toks(32)
    idx.add("x", a, "public", "fp")
    assert idx.longest_prefix(a, "bob", "fp") == (None, 0)


def test_remove_keeps_shared_prefix_of_others():
    idx = PrefixIndex(block_tokens=8)
    a = toks(64)
    idx.add("a", a, "t", "fp")
    idx.add("b", a[:32] + toks(20, 5), "t", "fp")
    idx.remove("a")
    assert idx.longest_prefix(a, "t", "fp") == ("b", 32)
    idx.remove("b")
    assert idx.longest_prefix(a, "t", "fp") == (None, 0)
    assert len(idx) == 0 and not idx._blocks and not idx._tails
    idx.remove("never-added")


def test_readd_replaces():
    idx = PrefixIndex(block_tokens=8)
    a, b = toks(40, 1), toks(40, 2)
    idx.add("s", a, "t", "fp")
    idx.add("s", b, "t", "fp")
    assert idx.longest_prefix(a, "t", "fp") == (None, 0)
    assert idx.longest_prefix(b, "t", "fp") == ("s", 40)


def test_bad_input():
    idx = PrefixIndex()
    with pytest.raises(ValueError):
        idx.add("s", [], "t", "fp")
    with pytest.raises(TypeError):
        idx.longest_prefix("abc", "t", "fp")
    with pytest.raises(ValueError):
        PrefixIndex(0)
