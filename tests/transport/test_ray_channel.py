import os
import time

import numpy as np
import pytest
import torch

from tests.transport.conftest import make_block, same_block
from transport.block import decode_block, encode_block_bytes
from transport.channels.ray_channel import pack, unpack
from transport.errors import ProtocolError

ray = pytest.importorskip("ray")


def test_pack_unpack_without_ray():
    blocks = {"a": bytes(encode_block_bytes(make_block(torch.bfloat16))), "b": None}
    arrays = pack(list(blocks.items()))
    assert all(isinstance(a, np.ndarray) and a.dtype == np.uint8 for a in arrays)
    got = dict(unpack(arrays))
    assert bytes(got["a"]) == blocks["a"] and got["b"] is None
    with pytest.raises(ProtocolError):
        unpack(arrays[:1])  # a block missing
    with pytest.raises(ProtocolError):
        unpack([np.frombuffer(os.urandom(64), dtype=np.uint8)])


@pytest.fixture(scope="module")
def ray_local():
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False,
             configure_logging=False, object_store_memory=200 << 20)
    yield ray
    ray.shutdown()


def test_ray_channel_between_tasks(ray_local):
    from transport.channels.ray_channel import RayChannel

    blocks = {f"k{i}": make_block(dt, tokens=64, head_dim=64, seed=i)
              for i, dt in enumerate([torch.float32, torch.float16, torch.bfloat16])}
    encoded = {k: bytes(encode_block_bytes(b)) for k, b in blocks.items()}

    @ray.remote
    def serve(keys):  # a peer worker answering a fetch: numpy arrays, never torch tensors
        return pack([(k, encoded.get(k)) for k in keys])

    ch = RayChannel()
    fetch = ch.fetcher(serve.remote)
    t0 = time.monotonic()
    got = fetch(list(blocks) + ["missing"])
    assert got[-1] is None
    for (k, want), raw in zip(blocks.items(), got):
        assert same_block(decode_block(raw), want)
    ref = ch.put([(k, encoded[k]) for k in blocks])
    assert [k for k, _ in ch.get(ref)] == list(blocks)
    assert time.monotonic() - t0 < 20
