"""A KV block corrupted in any tier (GPU, host, peer transfer, Redis) is never used: the checksum
catches it, the tier drops it and counts it (``kvcluster:tier_corrupt_total``), the KV comes from
another tier or is recomputed, and the request's output is what a full recompute gives."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from kvcluster.metrics import Metrics
from tests.reliability.conftest import flip
from transport.block import block_key
from transport.tiers import GPUTier, HostTier, TieredStore
from workers.segments import SegmentKV
from workers.tiered_store import TieredSegmentStore

PROMPT_A = ("Alpha report: the northern bridge was closed for repairs on Monday. Beta report: the harbour "
            "ferry runs every twenty minutes in summer. Gamma report: the museum opens late on Fridays. "
            "Question: what is closed?")
PROMPT_A2 = ("Gamma report: the museum opens late on Fridays. Alpha report: the northern bridge was closed "
             "for repairs on Monday. Beta report: the harbour ferry runs every twenty minutes in summer. "
             "Question: what is closed?")
PROMPT_C = ("Recipe notes: whisk four eggs with sugar until pale, fold in sifted flour, bake at one hundred "
            "eighty degrees for twenty five minutes, cool on a rack before slicing. Question: how long to bake?")
PROMPT_C2 = ("Recipe notes: fold in sifted flour after you whisk four eggs with sugar until pale, bake at one "
             "hundred eighty degrees for twenty five minutes, cool on a rack before slicing. Question: how hot?")


def _keys(w, sid):
    m = w.segments._manifest(sid)
    return [block_key(w.fingerprint, sid, i) for i in range(m["n_blocks"])]


def _corrupt_host(w, key):
    lru = w.tiers.host._lru
    buf, dsum = lru.get(key)
    bad = flip(memoryview(buf))
    lru.put(key, (bad, dsum), len(bad))


def _corrupt_redis(w, key, redis_proc):
    import redis
    r = redis.Redis(host="127.0.0.1", port=redis_proc.port)
    full = w.tiers.redis.prefix + key
    raw = r.get(full)
    assert raw is not None
    r.set(full, flip(raw))


def _corrupt_counts(workers) -> dict[tuple[str, str], float]:
    m = Metrics()
    m.set_worker_stats({w: x.stats() for w, x in workers.items()})
    text = m.render()[0].decode()
    out = {}
    for line in text.splitlines():
        g = re.match(r'kvcluster:tier_corrupt_total\{tier="(\w+)",worker="(\w+)"\} ([\d.e+]+)', line)
        if g:
            out[(g[2], g[1])] = float(g[3])
    return out


def test_corrupt_host_block_is_dropped_and_the_redis_copy_used(cluster):
    w0 = cluster.workers["w0"]
    r1 = cluster.run(cluster.request(PROMPT_A, pin="w0"))
    sid = r1["done"]["segment_id"]
    keys = _keys(w0, sid)
    before = w0.tiers.host.stats.corrupt
    _corrupt_host(w0, keys[0])
    r2 = cluster.run(cluster.request(PROMPT_A2, pin="w0"))
    assert w0.tiers.host.stats.corrupt == before + 1  # detected and counted
    assert sid in r2["prefill"]["donor_ids"] and r2["prefill"]["reused_tokens"] > 0  # good copy from Redis
    assert w0.tiers.redis.stats.hits >= 1
    # the Redis copy replaced the bad one in the host tier
    assert w0.tiers.host.get_many([keys[0]])[0] is not None
    assert _corrupt_counts(cluster.workers)[("w0", "host")] >= 1


def test_block_corrupt_everywhere_is_never_used_and_the_output_is_full_compute(cluster, redis_proc):
    w0, w1 = cluster.workers["w0"], cluster.workers["w1"]
    r1 = cluster.run(cluster.request(PROMPT_C, pin="w0"))
    sid = r1["done"]["segment_id"]
    key = _keys(w0, sid)[0]
    _corrupt_host(w0, key)               # what w0 serves to its peer
    _corrupt_redis(w0, key, redis_proc)  # the shared copy
    peer_before = w1.tiers.peer_stats.corrupt
    redis_before = w1.tiers.redis.stats.corrupt
    r2 = cluster.run(cluster.request(PROMPT_C2, pin="w1"))
    assert w1.tiers.peer_stats.corrupt == peer_before + 1    # a corrupt transfer is detected
    assert w1.tiers.redis.stats.corrupt == redis_before + 1  # and so is the corrupt Redis copy
    assert sid not in r2["prefill"]["donor_ids"]
    assert r2["prefill"]["reused_tokens"] == 0
    assert sid in r2["done"]["missing_donors"] or sid in r2["prefill"]["fetch"]["dropped"] + \
        r2["prefill"]["fetch"]["missing"]
    ref = cluster.run(cluster.request(PROMPT_C2, pin="w1", mode="full", reuse=False, write_back=False))
    assert r2["token_ids"] == ref["token_ids"]  # recomputed: exactly what a full prefill gives
    counts = _corrupt_counts(cluster.workers)
    assert counts[("w1", "peer")] >= 1 and counts[("w1", "redis")] >= 1


def test_checksum_valid_block_under_the_wrong_key_is_refused(cluster, redis_proc):
    """A block that passes its checksum but belongs to other tokens (swapped keys, a stale copy) is
    refused by the token hash in the manifest check."""
    import redis
    w0 = cluster.workers["w0"]
    text = PROMPT_A + " " + PROMPT_C  # long enough for 2+ blocks
    r1 = cluster.run(cluster.request(text, pin="w0", max_tokens=1))
    sid = r1["done"]["segment_id"]
    keys = _keys(w0, sid)
    assert len(keys) >= 2
    lru = w0.tiers.host._lru
    lru.put(keys[0], lru.get(keys[1]), len(memoryview(lru.get(keys[1])[0])))
    rc = redis.Redis(host="127.0.0.1", port=redis_proc.port)
    rc.set(w0.tiers.redis.prefix + keys[0], rc.get(w0.tiers.redis.prefix + keys[1]))
    bad = w0.segments.bad_segments
    assert w0.segments.get(sid) is None
    assert w0.segments.bad_segments == bad + 1


def _segment(fp="fp-int", n=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(2, 2, n, 8, generator=g)
    v = torch.randn(2, 2, n, 8, generator=g)
    return SegmentKV("seg", fp, np.arange(n, dtype=np.int32), k, v, (0, 1))


def test_gpu_tier_and_manifest_corruption():
    """The GPU tier (CPU tensors here) verifies with its device checksum; the manifest with xxh64."""
    gpu, host = GPUTier(1 << 20, device="cpu"), HostTier(1 << 20)
    store = TieredStore(gpu=gpu, host=host)
    segs = TieredSegmentStore(store, "fp-int", block_tokens=32)
    seg = _segment()
    segs.put(seg)
    assert store.flush(5)
    key = block_key("fp-int", "seg", 1)
    blk = gpu._lru.get(key)[0]
    blk.keys.view(-1)[3] += 1.0  # silent corruption of the GPU copy
    got = segs.get("seg")
    assert gpu.stats.corrupt == 1 and got is not None  # dropped; the host copy served
    assert torch.equal(got.keys, seg.keys) and torch.equal(got.values, seg.values)
    # now corrupt it in both tiers: the segment is refused
    gpu._lru.get(key)[0].values.view(-1)[0] += 1.0
    hbuf, dsum = host._lru.get(key)
    host._lru.put(key, (flip(memoryview(hbuf)), dsum), len(memoryview(hbuf)))
    assert segs.get("seg") is None
    assert gpu.stats.corrupt == 2 and host.stats.corrupt == 1
    # a corrupt manifest: refused before any block is read
    mkey = segs._manifest_key("seg")
    raw = host._lru.get(mkey)[0]
    host._lru.put(mkey, (flip(memoryview(raw), 20), None), len(memoryview(raw)))
    assert segs.get("seg") is None
    store.close()
