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
