"""The engine's SegmentStore on top of transport's TieredStore (GPU -> host -> peer -> Redis).

A segment is stored as KV blocks of ``block_tokens`` tokens under
``block_key(fingerprint, segment_id, i)``, plus a small manifest record (msgpack, with its own
xxh64) naming the token ids, layers, tenant, scope and block count. ``get`` reassembles the
segment; any missing, corrupt or inconsistent block makes it return None, and the engine
recomputes: a cache miss must never turn into wrong KV.
"""
from __future__ import annotations

import logging

import msgpack
import numpy as np
import xxhash

from transport.block import KVBlock, block_key, join_blocks, split_segment, token_hash
from transport.tiers.tiered import TieredStore
from workers.segments import SegmentKV

log = logging.getLogger(__name__)
MANIFEST_VERSION = 1


class TieredSegmentStore:
    """SegmentStore for one model (``fingerprint``): segments as blocks in a TieredStore."""

    def __init__(self, store: TieredStore, fingerprint: str, block_tokens: int = 64) -> None:
        self.store = store
        self.fingerprint = fingerprint
        self.block_tokens = block_tokens
        self.bad_segments = 0  # gets that found a segment but could not use it

    def _manifest_key(self, segment_id: str) -> str:
        return f"{self.fingerprint}:{segment_id}:manifest"

    def _block_keys(self, segment_id: str, n_blocks: int) -> list[str]:
        return [block_key(self.fingerprint, segment_id, i) for i in range(n_blocks)]

    def put(self, seg: SegmentKV) -> None:
        if seg.fingerprint != self.fingerprint:
            raise ValueError(f"segment of model {seg.fingerprint!r} in a store for {self.fingerprint!r}")
        ids = np.ascontiguousarray(seg.token_ids, dtype=np.int32)
        blocks = split_segment(seg.keys, seg.values, seg.fingerprint, seg.layers, ids,
                               self.block_tokens)
        self.store.put_many(list(zip(self._block_keys(seg.segment_id, len(blocks)), blocks)))
        body = msgpack.packb({
            "v": MANIFEST_VERSION, "segment_id": seg.segment_id, "fp": seg.fingerprint,
            "token_ids": ids.astype("<i4").tobytes(), "layers": list(seg.layers),
            "tenant": seg.tenant, "scope": seg.scope, "n_blocks": len(blocks),
            "block_tokens": self.block_tokens,
        })
        self.store.put_record(self._manifest_key(seg.segment_id),
                              xxhash.xxh64_digest(body) + body)

    def _manifest(self, segment_id: str) -> dict | None:
        raw = self.store.get_record(self._manifest_key(segment_id))
        if raw is None or len(raw) < 8 or xxhash.xxh64_digest(raw[8:]) != raw[:8]:
            return None
        try:
            m = msgpack.unpackb(raw[8:], raw=False)
        except Exception:
            return None
        try:
            n_ids, bt = len(m["token_ids"]) // 4, m["block_tokens"]
            ok = (m["v"] == MANIFEST_VERSION and m["segment_id"] == segment_id
                  and m["fp"] == self.fingerprint and isinstance(m["token_ids"], bytes)
                  and len(m["token_ids"]) % 4 == 0 and n_ids > 0
                  and type(bt) is int and bt > 0 and m["n_blocks"] == -(-n_ids // bt)
                  and all(type(x) is int for x in m["layers"])
                  and isinstance(m["tenant"], str) and isinstance(m["scope"], str))
        except (KeyError, TypeError):
            ok = False
        return m if ok else None

    def get(self, segment_id: str) -> SegmentKV | None:
        m = self._manifest(segment_id)
        if m is None:
            return None
        blocks = self.store.get_many(self._block_keys(segment_id, m["n_blocks"]))
        ids = np.frombuffer(m["token_ids"], dtype="<i4").astype(np.int32)
        if not self._consistent(m, blocks, ids):
            self.bad_segments += 1
            return None
        keys, values = join_blocks(blocks)
        return SegmentKV(segment_id=segment_id, fingerprint=self.fingerprint, token_ids=ids,
                         keys=keys, values=values, layers=tuple(m["layers"]),
                         tenant=m["tenant"], scope=m["scope"])

    def _consistent(self, m: dict, blocks: list[KVBlock | None], ids: np.ndarray) -> bool:
        """Every block present, of this model and layer set, for exactly these tokens."""
        bt, layers = m["block_tokens"], tuple(m["layers"])
        if any(b is None for b in blocks) or len(blocks) != -(-len(ids) // bt):
            return False
        for i, b in enumerate(blocks):
            chunk = ids[i * bt:(i + 1) * bt]
            if (b.fingerprint != self.fingerprint or b.layers != layers
                    or b.n_tokens != len(chunk) or b.token_hash != token_hash(chunk)
                    or b.keys.shape[1::2] != blocks[0].keys.shape[1::2]  # heads, head_dim
                    or b.keys.dtype != blocks[0].keys.dtype):
                log.debug("segment %s: block %d does not match its manifest", m["segment_id"], i)
                return False
        return True

    def contains(self, segment_id: str) -> bool:
        m = self._manifest(segment_id)
        return m is not None and all(self.store.contains(k)
                                     for k in self._block_keys(segment_id, m["n_blocks"]))

    def evict(self, segment_id: str) -> bool:
        m = self._manifest(segment_id)
        if m is None:
            return False
        for k in self._block_keys(segment_id, m["n_blocks"]):
            self.store.evict(k)
        return self.store.evict(self._manifest_key(segment_id))
