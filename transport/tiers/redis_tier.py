"""Redis tier: encoded blocks under a key prefix with a TTL, shared by all workers.

Redis is a cache here, never a dependency: when it is down, reads are misses and writes are
dropped (both counted), no exception reaches the caller, and the tier probes again after an
exponentially growing pause until a PING succeeds. redis-py's own retries are turned off so that
a dead server costs one failed call, not several.

Values go to redis-py as ``Gather`` arguments: the block's own buffers (header, then the tensors'
memory), which ``GatherPacker`` hands to the socket as they are. redis-py with hiredis would pack
every command into one new bytes object, i.e. copy each value once more into a fresh multi-MiB
allocation, whose page faults cost about as much as sending it; so a put costs one pass of xxh64
over the payload (the block's checksum) plus the send, and no copy.

Reads go the other way round (transport/tiers/redis_read.py): the GET replies are parsed by
hand, each value received straight into its own aligned buffer and verified while it arrives,
instead of through hiredis's three copies and a hash afterwards.
"""
from __future__ import annotations

import threading
import time
from typing import Sequence

from transport.block import DEFAULT_MAX_BLOCK_BYTES, KVBlock, decode_block, encode_block
from transport.errors import BlockError, ProtocolError
from transport.tiers.base import TierStats
from transport.tiers.redis_read import TOO_LARGE, ReplyError, pipelined_get
from transport.verify import channel_verified


SMALL_PART = 16 << 10  # parts below this are copied into the command's framing (fewer sends)


class Gather:
    """One command argument made of several buffers, sent back to back without joining them."""

    __slots__ = ("parts", "nbytes")

    def __init__(self, parts: Sequence[object]) -> None:
        views = [memoryview(p).cast("B") for p in parts]
        self.nbytes = sum(v.nbytes for v in views)
        self.parts = [bytes(v) if v.nbytes < SMALL_PART else v for v in views if v.nbytes]


class GatherPacker:
    """redis-py command packer that sends ``Gather`` arguments as their own buffers (memoryviews:
    redis-py's pack_commands keeps those as separate chunks and sendall()s each one) and packs
    every other command with redis-py's own packer."""

    def __init__(self, inner) -> None:
        self._inner = inner

    def pack(self, *args) -> list:
        if not any(isinstance(a, Gather) for a in args):
            return self._inner.pack(*args)
        out: list = []
        small = [b"*%d\r\n" % len(args)]
        for a in args:
            if not isinstance(a, Gather):
                b = _arg_bytes(a)
                small.append(b"$%d\r\n%b\r\n" % (len(b), b))
                continue
            small.append(b"$%d\r\n" % a.nbytes)
            for part in a.parts:
                if isinstance(part, bytes):
                    small.append(part)
                else:
                    out.append(b"".join(small))
                    out.append(part)
                    small = []
            small.append(b"\r\n")
        out.append(b"".join(small))
        return out


def _arg_bytes(a) -> bytes:
    """redis-py's encoding of a plain argument (its Encoder's rules)."""
    if isinstance(a, (bytes, bytearray, memoryview)):
        return bytes(a)
    if isinstance(a, str):
        return a.encode()
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        return repr(a).encode()
    raise TypeError(f"cannot send {type(a).__name__} to redis")


def _default_packer():
    """The packer redis-py would choose by itself: hiredis's where it is installed."""
    from redis.connection import Encoder, HiredisRespSerializer, PythonRespSerializer
    from redis.utils import HIREDIS_AVAILABLE
    if HIREDIS_AVAILABLE:
        return HiredisRespSerializer()
    return PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode)


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
        # RESP2: the hand-written GET reader expects no RESP3 types or push messages
        self._pool = redis.ConnectionPool.from_url(
            url, protocol=2, max_connections=max_connections, socket_timeout=socket_timeout_s,
            command_packer=GatherPacker(_default_packer()),
            socket_connect_timeout=connect_timeout_s,
            health_check_interval=health_check_interval_s, retry=no_retry)
        self.client = redis.Redis(connection_pool=self._pool, retry=no_retry)
        self._lock = threading.Lock()
        self._down_until: float | None = None
        self._backoff = backoff_initial_s
        self._value_bytes = 0  # size of the values read last (sizes one receive buffer)

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
    def get_encoded_many(self, keys: Sequence[str]) -> list[object | None]:
        """Encoded blocks (buffers) or None, checked on receipt: those that passed are
        ``VerifiedBody`` views, those that failed plain copies (their decode fails); values that
        are not blocks pass through unchecked."""
        out = self._read([self.prefix + k for k in keys])
        for b in out:
            if b is None:
                self.stats.misses += 1
            else:
                self.stats.hits += 1
                self.stats.bytes_out += len(b)
        return out

    def _read(self, keys: list[str]) -> list[object | None]:
        if not keys or not self._available():
            return [None] * len(keys)
        conn = None
        try:
            conn = self._pool.get_connection()
            # blocks of one model have one size: the last value's predicts this call's
            got = pipelined_get(conn, keys, self.max_block_bytes,
                                expect_bytes=len(keys) * (self._value_bytes + 64))
        except (self._redis.RedisError, OSError, ProtocolError):
            if conn is not None:
                conn.disconnect()  # a reply may be half read: never reuse this socket
            self._mark_down()
            return [None] * len(keys)
        finally:
            if conn is not None:
                self._pool.release(conn)
        out: list[object | None] = []
        sizes = [len(v) for v in got if isinstance(v, (bytes, memoryview))]
        if sizes:
            self._value_bytes = max(sizes)  # values over max_block_bytes came back TOO_LARGE
        for v in got:
            if v is TOO_LARGE:
                self.stats.corrupt += 1
                v = None
            elif isinstance(v, ReplyError):  # e.g. WRONGTYPE: the server is up, this key failed
                self.stats.errors += 1
                v = None
            out.append(v)
        return out

    def put_encoded_many(self, items: Sequence[tuple[str, object]]) -> None:
        # Gather: no bytes() copy of a buffer that is not bytes, and none by hiredis either
        self._put([(k, Gather([b])) for k, b in items])

    def _put(self, items: list[tuple[str, Gather]]) -> None:
        ok = [(k, g) for k, g in items if g.nbytes <= self.max_block_bytes]
        self.stats.dropped_writes += len(items) - len(ok)
        if not ok:
            return
        res = self._run(lambda p: [p.set(self.prefix + k, g, ex=self.ttl_s) for k, g in ok])
        if res is None:
            self.stats.dropped_writes += len(ok)
        else:
            self.stats.bytes_in += sum(g.nbytes for _, g in ok)

    # -- the tier interface ----------------------------------------------------------------------
    def get_many(self, keys: Sequence[str]) -> list[KVBlock | None]:
        return self.get_verified(keys)[0]

    def get_verified(self, keys: Sequence[str]) -> tuple[list[KVBlock | None], list[object | None]]:
        """Decoded blocks and their raw bytes; bad blocks are deleted, counted, and read as misses."""
        raws = self.get_encoded_many(keys)
        blocks: list[KVBlock | None] = []
        for i, (key, raw) in enumerate(zip(keys, raws)):
            blk = None
            if raw is not None:
                try:
                    blk = decode_block(raw, self.expected_fingerprint, self.max_block_bytes,
                                       verify_payload=not channel_verified(raw))
                except BlockError:
                    self.stats.corrupt += 1
                    self.stats.hits -= 1
                    self.stats.misses += 1
                    raws[i] = None
                    self.evict(key)
            blocks.append(blk)
        return blocks, raws

    def put_many(self, items: Sequence[tuple[str, KVBlock]]) -> None:
        # encode_block: the header and the tensors' own memory (a copy only for a tensor that
        # is on a device or not contiguous), sent as they are. Hashing one batch on a thread
        # while the previous one is sent was tried: no gain on 2 cores, which the send and the
        # Redis server already keep busy.
        self._put([(k, Gather(encode_block(b))) for k, b in items])

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
