"""The Redis tier's hand-parsed GET replies: real Redis for the tier, a chunking fake socket for
the parser's framing (replies cut at every possible byte boundary)."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.transport.conftest import make_block, same_block
from transport.block import encode_block_bytes
from transport.errors import ProtocolError
from transport.receive import POOL
from transport.tiers.redis_read import TOO_LARGE, VERIFY_FROM, ReplyError, RespReader
from transport.verify import channel_verified


def big_block(seed: int = 0):
    # 2 layers x 4 heads x 64 tokens x 256 dims x 4 B x 2 = 1 MiB: verified as it arrives
    return make_block(torch.float32, heads=4, head_dim=256, seed=seed)


def test_values_arrive_verified_and_equal(redis_tier):
    items = [(f"k{i}", big_block(i)) for i in range(4)] + [("small", make_block(seed=9))]
    redis_tier.put_many(items)
    raws = redis_tier.get_encoded_many([k for k, _ in items] + ["absent"])
    assert raws[-1] is None
    for (_, blk), raw in zip(items, raws):
        assert bytes(raw) == bytes(encode_block_bytes(blk))
        assert memoryview(raw).nbytes < VERIFY_FROM or channel_verified(raw)
        assert np.frombuffer(raw, dtype=np.uint8).ctypes.data % 64 == 0  # tensors decode aligned
    for (_, blk), got in zip(items, redis_tier.get_many([k for k, _ in items])):
        assert same_block(blk, got)
    assert redis_tier.stats.corrupt == 0


def test_values_of_one_call_share_a_pooled_buffer(redis_tier):
    items = [(f"k{i}", big_block(i)) for i in range(3)]
    redis_tier.put_many(items)
    redis_tier.get_encoded_many([k for k, _ in items])  # learns the value size
    raws = redis_tier.get_encoded_many([k for k, _ in items])
    bases = {id(root(memoryview(r).obj)) for r in raws}
    assert len(bases) == 1
    assert any(b is root(memoryview(raws[0]).obj) for b in POOL._bufs)


def root(arr):
    while arr.base is not None:
        arr = arr.base
    return arr


def test_corrupt_large_block_is_a_miss_counted_and_evicted(redis_tier):
    raw = bytearray(encode_block_bytes(big_block()))
    raw[len(raw) // 2] ^= 0x10
    redis_tier.client.set(redis_tier.prefix + "bad", bytes(raw))
    assert redis_tier.get_many(["bad"]) == [None]
    assert redis_tier.stats.corrupt == 1
    assert not redis_tier.client.exists(redis_tier.prefix + "bad")


def test_oversized_value_is_dropped_and_the_connection_stays_usable(redis_tier):
    redis_tier.max_block_bytes = 64 << 10
    blk = make_block(seed=1)
    redis_tier.put_many([("ok", blk)])
    redis_tier.client.set(redis_tier.prefix + "huge", b"x" * (1 << 20))
    got = redis_tier.get_many(["huge", "ok"])
    assert got[0] is None and same_block(blk, got[1])
    assert redis_tier.stats.corrupt == 1 and redis_tier.is_up


def test_error_reply_is_a_miss_and_the_tier_stays_up(redis_tier):
    blk = make_block(seed=2)
    redis_tier.put_many([("ok", blk)])
    redis_tier.client.lpush(redis_tier.prefix + "list", b"x")  # GET on a list: WRONGTYPE
    got = redis_tier.get_many(["list", "ok"])
    assert got[0] is None and same_block(blk, got[1])
    assert redis_tier.stats.errors == 1 and redis_tier.is_up


def test_non_block_values_pass_through(redis_tier):
    redis_tier.client.set(redis_tier.prefix + "manifest", b"not a block")
    assert bytes(redis_tier.get_encoded_many(["manifest"])[0]) == b"not a block"


def test_concurrent_readers_get_their_own_values(redis_tier):
    items = [(f"k{i}", big_block(i)) for i in range(4)]
    redis_tier.put_many(items)
    errors = []

    def reader(i: int) -> None:
        for _ in range(5):
            got = redis_tier.get_many([items[i][0]])[0]
            if got is None or not same_block(items[i][1], got):
                errors.append(i)
    threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert errors == []


# -- the parser alone, on a socket that delivers the replies in given chunks ---------------------
class ChunkSocket:
    def __init__(self, data: bytes, cuts: list[int]) -> None:
        self.data, self.pos = data, 0
        self.cuts = sorted(c for c in set(cuts) if 0 < c < len(data)) + [len(data)]

    def recv_into(self, mv: memoryview) -> int:
        if self.pos >= len(self.data):
            return 0
        nxt = next(c for c in self.cuts if c > self.pos)
        n = min(nxt - self.pos, mv.nbytes)
        mv[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        return n


BLOCK = bytes(encode_block_bytes(make_block(seed=3)))
BIG = bytes(encode_block_bytes(big_block(4)))
REPLIES = (b"$%d\r\n%b\r\n" % (len(BLOCK), BLOCK) + b"$-1\r\n" + b"-WRONGTYPE no\r\n"
           + b"$%d\r\n%b\r\n" % (len(BIG), BIG) + b"$5\r\nhello\r\n")


def read_all(data: bytes, cuts: list[int], max_bytes: int = 64 << 20) -> list:
    r = RespReader(ChunkSocket(data, cuts))
    return [r.get_reply(max_bytes, verify=True) for _ in range(5)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, len(REPLIES)), max_size=12))
def test_parser_is_indifferent_to_how_replies_are_cut(cuts):
    a, nil, err, b, plain = read_all(REPLIES, cuts)
    assert bytes(a) == BLOCK and bytes(b) == BIG and bytes(plain) == b"hello"
    assert nil is None and isinstance(err, ReplyError) and "WRONGTYPE" in err.message
    assert channel_verified(b)


def test_parser_rejects_what_get_never_answers():
    with pytest.raises(ProtocolError):
        read_all(b"*2\r\n$1\r\na\r\n$1\r\nb\r\n", [])
    with pytest.raises(ProtocolError):
        read_all(b"$3\r\nabcXY", [])  # no CRLF after the value
    with pytest.raises(ProtocolError):
        read_all(b"$x\r\n", [])
    with pytest.raises(ProtocolError):
        read_all(b"+" + b"a" * 5000, [])  # a line that never ends
    with pytest.raises(ConnectionError):
        read_all(b"$10\r\nabc", [])  # closed in the middle of a value


def test_parser_skips_a_value_over_the_limit():
    r = RespReader(ChunkSocket(b"$%d\r\n%b\r\n$5\r\nhello\r\n" % (len(BIG), BIG), [7, 70000]))
    assert r.get_reply(1 << 16, verify=True) is TOO_LARGE
    assert bytes(r.get_reply(1 << 16, verify=True)) == b"hello"


def test_parser_hands_a_corrupt_block_out_unmarked():
    bad = bytearray(BIG)
    bad[len(bad) // 2] ^= 1
    r = RespReader(ChunkSocket(b"$%d\r\n%b\r\n" % (len(bad), bytes(bad)), []))
    got = r.get_reply(64 << 20, verify=True)
    assert isinstance(got, bytes) and not channel_verified(got)
