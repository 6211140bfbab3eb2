"""Stored KV of earlier prompts ("segments"), kept with keys before RoPE so they can move."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch


@dataclass
class SegmentKV:
    """KV of one stored prompt.

    ``keys``/``values``: [n_stored_layers, n_kv_heads, n_tokens, head_dim]; keys are pre-RoPE.
    ``layers`` names the model layers held (all of them unless KVSharer shares some).
    """

    segment_id: str
    fingerprint: str
    token_ids: np.ndarray
    keys: torch.Tensor
    values: torch.Tensor
    layers: tuple[int, ...]
    tenant: str = "default"
    scope: str = "private"
    meta: dict = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return int(self.keys.shape[2])

    @property
    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() * 2


class SegmentStore(Protocol):
    def put(self, seg: SegmentKV) -> None: ...
    def get(self, segment_id: str) -> SegmentKV | None: ...
    def contains(self, segment_id: str) -> bool: ...
    def evict(self, segment_id: str) -> bool: ...


class InMemorySegmentStore:
    """Segments in process memory, least recently used evicted first past ``max_bytes``."""

    def __init__(self, max_bytes: int = 4 << 30, on_evict=None) -> None:
        self.max_bytes = max_bytes
        self.on_evict = on_evict  # called with the segment id, e.g. to drop it from the index
        self._segs: OrderedDict[str, SegmentKV] = OrderedDict()
        self.bytes = 0

    def put(self, seg: SegmentKV) -> None:
        self.evict(seg.segment_id, notify=False)
        self._segs[seg.segment_id] = seg
        self.bytes += seg.nbytes
        while self.bytes > self.max_bytes and len(self._segs) > 1:
            victim = next(iter(self._segs))
            self.evict(victim)

    def get(self, segment_id: str) -> SegmentKV | None:
        seg = self._segs.get(segment_id)
        if seg is not None:
            self._segs.move_to_end(segment_id)
        return seg

    def contains(self, segment_id: str) -> bool:
        return segment_id in self._segs

    def evict(self, segment_id: str, notify: bool = True) -> bool:
        seg = self._segs.pop(segment_id, None)
        if seg is None:
            return False
        self.bytes -= seg.nbytes
        if notify and self.on_evict is not None:
            self.on_evict(segment_id)
        return True

    def __len__(self) -> int:
        return len(self._segs)

    def ids(self) -> list[str]:
        return list(self._segs)
