"""Property tests of every decoder a KV block or a message passes through on its way in: the tiers'
read paths (host, peer, Redis-shaped raw bytes), the segment manifest, the message framing, and a
live TCP block server and client fed garbage. 3,000 + 2,500 + 1,500 + 1,500 + 1,000 + 1,000 =
10,500 cases by default (``KVREL_FUZZ_SCALE=4`` runs 42,000): 0 crashes (only typed errors or a
miss), 0 hangs (each case under a 2 s deadline), and no damaged block is ever returned as data.

Complements tests/transport/test_fuzz.py (12,000 cases on decode_block and the message header)."""
from __future__ import annotations

import socket
import struct

import msgpack
import numpy as np
import pytest
import torch
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from transport.block import KVBlock, encode_block_bytes
from transport.channels.tcp import TCPClient, TCPServer
from transport.errors import ChannelError, ProtocolError
from transport.message import PREFIX, pack_message, parse_header, parse_prefix, split_body
from transport.tiers import HostTier, TieredStore
from workers.tiered_store import TieredSegmentStore
from workers.segments import SegmentKV

import os

FAST = dict(deadline=2000, suppress_health_check=list(HealthCheck), database=None)
SCALE = float(os.environ.get("KVREL_FUZZ_SCALE", "1"))


def n(cases: int) -> int:
    return max(1, int(cases * SCALE))


def _block(dtype, tokens, seed):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(2, 2, tokens, 8, generator=g).to(dtype)
    v = torch.randn(2, 2, tokens, 8, generator=g).to(dtype)
    return KVBlock("fp-fuzz", (0, 1), seed, k, v)


BLOCKS = [encode_block_bytes(_block(dt, t, t)) for dt in (torch.float32, torch.bfloat16) for t in (1, 13, 64)]
VALID = set(BLOCKS)


@st.composite
def mutated(draw):
    """A valid block damaged one of several ways (or, rarely, left intact)."""
    buf = bytearray(draw(st.sampled_from(BLOCKS)))
    orig = bytes(buf)
    how = draw(st.sampled_from(["overwrite", "insert", "delete", "splice", "truncate", "header", "none"]))
    if how == "overwrite":
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(buf) - 1))
            buf[i] = draw(st.integers(0, 255))
    elif how == "insert":
        i = draw(st.integers(0, len(buf)))
        buf[i:i] = draw(st.binary(min_size=1, max_size=16))
    elif how == "delete":
        i = draw(st.integers(0, len(buf) - 1))
        del buf[i:i + draw(st.integers(1, 64))]
    elif how == "splice":
        other = draw(st.sampled_from(BLOCKS))
        i = draw(st.integers(1, len(buf) - 1))
        buf = buf[:i] + other[i:]
    elif how == "truncate":
        buf = buf[:draw(st.integers(0, len(buf) - 1))]
    elif how == "header":  # rewrite the header length / hash fields of the prefix
        struct.pack_into("<IQ", buf, 4, draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**64 - 1)))
    return bytes(buf), orig


def _same_as(blk, raw: bytes) -> bool:
    return encode_block_bytes(blk) == raw


@settings(max_examples=n(3000), **FAST)
@given(mutated())
def test_host_tier_never_returns_a_damaged_block(case):
    buf, orig = case
    tier = HostTier(1 << 20, device_verify=False)
    tier.put_encoded_many([("k", buf)])
    got = tier.get_many(["k"])[0]
    if got is not None:  # only an intact block (a splice can rebuild another whole one) is data
        assert buf in VALID and _same_as(got, buf)
    else:
        assert buf not in VALID and tier.stats.corrupt == 1
        assert not tier.contains("k")  # a bad block is dropped, not served again


@settings(max_examples=n(2500), **FAST)
@given(mutated())
def test_peer_transfer_never_returns_a_damaged_block(case):
    buf, orig = case
    store = TieredStore(peer=lambda keys: [buf for _ in keys])
    got = store.get_many(["k"])[0]
    if got is not None:
        assert buf in VALID and _same_as(got, buf)
    else:
        assert buf not in VALID and store.peer_stats.corrupt == 1
    store.close()


def _store_with_segment():
    host = HostTier(1 << 20, device_verify=False)
    store = TieredStore(host=host)
    segs = TieredSegmentStore(store, "fp-fuzz", block_tokens=16)
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 2, 40, 8, generator=g), torch.randn(2, 2, 40, 8, generator=g)
    segs.put(SegmentKV("s", "fp-fuzz", np.arange(40, dtype=np.int32), k, v, (0, 1)))
    store.flush(5)
    return store, segs, host


_STORE, _SEGS, _HOST = _store_with_segment()
_GOOD_MANIFEST = bytes(_HOST.get_encoded_many([_SEGS._manifest_key("s")])[0])
_values = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.text(max_size=6)
                       | st.binary(max_size=12) | st.floats(allow_nan=True),
                       lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
                       max_leaves=5)
