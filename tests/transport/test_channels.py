import asyncio
import os
import socket
import threading
import time

import pytest
import torch

from tests.transport.conftest import make_block, same_block
from transport.block import decode_block, encode_block_bytes
from transport.channels.inproc import InProcessChannel
from transport.channels.tcp import AsyncTCPClient, TCPClient, TCPServer
from transport.errors import ChannelClosed, ChannelTimeout, ProtocolError
from transport.message import pack_message
from transport.tiers import GPUTier, HostTier, TieredStore

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _blocks():
    """Several dtypes and sizes: 1 KiB .. 1 MiB blocks."""
    out = {}
    for i, dt in enumerate(DTYPES):
        for j, (tokens, dim) in enumerate([(1, 8), (64, 64), (64, 512)]):
            out[f"b{i}{j}"] = make_block(dt, layers=(0, 1, 2, 3), heads=4, tokens=tokens,
                                         head_dim=dim, seed=10 * i + j)
    return out


BLOCKS = _blocks()
ENCODED = {k: bytes(encode_block_bytes(b)) for k, b in BLOCKS.items()}


def _check(keys, got):
    for k, raw in zip(keys, got):
        if k in BLOCKS:
            assert same_block(decode_block(raw), BLOCKS[k])
        else:
            assert raw is None


def test_inprocess_channel():
    ch = InProcessChannel(lambda ks: [ENCODED.get(k) for k in ks])
    keys = list(ENCODED) + ["nope"]
    _check(keys, ch.fetch(keys))


@pytest.fixture
def tcp_server():
    pushed = {}
    srv = TCPServer(source=lambda ks: [ENCODED.get(k) for k in ks],
                    sink=lambda items: pushed.update({k: bytes(b) for k, b in items}))
    srv.pushed = pushed
    srv.start_background()
    yield srv
    srv.stop()


def test_tcp_fetch_and_push(tcp_server):
    c = TCPClient("127.0.0.1", tcp_server.port, timeout_s=5)
    keys = list(ENCODED) + ["nope"]
    _check(keys, c.fetch(keys))
    _check(keys[:2], c.fetch(keys[:2]))  # the connection is reused
    c.push([("x", ENCODED["b00"]), ("y", ENCODED["b21"])])
    assert tcp_server.pushed == {"x": ENCODED["b00"], "y": ENCODED["b21"]}
    c.close()


def test_tcp_async_client(tcp_server):
    async def go():
        c = AsyncTCPClient("127.0.0.1", tcp_server.port, timeout_s=5)
        got = await c.fetch(list(ENCODED))
        await c.push([("z", ENCODED["b12"])])
        await c.close()
        return got
    _check(list(ENCODED), asyncio.run(go()))
    assert tcp_server.pushed["z"] == ENCODED["b12"]


def test_tcp_as_tiered_store_peer(tcp_server):
    client = TCPClient("127.0.0.1", tcp_server.port)
    store = TieredStore(GPUTier(16 << 20), HostTier(16 << 20), peer=client)
    got = store.get_many(["b01", "b22", "nope"])
    assert same_block(got[0], BLOCKS["b01"]) and same_block(got[1], BLOCKS["b22"])
    assert got[2] is None and store.peer_stats.hits == 2
    store.close()
    client.close()


def _fake_server(behaviour):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)

    def run():
        conn, _ = s.accept()
        conn.recv(1 << 16)
        behaviour(conn)
        conn.close()
        s.close()
    threading.Thread(target=run, daemon=True).start()
    return s.getsockname()[1]


def test_tcp_drop_mid_message_is_typed_error():
    def half(conn):
        parts = pack_message("blocks", ["b02"], [ENCODED["b02"]])
        conn.sendall(parts[0])
        conn.sendall(parts[1][: parts[1].nbytes // 2])  # then hang up
    c = TCPClient("127.0.0.1", _fake_server(half), timeout_s=5)
    with pytest.raises(ChannelClosed):
        c.fetch(["b02"])


def test_tcp_timeout_is_typed_error():
    c = TCPClient("127.0.0.1", _fake_server(lambda conn: time.sleep(2)), timeout_s=0.3)
    with pytest.raises(ChannelTimeout):
        c.fetch(["b02"])


def test_tcp_garbage_reply_is_typed_error():
    c = TCPClient("127.0.0.1", _fake_server(lambda conn: conn.sendall(os.urandom(64))), timeout_s=2)
    with pytest.raises(ProtocolError):
        c.fetch(["b02"])


def test_tcp_refused_connection_is_typed_error():
    from tests.transport.conftest import free_port
    with pytest.raises(ChannelClosed):
        TCPClient("127.0.0.1", free_port(), timeout_s=1).fetch(["a"])


def test_tcp_server_ignores_partial_push(tcp_server):
    parts = pack_message("put", ["p"], [ENCODED["b02"]])
    with socket.create_connection(("127.0.0.1", tcp_server.port)) as s:
        s.sendall(parts[0])
        s.sendall(parts[1][:1000])
    time.sleep(0.2)
    assert "p" not in tcp_server.pushed
    # and the server still serves others
    _check(["b00"], TCPClient("127.0.0.1", tcp_server.port).fetch(["b00"]))


def test_body_pool_reuses_a_buffer_only_when_no_view_is_alive():
    from transport.receive import BodyPool
    pool = BodyPool(max_buffers=2)
    a = pool.take(1 << 20)
    a[:4] = [1, 2, 3, 4]
    view = memoryview(a)[:4]  # a block still held by its reader
    del a
    b = pool.take(1 << 20)
    b[:4] = 9
    assert bytes(view) == bytes([1, 2, 3, 4])  # a second buffer, not the held one
    del view, b
    c = pool.take(1 << 20)
    assert any(c.base is p for p in pool._bufs)  # a pooled buffer again, not a third one
    assert len(pool._bufs) == 2 and c.ctypes.data % 64 == 0
    big = pool.take(8 << 20)  # no pooled buffer that size fits: a fresh one
    assert big.nbytes == 8 << 20
