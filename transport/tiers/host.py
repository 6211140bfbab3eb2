"""Host-memory tier: encoded blocks in (pinned, when CUDA is present) host buffers, LRU by bytes.

Blocks are kept encoded: that is what peers and Redis exchange, so serving a peer or writing back
to Redis needs no re-encoding, and every read re-verifies the xxh64 checksums.
"""
from __future__ import annotations

from typing import Sequence

import torch

from transport.block import DEFAULT_MAX_BLOCK_BYTES, KVBlock, decode_block, encode_block, join_parts
from transport.errors import BlockError
from transport.tiers.base import LRUBytes, TierStats


class HostTier:
    name = "host"

    def __init__(self, budget_bytes: int, pin: bool | None = None,
                 max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES,
                 expected_fingerprint: str | None = None) -> None:
        self.pin = torch.cuda.is_available() if pin is None else pin
        self.max_block_bytes = max_block_bytes
        self.expected_fingerprint = expected_fingerprint
        self.stats = TierStats()
        self._lru: LRUBytes[object] = LRUBytes(budget_bytes)

    @property
    def used_bytes(self) -> int:
        return self._lru.used

    def _store_buffer(self, parts: Sequence[memoryview]):
        """One buffer owned by this tier (pinned: a uint8 tensor; else bytes/bytearray)."""
        if self.pin:
            n = sum(p.nbytes for p in parts)
            t = torch.empty(n, dtype=torch.uint8, pin_memory=True)
            join_parts(parts, out=memoryview(t.numpy()))
            return t
        if len(parts) == 1 and isinstance(parts[0].obj, bytes) and parts[0].nbytes == len(parts[0].obj):
            return parts[0].obj  # immutable and exactly this block (e.g. from Redis): keep, no copy
        return join_parts(parts)

    def _put(self, key: str, parts: Sequence[memoryview]) -> None:
        n = sum(p.nbytes for p in parts)
        if n > self._lru.budget or n > self.max_block_bytes:
            self.stats.dropped_writes += 1
            return
        evicted = self._lru.put(key, self._store_buffer(parts), n)
        self.stats.bytes_in += n
        self.stats.evictions += len(evicted or ())

    def put_many(self, items: Sequence[tuple[str, KVBlock]]) -> None:
        for key, blk in items:
            self._put(key, encode_block(blk))

    def put_encoded_many(self, items: Sequence[tuple[str, object]]) -> None:
        """Store already encoded buffers (bytes, bytearray, memoryview) as they are."""
        for key, buf in items:
            self._put(key, [memoryview(buf).cast("B")])

    def _raw(self, key: str) -> memoryview | None:
        buf = self._lru.get(key)
        if buf is None:
            return None
        return memoryview(buf.numpy()) if isinstance(buf, torch.Tensor) else memoryview(buf)

    def get_encoded_many(self, keys: Sequence[str]) -> list[memoryview | None]:
        """Stored buffers, not verified here: the receiver (a peer) verifies what it decodes."""
        out = [self._raw(k) for k in keys]
        for b in out:
            self._count(b)
        return out

    def _count(self, buf: memoryview | None) -> None:
        if buf is None:
            self.stats.misses += 1
        else:
            self.stats.hits += 1
            self.stats.bytes_out += buf.nbytes

    def get_many(self, keys: Sequence[str]) -> list[KVBlock | None]:
        out: list[KVBlock | None] = []
        for key in keys:
            raw = self._raw(key)
            blk = None
            if raw is not None:
                try:
                    blk = decode_block(raw, self.expected_fingerprint, self.max_block_bytes)
                except BlockError:
                    self._lru.pop(key)
                    self.stats.corrupt += 1
                    raw = None
            self._count(raw)
            out.append(blk)
        return out

    def contains(self, key: str) -> bool:
        return key in self._lru

    def evict(self, key: str) -> bool:
        return self._lru.pop(key) is not None

    def __len__(self) -> int:
        return len(self._lru)
