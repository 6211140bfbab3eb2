"""Redis tier: encoded blocks under a key prefix with a TTL, shared by all workers.

Redis is a cache here, never a dependency: when it is down, reads are misses and writes are
dropped (both counted), no exception reaches the caller, and the tier probes again after an
exponentially growing pause until a PING succeeds. redis-py's own retries are turned off so that
a dead server costs one failed call, not several.
"""
from __future__ import annotations

import threading
import time
from typing import Sequence

from transport.block import DEFAULT_MAX_BLOCK_BYTES, KVBlock, decode_block, encode_block_bytes
from transport.errors import BlockError
from transport.tiers.base import TierStats


class RedisTier:
    name = "redis"

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", prefix: str = "kvcluster:",
                 ttl_s: int = 3600, max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES,
                 expected_fingerprint: str | None = None, socket_timeout_s: float = 2.0,
                 connect_timeout_s: float = 0.5, max_connections: int = 16,
                 health_check_interval_s: int = 10, backoff_initial_s: float = 0.05,
                 backoff_max_s: float = 5.0) -> None:
        import redis  # lazily: the GPU benchmarks run where redis-py is absent
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self._redis = redis
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.max_block_bytes = max_block_bytes
        self.expected_fingerprint = expected_fingerprint
        self.backoff_initial_s, self.backoff_max_s = backoff_initial_s, backoff_max_s
        self.stats = TierStats()
        no_retry = Retry(NoBackoff(), 0)
        self._pool = redis.ConnectionPool.from_url(
            url, max_connections=max_connections, socket_timeout=socket_timeout_s,
            socket_connect_timeout=connect_timeout_s,
            health_check_interval=health_check_interval_s, retry=no_retry)
        self.client = redis.Redis(connection_pool=self._pool, retry=no_retry)
        self._lock = threading.Lock()
        self._down_until: float | None = None
        self._backoff = backoff_initial_s

    # -- health ------------------------------------------------------------------------------
    @property
    def is_up(self) -> bool:
        return self._down_until is None

    def _mark_down(self) -> None:
        with self._lock:
            self.stats.errors += 1
            if self._down_until is not None:
                self._backoff = min(self._backoff * 2, self.backoff_max_s)
            self._down_until = time.monotonic() + self._backoff
        self._pool.disconnect()  # stale sockets would each fail once more

    def _available(self) -> bool:
        """Up, or down but due for a probe that succeeds."""
        with self._lock:
            if self._down_until is None:
                return True
            if time.monotonic() < self._down_until:
                return False
        try:
            self.client.ping()
        except (self._redis.RedisError, OSError):
            self._mark_down()
            return False
        with self._lock:
            self._down_until, self._backoff = None, self.backoff_initial_s
        return True

    def _run(self, build) -> list | None:
        """Run a pipeline; None (and the tier marked down) if the server is unreachable."""
        if not self._available():
            return None
        try:
            pipe = self.client.pipeline(transaction=False)
            build(pipe)
            return pipe.execute(raise_on_error=True)
        except (self._redis.ConnectionError, self._redis.TimeoutError, OSError):
            self._mark_down()
        except self._redis.RedisError:  # e.g. OOM refusal: the server is up, this call failed
            self.stats.errors += 1
        return None

    # -- raw buffers ---------------------------------------------------------------------------
    def get_encoded_many(self, keys: Sequence[str]) -> list[bytes | None]:
        res = self._run(lambda p: [p.get(self.prefix + k) for k in keys])
        out = res if res is not None else [None] * len(keys)
        for b in out:
            if b is None:
                self.stats.misses += 1
            else:
                self.stats.hits += 1
                self.stats.bytes_out += len(b)
        return out

    def put_encoded_many(self, items: Sequence[tuple[str, object]]) -> None:
        # the hiredis command packer copies anything that is not bytes into bytes first
        ok = [(k, b if isinstance(b, bytes) else bytes(memoryview(b).cast("B"))) for k, b in items]
        ok = [(k, b) for k, b in ok if len(b) <= self.max_block_bytes]
        self.stats.dropped_writes += len(items) - len(ok)
        if not ok:
            return
        res = self._run(lambda p: [p.set(self.prefix + k, b, ex=self.ttl_s) for k, b in ok])
        if res is None:
            self.stats.dropped_writes += len(ok)
        else:
            self.stats.bytes_in += sum(len(b) for _, b in ok)

    # -- the tier interface ----------------------------------------------------------------------
    def get_many(self, keys: Sequence[str]) -> list[KVBlock | None]:
        return self.get_verified(keys)[0]

    def get_verified(self, keys: Sequence[str]) -> tuple[list[KVBlock | None], list[bytes | None]]:
        """Decoded blocks and their raw bytes; bad blocks are deleted, counted, and read as misses."""
        raws = self.get_encoded_many(keys)
        blocks: list[KVBlock | None] = []
        for i, (key, raw) in enumerate(zip(keys, raws)):
            blk = None
            if raw is not None:
                try:
                    blk = decode_block(raw, self.expected_fingerprint, self.max_block_bytes)
                except BlockError:
                    self.stats.corrupt += 1
                    self.stats.hits -= 1
                    self.stats.misses += 1
                    raws[i] = None
                    self.evict(key)
            blocks.append(blk)
        return blocks, raws

    def put_many(self, items: Sequence[tuple[str, KVBlock]]) -> None:
        self.put_encoded_many([(k, encode_block_bytes(b)) for k, b in items])

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        res = self._run(lambda p: [p.exists(self.prefix + k) for k in keys])
        return [bool(x) for x in res] if res is not None else [False] * len(keys)

    def contains(self, key: str) -> bool:
        return self.contains_many([key])[0]

    def evict(self, key: str) -> bool:
        res = self._run(lambda p: p.delete(self.prefix + key))
        return bool(res and res[0])

    def clear(self) -> int:
        """Delete every key under this tier's prefix (tests, or a model upgrade)."""
        if not self._available():
            return 0
        n = 0
        try:
            for batch in _batched(self.client.scan_iter(match=self.prefix + "*", count=500), 500):
                n += self.client.delete(*batch)
        except (self._redis.RedisError, OSError):
            self._mark_down()
        return n

    def close(self) -> None:
        self._pool.disconnect()


def _batched(it, n: int):
    batch = []
    for x in it:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch
