import threading

import pytest
import torch

from tests.transport.conftest import make_block, same_block
from transport.block import encode_block_bytes
from transport.channels.inproc import InProcessChannel
from transport.tiers import GPUTier, HostTier, TieredStore

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [(1, 8), (64, 64), (64, 128)]  # (tokens, head_dim): 1 KiB .. 128 KiB blocks


def _tiers(redis_tier):
    return {"gpu": GPUTier(64 << 20), "host": HostTier(64 << 20), "redis": redis_tier}


@pytest.mark.parametrize("tier_name", ["gpu", "host", "redis"])
def test_round_trip_every_tier(tier_name, redis_tier):
    tier = _tiers(redis_tier)[tier_name]
    items = [(f"b{i}-{j}", make_block(dt, tokens=t, head_dim=d, seed=10 * i + j))
             for i, dt in enumerate(DTYPES) for j, (t, d) in enumerate(SIZES)]
    tier.put_many(items)
    got = tier.get_many([k for k, _ in items] + ["missing"])
    assert got[-1] is None
    for (_, want), have in zip(items, got):
        assert same_block(have, want)
    assert tier.stats.hits == len(items) and tier.stats.misses == 1
    assert tier.contains(items[0][0]) and not tier.contains("missing")
    assert tier.evict(items[0][0]) and not tier.contains(items[0][0])


@pytest.mark.parametrize("cls", [GPUTier, HostTier])
def test_lru_keeps_budget(cls):
    blk = make_block()  # 8 KiB keys + 8 KiB values
    budget = 5 * 17 << 10
    tier = cls(budget)
    for i in range(20):
        tier.put_many([(f"k{i}", blk)])
        assert tier.used_bytes <= budget
        tier.get_many(["k0"])  # k0 stays recently used, so it survives
    assert tier.contains("k0") and tier.contains("k19") and not tier.contains("k1")
    assert tier.stats.evictions >= 14
    big = make_block(tokens=64, head_dim=1024)
    tier.put_many([("big", big)])
    assert not tier.contains("big") and tier.stats.dropped_writes == 1


def test_gpu_tier_copies_and_detects_corruption():
    tier = GPUTier(1 << 20)
    blk = make_block()
    tier.put_many([("a", blk)])
    blk.keys.zero_()  # the caller reusing its buffer must not change what the tier holds
    stored = tier.get_many(["a"])[0]
    assert stored.keys.abs().sum() > 0
    stored.values.view(-1)[5] += 1.0  # corrupt the tier's copy in place
    assert tier.get_many(["a"]) == [None]
    assert tier.stats.corrupt == 1 and not tier.contains("a")


def test_gpu_tier_keeps_a_put_in_shared_buffers_and_still_finds_the_one_bad_block(monkeypatch):
    import transport.checksum as checksum
    import transport.tiers.gpu as gpu
    monkeypatch.setattr(gpu, "SLAB_BYTES", 3 * make_block().nbytes)  # 3 blocks a buffer
    tier = GPUTier(1 << 20)
    blocks = [make_block(seed=i) for i in range(7)] + [make_block(tokens=5, seed=9)]  # last: shorter
    tier.put_many([(f"b{i}", b) for i, b in enumerate(blocks)])
    got = tier.get_many([f"b{i}" for i in range(8)])
    assert all(same_block(h, w) for h, w in zip(got, blocks))
    storages = [h.keys.untyped_storage().data_ptr() for h in got]
    assert len(set(storages[:3])) == 1 and len(set(storages[3:6])) == 1 and len(set(storages)) == 4
    runs = []
    real = checksum.strided_runs
    monkeypatch.setattr(checksum, "strided_runs", lambda ts: runs.append(real(ts)) or runs[-1])
    got[4].keys.view(-1)[3] += 1.0  # one block in the middle of a shared buffer
    again = tier.get_many([f"b{i}" for i in range(8)])
    assert [i for i, h in enumerate(again) if h is None] == [4]
    assert [b - a for a, b, _ in runs[-1]] == [3, 3, 1, 1] * 2  # keys, then values: 8 runs for 16 tensors
    assert tier.stats.corrupt == 1


def test_host_tier_detects_corruption():
    tier = HostTier(1 << 20)
    buf = bytearray(encode_block_bytes(make_block()))
    buf[-3] ^= 0x40
    tier.put_encoded_many([("a", buf)])
    assert tier.get_many(["a"]) == [None]
    assert tier.stats.corrupt == 1 and not tier.contains("a")


def test_redis_tier_detects_corruption_and_evicts(redis_tier):
    buf = bytearray(encode_block_bytes(make_block()))
    buf[100] ^= 1
    redis_tier.put_encoded_many([("bad", buf)])
    assert redis_tier.contains("bad")
    assert redis_tier.get_many(["bad"]) == [None]
    assert redis_tier.stats.corrupt == 1 and redis_tier.stats.misses == 1
    assert not redis_tier.contains("bad")


def test_fingerprint_mismatch_is_a_counted_miss():
    tier = HostTier(1 << 20, expected_fingerprint="model-A")
    tier.put_many([("a", make_block(fingerprint="model-B"))])
    assert tier.get_many(["a"]) == [None] and tier.stats.corrupt == 1


def test_oversized_block_dropped(redis_tier):
    redis_tier.max_block_bytes = 1024
    redis_tier.put_many([("big", make_block())])
    assert redis_tier.stats.dropped_writes == 1 and not redis_tier.contains("big")
    host = HostTier(1 << 20, max_block_bytes=1024)
    host.put_many([("big", make_block())])
    assert host.stats.dropped_writes == 1


def test_tiered_store_read_order_and_promotion(redis_tier):
    writer = TieredStore(GPUTier(1 << 20), HostTier(1 << 20), redis_tier)
    blocks = {f"k{i}": make_block(torch.bfloat16, seed=i) for i in range(4)}
    writer.put_many(list(blocks.items()))
    assert writer.flush(10)
    assert all(redis_tier.contains(k) for k in blocks)

    # a second worker: empty GPU/host, the first worker's host tier as its peer, then Redis
    peer_src = writer.host
    reader = TieredStore(GPUTier(1 << 20), HostTier(1 << 20), redis_tier,
                         peer=InProcessChannel(lambda ks: peer_src.get_encoded_many(ks)))
    peer_src.evict("k3")  # k3 only in Redis now
    got = reader.get_many(["k0", "k3", "nope"])
    assert same_block(got[0], blocks["k0"]) and same_block(got[1], blocks["k3"]) and got[2] is None
    s = reader.stats()
    assert s["peer"]["hits"] == 1 and s["redis"]["hits"] == 1 and s["redis"]["misses"] == 1
    # promoted: the next read is served by the GPU tier
    assert reader.get_many(["k0", "k3"])[0] is not None
    assert reader.stats()["gpu"]["hits"] == 2 and reader.host.contains("k3")
    writer.close()
    reader.close()


def test_tiered_store_corrupt_peer_block_is_a_miss():
    good = make_block()
    bad = bytearray(encode_block_bytes(good))
    bad[-1] ^= 0x80
    store = TieredStore(GPUTier(1 << 20), HostTier(1 << 20), peer=lambda ks: [bad for _ in ks])
    assert store.get_many(["x"]) == [None]
    assert store.peer_stats.corrupt == 1 and not store.host.contains("x")
    store.close()


def test_tiered_store_peer_failure_is_a_miss():
    def broken(keys):
        raise ConnectionResetError("peer gone")
    store = TieredStore(GPUTier(1 << 20), peer=broken)
    assert store.get_many(["x"]) == [None] and store.peer_stats.errors == 1


def test_write_queue_full_drops_and_counts():
    host = HostTier(1 << 20)
    store = TieredStore(None, host, write_queue=2)
    gate = threading.Event()
    original = store._write_batch
    store._write_batch = lambda batch: (gate.wait(5), original(batch))
    store.put_many([(f"k{i}", make_block(seed=i)) for i in range(10)])
    assert store.write_dropped >= 5  # the writer holds a batch, 2 wait in the queue
    gate.set()
    assert store.flush(10)
    assert len(host) + store.write_dropped == 10
    store.close()


def test_evict_removes_from_all_tiers(redis_tier):
    store = TieredStore(GPUTier(1 << 20), HostTier(1 << 20), redis_tier)
    store.put_many([("a", make_block())])
    store.flush(10)
    assert store.contains("a")
    assert store.evict("a")
    assert not store.contains("a") and store.get_many(["a"]) == [None]
    store.close()


def test_host_tier_device_verify_path():
    """The host -> GPU read path verifies on the device; exercised here with device='cpu'."""
    tier = HostTier(1 << 20, device_verify=True)
    blocks = [(f"k{i}", make_block(dt, seed=i)) for i, dt in enumerate(DTYPES)]
    tier.put_many(blocks)
    got = tier.get_many([k for k, _ in blocks], device="cpu")
    assert all(same_block(g, b) for g, (_, b) in zip(got, blocks))
    buf, dsum = tier._lru.get("k1")
    bad = bytearray(buf)
    bad[-7] ^= 0x02  # payload corruption after the block was stored
    tier._lru.put("k1", (bytes(bad), dsum), len(bad))
    assert tier.get_many(["k0", "k1"], device="cpu")[1] is None
    assert tier.stats.corrupt == 1 and not tier.contains("k1")
    bad = bytearray(encode_block_bytes(make_block()))
    bad[-1] ^= 1
    tier.put_encoded_many([("bad", bad)])  # refused at put: checksums are taken from good data only
    assert not tier.contains("bad") and tier.stats.corrupt == 2


def test_redis_put_stores_the_same_bytes_without_joining(redis_tier):
    """put_many sends the header and the tensors' own memory (no joined copy); Redis must hold
    exactly the encoded block, for contiguous blocks, segment views and blocks of any size."""
    seg = make_block(torch.bfloat16, tokens=128, head_dim=128, seed=3)
    view = type(seg)(seg.fingerprint, seg.layers, 7, seg.keys[:, :, 64:], seg.values[:, :, 64:])
    items = [("big", make_block(torch.float16, tokens=64, head_dim=256, seed=1)),  # 128 KiB parts
             ("small", make_block(tokens=1, head_dim=8, seed=2)),  # every part below SMALL_PART
             ("view", view)]  # not contiguous: _byte_view copies it
    redis_tier.put_many(items)
    raw = redis_tier.get_encoded_many([k for k, _ in items])
    assert raw == [encode_block_bytes(b) for _, b in items]
    assert redis_tier.stats.bytes_in == sum(len(r) for r in raw)
    for (_, want), have in zip(items, redis_tier.get_many([k for k, _ in items])):
        assert same_block(have, want)


def test_redis_put_encoded_takes_any_buffer(redis_tier):
    import numpy as np
    enc = encode_block_bytes(make_block(tokens=64, head_dim=128))
    bufs = {"bytes": enc, "bytearray": bytearray(enc), "memoryview": memoryview(enc),
            "numpy": np.frombuffer(enc, dtype=np.uint8)}
    redis_tier.put_encoded_many(list(bufs.items()))
    assert redis_tier.get_encoded_many(list(bufs)) == [enc] * len(bufs)


def test_gather_packer_matches_redis_py_packing():
    """A Gather argument goes out as the same RESP bytes as the joined value would."""
    from redis.connection import HiredisRespSerializer

    from transport.tiers.redis_tier import SMALL_PART, Gather, GatherPacker

    inner = HiredisRespSerializer()
    packer = GatherPacker(inner)
    parts = [b"head", bytes(range(256)) * (SMALL_PART // 128), b"", b"tail" * 3]
    joined = b"".join(parts)
    out = packer.pack("SET", "k\u00e9y", Gather(parts), "EX", 60)
    assert b"".join(bytes(c) for c in out) == b"".join(inner.pack("SET", "k\u00e9y", joined, "EX", 60))
    assert any(isinstance(c, memoryview) for c in out)  # the big part is not copied
    assert packer.pack("GET", "k") == inner.pack("GET", "k")  # other commands: redis-py's packer
