"""BodyVerifier (transport/verify.py): blocks verified while a message body arrives, and the TCP
channel that uses it (corrupt blocks become misses, records pass through, nothing verified twice)."""
import random
import socket
import threading

import numpy as np
import pytest
import torch

from tests.transport.conftest import make_block, same_block
from transport.block import decode_block, encode_block_bytes
from transport.channels.tcp import AsyncTCPClient, TCPClient, TCPServer
from transport.message import pack_message
from transport.tiers import HostTier, TieredStore
from transport.verify import BodyVerifier, HashThreads, channel_verified, verified_empty

BLOCKS = [encode_block_bytes(make_block(dt, layers=(0, 1), heads=2, tokens=t, head_dim=d, seed=i))
          for i, (dt, t, d) in enumerate([(torch.float32, 1, 8), (torch.bfloat16, 64, 64),
                                          (torch.float16, 64, 512), (torch.float32, 3, 4)])]
RECORD = b"\x01\x02\x03\x04 a manifest, not a block"


def _body(bufs):
    sizes = [-1 if b is None else len(b) for b in bufs]
    body = verified_empty(sum(s for s in sizes if s > 0))
    body[:] = np.frombuffer(b"".join(b for b in bufs if b is not None), dtype=np.uint8)
    return body, sizes


def _verify(bufs, steps=None, threads=None):
    body, sizes = _body(bufs)
    v = BodyVerifier(body, sizes, threads=threads)
    total = body.nbytes
    if steps is None:
        v.feed(total)
    else:
        got = 0
        while got < total:
            got = min(total, got + steps())
            v.feed(got)
    bad = v.finish()
    assert v.done
    return bad


def _flip(buf, at):
    b = bytearray(buf)
    b[at] ^= 0x10
    return bytes(b)


@pytest.mark.parametrize("threads", [None, HashThreads(1)], ids=["inline", "thread"])
@pytest.mark.parametrize("steps", ["all", "one", "random"])
def test_good_blocks_pass_in_any_chunking(steps, threads):
    rng = random.Random(0)
    step = {"all": None, "one": lambda: 1 if rng.random() < 0.9 else 4096,
            "random": lambda: rng.randint(1, 200_000)}[steps]
    assert _verify(BLOCKS + [RECORD, None] + BLOCKS[::-1], step, threads) == []


@pytest.mark.parametrize("threads", [None, HashThreads(2)], ids=["inline", "thread"])
def test_each_kind_of_damage_marks_exactly_that_block(threads):
    good = BLOCKS[2]
    payload_flip = _flip(good, len(good) - 100)
    header_flip = _flip(good, 20)            # inside the msgpack header
    prefix_flip = _flip(good, 6)             # header length
    truncated = good[:-64]                   # shorter than its header says
    only_prefix = good[:10]                  # magic, then nothing
    padded = good + b"\0" * 64               # longer than its header says
    bufs = [good, payload_flip, None, header_flip, good, prefix_flip, truncated, only_prefix,
            padded, RECORD, good]
    for steps in (None, lambda: 4093):
        assert _verify(bufs, steps, threads) == [1, 3, 5, 6, 7, 8]


def test_nonzero_padding_is_refused():
    good = bytearray(BLOCKS[1])
    import struct
    _, hlen, _ = struct.unpack_from("<4sIQ", good)
    pad_at = 16 + hlen
    if pad_at % 64 == 0:
        pytest.skip("this header needs no padding")
    good[pad_at] = 1
    assert _verify([bytes(good)]) == [0]


def test_channel_verified_marks_views_only_of_verified_bodies():
    body, _ = _body(BLOCKS)
    assert channel_verified(memoryview(body)[10:20])
    assert channel_verified(memoryview(body).cast("B")[5:])
    assert not channel_verified(memoryview(bytes(BLOCKS[0])))
    assert not channel_verified(np.empty(4, dtype=np.uint8))
    assert verified_empty(1000).ctypes.data % 64 == 0


