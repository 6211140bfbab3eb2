"""Fixtures of the reliability tests: the tiny model, our own redis-server, an in-process cluster."""
from __future__ import annotations

import shutil

import pytest

from tests.reliability.harness import LocalCluster, RedisProc, tiny_model_dir


@pytest.fixture(scope="session")
def tiny_model():
    return tiny_model_dir()


@pytest.fixture(scope="module")
def redis_proc():
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed")
    r = RedisProc().start()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def cluster(tiny_model, redis_proc):
    """2 in-process workers (TCP channel between them), Redis tier on our own server, embedded
    Qdrant in memory through the Qdrant engine (so that Qdrant faults reach lookups)."""
    c = LocalCluster(2, tiny_model, redis_url=redis_proc.url, channel="tcp", engine="qdrant")
    yield c
    c.close()


def flip(buf, pos: int = -5) -> bytes:
    b = bytearray(memoryview(buf).cast("B"))
    b[pos] ^= 0x40
    return bytes(b)
