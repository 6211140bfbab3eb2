"""workers/tiered_store.py: the engine's SegmentStore over the tiers (tested here, beside them)."""
import numpy as np
import pytest
import torch

from transport.block import block_key
from transport.tiers import GPUTier, HostTier, TieredStore
from workers.segments import SegmentKV
from workers.tiered_store import TieredSegmentStore


def _segment(n_tokens=150, dtype=torch.bfloat16, layers=(0, 2, 5), seg_id="s1"):
    g = torch.Generator().manual_seed(n_tokens)
    shape = (len(layers), 3, n_tokens, 16)
    return SegmentKV(seg_id, "fp", np.arange(100, 100 + n_tokens, dtype=np.int64),
                     torch.randn(shape, generator=g).to(dtype),
                     torch.randn(shape, generator=g).to(dtype), layers, tenant="acme",
                     scope="public")


@pytest.mark.parametrize("n_tokens", [1, 64, 150])
def test_put_get_round_trip(n_tokens, redis_tier):
    store = TieredStore(GPUTier(8 << 20), HostTier(8 << 20), redis_tier)
    segs = TieredSegmentStore(store, "fp", block_tokens=64)
    seg = _segment(n_tokens)
    segs.put(seg)
    store.flush(10)
    got = segs.get("s1")
    assert torch.equal(got.keys, seg.keys) and torch.equal(got.values, seg.values)
    assert list(got.token_ids) == list(seg.token_ids)
    assert (got.layers, got.tenant, got.scope) == (seg.layers, "acme", "public")
    assert segs.contains("s1") and not segs.contains("other") and segs.get("other") is None

    # a fresh worker that has only Redis gets the same segment
    fresh = TieredSegmentStore(TieredStore(GPUTier(8 << 20), HostTier(8 << 20), redis_tier), "fp")
    assert torch.equal(fresh.get("s1").keys, seg.keys)
    assert segs.evict("s1") and segs.get("s1") is None and fresh.store.redis.get_many(
        [block_key("fp", "s1", 0)]) == [None]
    store.close()
    fresh.store.close()


@pytest.mark.parametrize("with_gpu_tier", [False, True])
def test_manifest_survives_a_device_verifying_host_tier(with_gpu_tier):
    """As on a GPU machine, where the host tier records device checksums of every block it
    stores: the segment's manifest is not a block and must be kept, not dropped as corrupt (it
    was, and no worker on a GPU ever found a segment it had stored). The manifest is read before
    any background write has run."""
    host = HostTier(8 << 20, pin=False, device_verify=True)
    store = TieredStore(GPUTier(8 << 20, device="cpu") if with_gpu_tier else None, host)
    segs = TieredSegmentStore(store, "fp", block_tokens=64)
    seg = _segment(150)
    segs.put(seg)
    assert segs._manifest("s1") is not None and host.stats.corrupt == 0
    store.flush(10)
    got = segs.get("s1")
    assert got is not None and torch.equal(got.keys, seg.keys) and host.stats.corrupt == 0
    store.close()


def test_missing_or_corrupt_block_gives_none():
    store = TieredStore(None, HostTier(8 << 20))
    segs = TieredSegmentStore(store, "fp")
    segs.put(_segment(150))
    store.flush(10)
    key = block_key("fp", "s1", 1)
    bad = bytearray(store.host._lru.get(key)[0])
    bad[-5] ^= 1  # corrupt one stored block
    store.host._lru.put(key, (bytes(bad), None), len(bad))
    assert segs.get("s1") is None and store.host.stats.corrupt == 1
    segs.put(_segment(150))
    store.flush(10)
    assert segs.get("s1") is not None
    store.evict(block_key("fp", "s1", 2))
    assert segs.get("s1") is None and not segs.contains("s1")
    store.close()


def test_blocks_of_other_tokens_are_refused():
    store = TieredStore(GPUTier(8 << 20), HostTier(8 << 20))
    segs = TieredSegmentStore(store, "fp")
    segs.put(_segment(150, seg_id="s1"))
    other = _segment(150, seg_id="s2")
    other.token_ids = other.token_ids + 1
    segs.put(other)
    store.flush(10)
    # swap a block of s2 under s1's key: same model and shape, other tokens
    store.gpu.put_many([(block_key("fp", "s1", 0), store.gpu.get_many([block_key("fp", "s2", 0)])[0])])
    assert segs.get("s1") is None and segs.bad_segments == 1
    store.close()


def test_wrong_model_refused_at_put():
    segs = TieredSegmentStore(TieredStore(GPUTier(1 << 20), HostTier(1 << 20)), "other-fp")
    with pytest.raises(ValueError):
        segs.put(_segment(10))
