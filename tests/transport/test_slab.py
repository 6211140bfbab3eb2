"""Host-tier slabs (transport/tiers/slab.py) and HostTier on top of them, on CPU."""
import pytest
import torch

from tests.transport.conftest import make_block, same_block
from transport.block import encode_block_bytes
from transport.tiers import HostTier
from transport.tiers.slab import FreeList, SlabPool, Slot, align_up, contiguous_runs


def test_free_list_first_fit_and_merge():
    fl = FreeList(1024)
    a, b, c = fl.alloc(256), fl.alloc(256), fl.alloc(256)
    assert (a, b, c) == (0, 256, 512) and fl.free_bytes == 256
    assert fl.alloc(512) is None
    fl.free(b, 256)                      # a hole in the middle
    assert fl.extents() == [(256, 256), (768, 256)]
    assert fl.alloc(128) == 256          # first fit: the hole
    fl.free(256, 128)
    fl.free(a, 256)                      # merges with the hole
    fl.free(c, 256)                      # merges both sides: one extent again
    assert fl.extents() == [(0, 1024)] and fl.largest == 1024
    with pytest.raises(ValueError):
        fl.free(0, 64)                   # double free


def test_pool_grows_lazily_up_to_max_slabs():
    pool = SlabPool(1024, max_slabs=2)
    assert pool.capacity == 0
    s1 = pool.alloc(1000)
    assert pool.capacity == 1024 and (s1.slab, s1.off, s1.span) == (0, 0, 1024)
    s2 = pool.alloc(100)
    assert s2.slab == 1 and s2.off == 0
    assert pool.alloc(1000) is None      # no room, no third slab
    assert pool.alloc(2048) is None      # bigger than a slab
    s1.view[:] = 7
    del s1.view  # (a Slot without view is never handed out; here: just drop the ref)


def test_released_slot_reused_only_when_unreferenced():
    pool = SlabPool(256, max_slabs=1)
    s = pool.alloc(256)
    reader = memoryview(s.view)          # what a CPU read hands out
    pool.release(s)
    assert pool.alloc(256) is None and pool.pending == 1  # still read: not reused
    del reader
    again = pool.alloc(256)
    assert again is not None and again.off == 0 and pool.pending == 0


def _slots(*spec):
    return [None if x is None else Slot(x[0], x[1], x[2], None) for x in spec]


def test_contiguous_runs():
    s = _slots((0, 0, 100), (0, 128, 64), (0, 192, 1), (1, 256, 64), (1, 320, 64), None,
               (1, 384, 64), (0, 0, 64))
    assert list(contiguous_runs(s)) == [(0, 3), (3, 5), (6, 7), (7, 8)]
    assert list(contiguous_runs(_slots((0, 128, 64), (0, 0, 128)))) == [(0, 1), (1, 2)]  # reversed
    assert list(contiguous_runs([])) == [] and list(contiguous_runs([None])) == []
    # a run stops before it would pass max_bytes (copies start before the rest is planned)
    four = _slots((0, 0, 64), (0, 64, 64), (0, 128, 64), (0, 192, 10))
    assert list(contiguous_runs(four, max_bytes=128)) == [(0, 2), (2, 4)]
    assert list(contiguous_runs(four, max_bytes=64)) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert align_up(1) == 64 and align_up(128) == 128


def _blocks(n, tokens=64, seed=0):
    return [(f"k{seed}-{i}", make_block(torch.bfloat16, layers=(0, 1), heads=2, tokens=tokens,
                                        head_dim=64, seed=seed * 1000 + i)) for i in range(n)]


def test_host_tier_packs_blocks_back_to_back_and_reads_in_one_copy(monkeypatch):
    tier = HostTier(1 << 20, pin=False, device_verify=True, slab_bytes=1 << 20)
    blocks = _blocks(6)
    tier.put_many(blocks)
    keys = [k for k, _ in blocks]
    slots = [tier._slots[k] for k in keys]
    assert list(contiguous_runs(slots)) == [(0, 6)]
    copies = []
    real = tier._copy_runs

    def counting(dev, sl, offs, **kw):
        copies.extend(contiguous_runs(sl))
        return real(dev, sl, offs, **kw)
    monkeypatch.setattr(tier, "_copy_runs", counting)
    got, _ = tier.get_many_to_device(keys, "cpu")
    assert copies == [(0, 6)]
    assert all(same_block(g, b) for g, (_, b) in zip(got, blocks))
    copies.clear()
    got, _ = tier.get_many_to_device([keys[0], keys[2], keys[3], "nope"], "cpu")
    assert copies == [(0, 1), (1, 3)] and got[-1] is None
    assert same_block(got[2], blocks[3][1])


