"""Fixtures for transport tests: a private Redis key prefix, block factories, spare redis-servers."""
from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid

import pytest
import torch

from transport.block import KVBlock

REDIS_URL = "redis://127.0.0.1:6379/0"


def _redis_up(url: str = REDIS_URL) -> bool:
    try:
        import redis
        redis.Redis.from_url(url, socket_connect_timeout=0.5).ping()
        return True
    except Exception:
        return False


@pytest.fixture
def redis_tier():
    """A RedisTier on the shared server under a unique prefix, emptied afterwards."""
    if not _redis_up():
        pytest.skip("no Redis on 127.0.0.1:6379")
    from transport.tiers.redis_tier import RedisTier
    tier = RedisTier(REDIS_URL, prefix=f"kvc-test-{uuid.uuid4().hex}:", ttl_s=120)
    yield tier
    tier.clear()
    tier.close()


def make_block(dtype=torch.float32, layers=(0, 1), heads: int = 2, tokens: int = 64,
               head_dim: int = 16, fingerprint: str = "fp-test", seed: int = 0) -> KVBlock:
    g = torch.Generator().manual_seed(seed)
    shape = (len(layers), heads, tokens, head_dim)
    k = torch.randn(shape, generator=g).to(dtype)
    v = torch.randn(shape, generator=g).to(dtype)
    return KVBlock(fingerprint, tuple(layers), seed, k, v)


def same_block(a: KVBlock, b: KVBlock) -> bool:
    return (a.fingerprint == b.fingerprint and a.layers == b.layers
            and a.token_hash == b.token_hash and a.keys.dtype == b.keys.dtype
            and torch.equal(a.keys.cpu(), b.keys.cpu()) and torch.equal(a.values.cpu(), b.values.cpu()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A throwaway redis-server on a given port, no persistence; start/stop at will."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server not installed")
        self.proc = subprocess.Popen([exe, "--port", str(self.port), "--save", "",
                                      "--appendonly", "no", "--bind", "127.0.0.1"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not _redis_up(f"redis://127.0.0.1:{self.port}/0"):
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def spare_redis():
    server = RedisServer(free_port())
    yield server
    server.stop()