# -- through the TCP channel ------------------------------------------------------------------------
@pytest.fixture
def server():
    bad = _flip(BLOCKS[2], len(BLOCKS[2]) - 7)
    src = {"a": BLOCKS[0], "b": BLOCKS[1], "bad": bad, "big": BLOCKS[2], "rec": RECORD}
    pushed = {}
    srv = TCPServer(source=lambda ks: [src.get(k) for k in ks],
                    sink=lambda items: pushed.update({k: bytes(b) for k, b in items}))
    srv.pushed = pushed
    srv.start_background()
    yield srv
    srv.stop()


def test_tcp_client_counts_corrupt_blocks_and_never_marks_them(server):
    from transport.errors import ChecksumError
    c = TCPClient("127.0.0.1", server.port)
    got = c.fetch(["a", "bad", "nope", "big", "rec"])
    assert got[2] is None and c.corrupt == 1
    assert not channel_verified(got[1])  # an unmarked copy: whoever decodes it sees the damage
    with pytest.raises(ChecksumError):
        decode_block(got[1])
    assert bytes(got[0]) == BLOCKS[0] and bytes(got[3]) == BLOCKS[2]
    assert bytes(got[4]) == RECORD  # not a block: passed through for its owner to check
    assert all(channel_verified(b) for b in (got[0], got[3], got[4]))
    nv = TCPClient("127.0.0.1", server.port, verify=False)
    raw = nv.fetch(["bad"])[0]
    assert raw is not None and not channel_verified(raw)
    c.close()
    nv.close()


def test_tcp_async_client_verifies_too(server):
    import asyncio

    async def go():
        c = AsyncTCPClient("127.0.0.1", server.port)
        got = await c.fetch(["bad", "b"])
        await c.close()
        return got, c.corrupt
    got, corrupt = asyncio.run(go())
    assert not channel_verified(got[0]) and bytes(got[1]) == BLOCKS[1] and corrupt == 1


def test_tcp_server_drops_corrupt_pushed_blocks(server):
    c = TCPClient("127.0.0.1", server.port)
    c.push([("x", BLOCKS[1]), ("y", _flip(BLOCKS[1], len(BLOCKS[1]) - 1)), ("r", RECORD)])
    assert set(server.pushed) == {"x", "r"} and server.corrupt == 1
    c.close()


def test_tiered_store_trusts_the_channel_and_still_decodes(server, monkeypatch):
    """A verified peer block is decoded without hashing its payload again; a corrupt one is
    decoded with its payload hash, fails, is counted in the peer stats and is a miss."""
    import transport.tiers.tiered as tiered
    calls = []
    real = tiered.decode_block

    def spy(buf, *a, **kw):
        calls.append(kw.get("verify_payload", True))
        return real(buf, *a, **kw)
    monkeypatch.setattr(tiered, "decode_block", spy)
    client = TCPClient("127.0.0.1", server.port)
    store = TieredStore(host=HostTier(1 << 24, pin=False, device_verify=False), peer=client)
    got = store.get_many(["a", "bad", "big"])
    assert got[1] is None and store.peer_stats.corrupt == 1 and client.corrupt == 1
    assert same_block(got[0], decode_block(BLOCKS[0])) and same_block(got[2], decode_block(BLOCKS[2]))
    assert calls == [False, True, False]
    store.close()
    client.close()


def test_tcp_cut_in_the_middle_of_a_block_is_a_typed_error():
    """A reply that stops mid-block: ChannelClosed, never a partial block (with verification on)."""
    from transport.errors import ChannelClosed
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)

    def run():
        conn, _ = s.accept()
        conn.recv(1 << 16)
        parts = pack_message("blocks", ["a", "big"], [BLOCKS[0], BLOCKS[2]])
        conn.sendall(parts[0])
        conn.sendall(parts[1])
        conn.sendall(parts[2][: parts[2].nbytes // 2])
        conn.close()
    threading.Thread(target=run, daemon=True).start()
    with pytest.raises(ChannelClosed):
        TCPClient("127.0.0.1", s.getsockname()[1], timeout_s=5).fetch(["a", "big"])
    s.close()