_manifest_fields = st.fixed_dictionaries({}, optional={
    "v": st.one_of(st.just(1), _values), "segment_id": st.one_of(st.just("s"), _values),
    "fp": st.one_of(st.just("fp-fuzz"), _values),
    "token_ids": st.one_of(st.just(np.arange(40, dtype="<i4").tobytes()), st.binary(max_size=200), _values),
    "layers": st.one_of(st.just([0, 1]), st.lists(st.integers(-2, 5), max_size=3), _values),
    "tenant": st.one_of(st.just("t"), _values), "scope": st.one_of(st.just("private"), _values),
    "n_blocks": st.one_of(st.integers(-1, 5), _values), "block_tokens": st.one_of(st.integers(-1, 64), _values)})


@settings(max_examples=n(1500), **FAST)
@given(st.one_of(_manifest_fields.map(lambda m: ("valid-checksum", msgpack.packb(m))),
                 st.binary(max_size=300).map(lambda b: ("raw", b)),
                 st.integers(0, len(_GOOD_MANIFEST) * 8 - 1).map(lambda bit: ("flip", bit))))
def test_segment_manifest_garbage_is_a_miss(case):
    kind, data = case
    if kind == "valid-checksum":
        rec = xxhash.xxh64_digest(data) + data
    elif kind == "raw":
        rec = data
    else:
        b = bytearray(_GOOD_MANIFEST)
        b[data // 8] ^= 1 << (data % 8)
        rec = bytes(b)
    _HOST.put_encoded_many([(_SEGS._manifest_key("s"), rec)])
    try:
        seg = _SEGS.get("s")  # must not raise
        if seg is not None:  # only a manifest equivalent to the real one can yield the segment
            assert seg.n_tokens == 40 and np.array_equal(seg.token_ids, np.arange(40))
    finally:
        _HOST.put_encoded_many([(_SEGS._manifest_key("s"), _GOOD_MANIFEST)])


@st.composite
def frames(draw):
    keys = draw(st.lists(st.text(max_size=8), max_size=4))
    bufs = [draw(st.one_of(st.none(), st.sampled_from(BLOCKS[:3]))) for _ in keys]
    raw = b"".join(bytes(p) for p in pack_message(draw(st.sampled_from(["get", "blocks", "x"])), keys, bufs))
    how = draw(st.sampled_from(["flip", "cut", "garbage", "prefix", "none"]))
    if how == "flip":
        b = bytearray(raw)
        i = draw(st.integers(0, len(b) - 1))
        b[i] ^= 1 << draw(st.integers(0, 7))
        raw = bytes(b)
    elif how == "cut":
        raw = raw[:draw(st.integers(0, len(raw) - 1))]
    elif how == "garbage":
        raw = draw(st.binary(max_size=200))
    elif how == "prefix":
        raw = PREFIX.pack(b"KVMS", draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**64 - 1)),
                          draw(st.integers(0, 2**64 - 1))) + draw(st.binary(max_size=64))
    return raw


def _parse_frame(raw: bytes):
    if len(raw) < PREFIX.size:
        raise ProtocolError("short")
    hlen, hhash, body_len = parse_prefix(raw[:PREFIX.size], 1 << 30)
    if PREFIX.size + hlen + body_len != len(raw):
        raise ProtocolError("length")
    h = parse_header(raw[PREFIX.size:PREFIX.size + hlen], hhash, body_len)
    return h, split_body(h, raw[PREFIX.size + hlen:])


@settings(max_examples=n(1500), **FAST)
@given(frames())
def test_message_framing_refuses_with_protocol_errors(raw):
    try:
        _parse_frame(raw)
    except ProtocolError:
        pass


@pytest.fixture(scope="module")
def server():
    good = {"a": BLOCKS[0]}
    srv = TCPServer(source=lambda keys: [good.get(k) for k in keys], host="127.0.0.1")
    port = srv.start_background()
    yield port
    srv.stop()


@settings(max_examples=n(1000), **FAST)
@given(frames())
def test_live_tcp_server_survives_garbage(server, raw):
    with socket.create_connection(("127.0.0.1", server), timeout=2) as s:
        try:  # the server may refuse and close before we are done sending: that is fine
            s.sendall(raw)
            s.shutdown(socket.SHUT_WR)
            while s.recv(1 << 16):
                pass
        except (socket.timeout, OSError):
            pass
    c = TCPClient("127.0.0.1", server, timeout_s=2)  # still serving
    try:
        assert bytes(c.fetch(["a"])[0]) == BLOCKS[0]
    finally:
        c.close()


@settings(max_examples=n(1000), **FAST)
@given(frames())
def test_tcp_client_refuses_a_garbage_reply_with_a_typed_error(raw):
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    c = TCPClient("127.0.0.1", lsock.getsockname()[1], timeout_s=1)
    try:
        c._conn()
        conn, _ = lsock.accept()
        conn.sendall(raw)
        conn.close()
        try:
            got = c.fetch(["a"])
            assert len(got) == 1  # only a well-formed answer for exactly our key gets here
        except ChannelError:
            pass
    finally:
        c.close()
        lsock.close()