def test_host_tier_eviction_stays_in_budget_and_reuses_space():
    size = len(encode_block_bytes(_blocks(1)[0][1]))
    budget = 5 * size
    tier = HostTier(budget, pin=False, device_verify=False, slab_bytes=align_up(size) * 3)
    for r in range(6):
        tier.put_many(_blocks(4, seed=r))
        assert tier.used_bytes <= budget and len(tier) <= 5
        assert tier._pool.capacity <= tier._pool.max_slabs * tier._pool.slab_bytes
    assert tier._pool.max_slabs == 3 and len(tier._pool.slabs) <= 3
    assert tier.stats.evictions == 24 - len(tier)
    last = _blocks(4, seed=5)
    got = tier.get_many([k for k, _ in last])
    assert all(g is not None and same_block(g, b) for g, (_, b) in zip(got, last))
    # every slot either in use or free: nothing leaked
    del got
    tier._pool.reclaim()
    in_use = sum(s.span for s in tier._slots.values())
    assert in_use + tier._pool.free_bytes == tier._pool.capacity


def test_fragmentation_evicts_further_by_lru():
    small = _blocks(4, tokens=8)
    s_small = align_up(len(encode_block_bytes(small[0][1])))
    tier = HostTier(4 * s_small, pin=False, device_verify=False, slab_bytes=4 * s_small)
    tier._pool.max_slabs = 1  # no slack: force the fragmentation path
    tier.put_many(small)
    tier.evict(small[0][0])
    tier.evict(small[2][0])              # two holes of one block each, not adjacent
    big = _blocks(1, tokens=16, seed=9)  # needs two adjacent blocks' room
    assert align_up(len(encode_block_bytes(big[0][1]))) <= 2 * s_small
    tier.put_many(big)
    assert tier.contains(big[0][0]) and len(tier) < 3
    got = tier.get_many([big[0][0]])[0]
    assert same_block(got, big[0][1])


def test_cpu_view_survives_eviction_and_reuse():
    blocks = _blocks(2)
    size = len(encode_block_bytes(blocks[0][1]))
    tier = HostTier(size, pin=False, device_verify=False, slab_bytes=align_up(size))
    tier._pool.max_slabs = 1
    tier.put_many(blocks[:1])
    held = tier.get_many([blocks[0][0]])[0]
    raw = tier.get_encoded_many([blocks[0][0]])[0]
    before = bytes(raw)
    tier.put_many(blocks[1:])            # evicts the first; its slot is still read
    assert tier.contains(blocks[1][0]) and not tier.contains(blocks[0][0])
    assert same_block(held, blocks[0][1]) and bytes(raw) == before
    assert same_block(tier.get_many([blocks[1][0]])[0], blocks[1][1])
    del held, raw
    tier.put_many(blocks[:1])            # now the old slot comes back
    assert tier._pool.pending == 0 and len(tier._pool.slabs) == 1


def test_block_bigger_than_a_slab_is_kept_on_its_own():
    blocks = _blocks(2)
    tier = HostTier(1 << 20, pin=False, device_verify=True, slab_bytes=4096)
    tier.put_many(blocks)
    assert not tier._slots
    got, sums = tier.get_many_to_device([k for k, _ in blocks], "cpu")
    assert all(same_block(g, b) for g, (_, b) in zip(got, blocks))


def test_device_read_out_of_order_groups_single_block_runs(monkeypatch):
    """Blocks read in reverse order are one copy each; they are verified in segments of several
    copies (one event each), and every block still comes back as stored."""
    from transport.tiers import host as host_mod
    monkeypatch.setattr(host_mod, "RUN_COPY_BYTES", 3 * 40_000)
    tier = HostTier(4 << 20, pin=False, device_verify=True, slab_bytes=1 << 20)
    blocks = _blocks(10, tokens=64)
    tier.put_many(blocks)
    keys = [k for k, _ in blocks][::-1]
    segments = []
    real = tier._copy_runs

    def recording(dev, sl, offs, **kw):
        out = real(dev, sl, offs, **kw)
        segments.extend((a, b) for a, b, _ in out)
        return out
    monkeypatch.setattr(tier, "_copy_runs", recording)
    got, sums = tier.get_many_to_device(keys, "cpu")
    assert all(same_block(g, b) for g, (_, b) in zip(got, blocks[::-1]))
    assert all(s is not None for s in sums)
    assert segments[0][0] == 0 and segments[-1][1] == 10 and 1 < len(segments) < 10
    assert all(p[1] == q[0] for p, q in zip(segments, segments[1:]))  # contiguous, no overlap
    assert tier.stats.corrupt == 0
