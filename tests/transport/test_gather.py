"""Host tier -> device in one buffer (transport/tiers/gather.py): the planning functions, and the
whole read path run with device='cpu' (the same code as on CUDA, minus the asynchrony)."""
import pytest
import torch

from tests.transport.conftest import make_block, same_block
from transport.block import encode_block_bytes
from transport.checksum import device_checksums
from transport.tiers import GPUTier, HostTier, TieredStore
from transport.tiers import gather


def test_plan_layout_aligns_every_block():
    offs, total = gather.plan_layout([100, 64, 1, 128])
    assert offs == [0, 128, 192, 256] and total == 384
    assert gather.plan_layout([]) == ([], 0)


def test_uniform_groups_split_on_kind_and_stride():
    offs = [0, 10, 20, 30, 45, 60, 70]
    kinds = ["a", "a", "a", "a", "a", "b", "b"]
    assert gather.uniform_groups(offs, kinds) == [(0, 4, 10), (4, 5, 0), (5, 7, 10)]
    assert gather.uniform_groups([0], ["a"]) == [(0, 1, 0)]
    assert gather.uniform_groups([], []) == []


def test_word_size_matches_transport_checksum():
    assert [gather.word_size(n) for n in (64, 12, 6, 3)] == [8, 4, 1, 1]


# (dtype, tokens, head_dim): 64-bit, 32-bit and byte words, a short last block, odd sizes
SHAPES = [(torch.bfloat16, 64, 64), (torch.bfloat16, 64, 64), (torch.bfloat16, 64, 64),
          (torch.bfloat16, 17, 64), (torch.float16, 1, 3), (torch.float32, 5, 1),
          (torch.float16, 1, 2), (torch.bfloat16, 64, 64), (torch.bfloat16, 64, 64)]


def _blocks():
    return [(f"k{i}", make_block(dt, layers=(0, 1), heads=2, tokens=t, head_dim=d, seed=i))
            for i, (dt, t, d) in enumerate(SHAPES)]


@pytest.mark.parametrize("gather_below", [0, 1 << 20], ids=["direct", "staged"])
def test_device_read_matches_blocks_and_checksums(gather_below):
    tier = HostTier(1 << 24, pin=False, device_verify=True, gather_below=gather_below)
    blocks = _blocks()
    tier.put_many(blocks)
    keys = [k for k, _ in blocks]
    got, sums = tier.get_many_to_device(keys + ["missing"], "cpu")
    assert got[-1] is None and sums[-1] is None
    for (_, b), g, s in zip(blocks, got, sums):
        assert same_block(g, b)
        assert g.keys.shape == b.keys.shape and g.keys.dtype == b.keys.dtype
        (ks, ko), (vs, vo) = device_checksums([b.keys, b.values])
        assert s == (ks, ko, vs, vo)
    # all of them views of one buffer
    ptrs = {g.keys.untyped_storage().data_ptr() for g in got[:-1]}
    assert len(ptrs) == 1
    assert tier.stats.hits == len(blocks) and tier.stats.misses == 1
    # the old entry point takes the same path
    again = tier.get_many(keys, device="cpu")
    assert all(same_block(g, b) for g, (_, b) in zip(again, blocks))


def test_group_checksums_equal_per_tensor_checksums():
    blocks = _blocks()
    bufs = [torch.frombuffer(bytearray(encode_block_bytes(b)), dtype=torch.uint8)
            for _, b in blocks]
    offs, total = gather.plan_layout([x.numel() for x in bufs])
    dev = torch.zeros(total, dtype=torch.uint8)
    for o, x in zip(offs, bufs):
        dev[o:o + x.numel()] = x
    tier = HostTier(1 << 24, pin=False, device_verify=True)
    lays = [tier._device_checksums(x.numpy()).layout for x in bufs]
    for a, b, stride in gather.uniform_groups(offs, [x.kind for x in lays]):
        got = gather.group_checksums(dev, offs[a], b - a, stride, lays[a])
        ks, vs = gather.group_views(dev, offs[a], b - a, stride, lays[a])
        for n in range(a, b):
            want = device_checksums([blocks[n][1].keys, blocks[n][1].values])
            assert gather.sums_equal(got[n - a:n - a + 1], [want]) == [True]
            assert torch.equal(ks[n - a], blocks[n][1].keys)
            assert torch.equal(vs[n - a], blocks[n][1].values)


def test_corrupt_payload_found_on_device_and_dropped():
    tier = HostTier(1 << 24, pin=False, device_verify=True)
    blocks = _blocks()
    tier.put_many(blocks)
    buf, ver = tier._lru.get("k1")
    bad = bytearray(buf)
    bad[-3] ^= 4
    tier._lru.put("k1", (bytes(bad), ver), len(bad))
    got, sums = tier.get_many_to_device([k for k, _ in blocks], "cpu")
    assert got[1] is None and sums[1] is None and tier.stats.corrupt == 1
    assert not tier.contains("k1")
    assert all(same_block(g, b) for n, (g, (_, b)) in enumerate(zip(got, blocks)) if n != 1)


def test_gpu_tier_adopts_owned_blocks_with_their_sums():
    gpu = GPUTier(1 << 24, device="cpu")
    host = HostTier(1 << 24, pin=False, device_verify=True)
    blocks = _blocks()
    host.put_many(blocks)
    got, sums = host.get_many_to_device([k for k, _ in blocks], "cpu")
    kept = gpu.put_many(list(zip([k for k, _ in blocks], got)), owned=True, sums=sums)
    assert all(k is g for k, g in zip(kept, got))  # no copy
    assert all(gpu._lru.get(k)[1] == s for (k, _), s in zip(blocks, sums))
    assert all(same_block(a, b) for a, (_, b) in zip(gpu.get_many([k for k, _ in blocks]), blocks))
    # not owned: copied, and checksums computed from the copies
    gpu2 = GPUTier(1 << 24, device="cpu")
    kept = gpu2.put_many(list(zip([k for k, _ in blocks], got)), sums=[None] * len(got))
    assert all(k is not g for k, g in zip(kept, got))
    assert all(gpu2._lru.get(k)[1] == s for (k, _), s in zip(blocks, sums))


def test_tiered_store_promotes_a_device_read_into_the_gpu_tier():
    store = TieredStore(GPUTier(1 << 24, device="cpu"),
                        HostTier(1 << 24, pin=False, device_verify=True))
    blocks = _blocks()
    store.host.put_many(blocks)
    keys = [k for k, _ in blocks]
    got = store.get_many(keys)
    assert all(same_block(g, b) for g, (_, b) in zip(got, blocks))
    assert all(store.gpu.contains(k) for k in keys)
    assert store.gpu.get_many(keys)[0] is got[0]  # adopted, not copied
    assert store.gpu.stats.corrupt == 0
    store.close()
