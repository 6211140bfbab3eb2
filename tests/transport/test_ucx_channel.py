import asyncio
import os

import pytest
import torch

from tests.transport.conftest import make_block, same_block
from transport.block import decode_block, encode_block_bytes
from transport.channels.ucx import ucx_available
from transport.errors import ChannelError

pytestmark = pytest.mark.skipif(not ucx_available(), reason="ucxx is not installed")
os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")


def test_ucx_fetch_and_push():
    from transport.channels.ucx import UCXClient, UCXServer

    blocks = {f"k{i}": make_block(dt, tokens=t, head_dim=64, seed=i)
              for i, (dt, t) in enumerate([(torch.float32, 64), (torch.float16, 1),
                                           (torch.bfloat16, 64)])}
    encoded = {k: bytes(encode_block_bytes(b)) for k, b in blocks.items()}
    pushed = {}

    async def go():
        srv = UCXServer(source=lambda ks: [encoded.get(k) for k in ks],
                        sink=lambda items: pushed.update({k: bytes(b) for k, b in items}))
        port = await srv.start()
        c = await UCXClient.connect("127.0.0.1", port, timeout_s=10)
        got = await c.fetch(list(blocks) + ["missing"])
        await c.push([("p", encoded["k2"])])
        await c.close()
        await asyncio.sleep(0.1)
        srv.close()
        return got

    got = asyncio.run(go())
    assert got[-1] is None
    for (k, want), raw in zip(blocks.items(), got):
        assert same_block(decode_block(raw), want)
    assert pushed == {"p": encoded["k2"]}


def test_ucx_connect_refused_is_typed_error():
    from tests.transport.conftest import free_port
    from transport.channels.ucx import UCXClient

    async def go():
        c = await UCXClient.connect("127.0.0.1", free_port(), timeout_s=2)
        await c.fetch(["a"])

    with pytest.raises(ChannelError):
        asyncio.run(go())


def _serve_and_run(source, client_fn, sink=None, **client_kw):
    """Run ``client_fn(client, server)`` against a UCXServer on this event loop."""
    from transport.channels.ucx import UCXClient, UCXServer

    async def go():
        srv = UCXServer(source=source, sink=sink)
        port = await srv.start()
        c = await UCXClient.connect("127.0.0.1", port, **client_kw)
        try:
            return await client_fn(c, srv)
        finally:
            await c.close()
            await asyncio.sleep(0.1)
            srv.close()

    return asyncio.run(go())


def test_ucx_reused_body_does_not_touch_blocks_still_held(monkeypatch):
    """Bodies come from a pool and are reused once no block view of them is alive: a block the
    caller still holds must keep its bytes through later fetches of the same size."""
    from transport import receive
    from transport.channels import ucx
    from transport.verify import channel_verified
    # a pool of its own: earlier tests may have filled the shared one to its buffer limit
    POOL = receive.BodyPool()
    monkeypatch.setattr(receive, "POOL", POOL)
    monkeypatch.setattr(ucx, "POOL", POOL)

    a = {f"a{i}": bytes(encode_block_bytes(make_block(tokens=64, head_dim=512, seed=i)))
         for i in range(4)}
    b = {f"b{i}": bytes(encode_block_bytes(make_block(tokens=64, head_dim=512, seed=50 + i)))
         for i in range(4)}
    src = {**a, **b}

    async def run(c, srv):
        held = await c.fetch(list(a))
        first = held[0].obj
        for _ in range(3):
            await c.fetch(list(b))  # dropped at once: its body is free again
        assert [bytes(v) for v in held] == list(a.values())
        assert all(channel_verified(v) for v in held)
        base = first.base
        while base.base is not None:
            base = base.base
        assert any(base is p for p in POOL._bufs)
        del held, first, base
        again = await c.fetch(list(a))  # a pooled body again
        assert [bytes(v) for v in again] == list(a.values())
        return c.corrupt

    assert _serve_and_run(lambda ks: [src.get(k) for k in ks], run) == 0


def test_ucx_verifies_blocks_on_receipt():
    """A corrupt block comes out as an unmarked copy (its decode fails) and is counted; the
    others are verified; a corrupt pushed block never reaches the sink."""
    from transport.errors import ChecksumError
    from transport.verify import channel_verified

    good = bytes(encode_block_bytes(make_block(tokens=64, head_dim=64, seed=1)))
    bad = bytearray(encode_block_bytes(make_block(tokens=64, head_dim=64, seed=2)))
    bad[-7] ^= 0x10
    pushed = {}

    async def run(c, srv):
        got = await c.fetch(["good", "bad"])
        await c.push([("pg", good), ("pb", bytes(bad))])
        return got, srv.corrupt

    got, server_corrupt = _serve_and_run(
        lambda ks: [good if k == "good" else bytes(bad) for k in ks], run,
        sink=lambda items: pushed.update({k: bytes(v) for k, v in items}))
    assert channel_verified(got[0]) and bytes(got[0]) == good
    assert not channel_verified(got[1]) and bytes(got[1]) == bytes(bad)
    with pytest.raises(ChecksumError):
        decode_block(got[1])
    assert server_corrupt == 1 and pushed == {"pg": good}


def test_ucx_header_longer_than_the_first_message():
    """Prefix and header go as one message of at most HEAD_BYTES; a longer header (many long
    keys) sends its rest as a second message."""
    from transport.channels.ucx import HEAD_BYTES

    enc = bytes(encode_block_bytes(make_block(seed=4)))
    keys = [f"{'k' * 60}-{i}" for i in range(2 * HEAD_BYTES // 60)]
    want = {keys[0], keys[-1]}

    async def run(c, srv):
        return await c.fetch(keys)

    got = _serve_and_run(lambda ks: [enc if k in want else None for k in ks], run)
    assert bytes(got[0]) == enc and bytes(got[-1]) == enc
    assert all(g is None for g in got[1:-1])


def test_ucx_client_reconnects_after_an_error():
    """A failed request drops the endpoint (the stream position is unknown); the next one
    connects again."""
    enc = bytes(encode_block_bytes(make_block(seed=5)))

    def source(keys):
        if "boom" in keys:
            raise RuntimeError("source failed")  # the server drops this connection
        return [enc for _ in keys]

    async def run(c, srv):
        with pytest.raises(ChannelError):
            await c.fetch(["boom"])
        return await c.fetch(["ok"])

    got = _serve_and_run(source, run, timeout_s=3)
    assert bytes(got[0]) == enc


def test_ucx_more_blocks_than_the_window():
    """Sends and receives beyond WINDOW are posted as earlier ones complete, still in order."""
    from transport.channels.ucx import WINDOW

    enc = {f"k{i}": bytes(encode_block_bytes(make_block(tokens=1, head_dim=8, seed=i)))
           for i in range(2 * WINDOW + 3)}
    pushed = {}

    async def run(c, srv):
        got = await c.fetch(list(enc))
        await c.push(list(enc.items()))
        return got

    got = _serve_and_run(lambda ks: [enc.get(k) for k in ks], run,
                         sink=lambda items: pushed.update({k: bytes(v) for k, v in items}))
    assert [bytes(g) for g in got] == list(enc.values())
    assert pushed == enc
