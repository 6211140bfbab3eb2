"""GPU tier: blocks as tensors on the worker's device, LRU within a byte budget.

Without CUDA it keeps CPU tensors, so the same code is tested on CPU-only machines. Blocks are
verified with a device-side checksum (see transport/checksum.py): xxh64 would need a copy to the
host on every read.
"""
from __future__ import annotations

from typing import Sequence

import torch

from transport.block import KVBlock
from transport.checksum import device_checksums
from transport.tiers.base import LRUBytes, TierStats


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


class GPUTier:
    name = "gpu"

    def __init__(self, budget_bytes: int, device: torch.device | str | None = None,
                 verify: bool = True) -> None:
        self.device = torch.device(device) if device is not None else default_device()
        if self.device.type == "cuda" and self.device.index is None:  # "cuda" -> "cuda:N", so
            self.device = torch.device("cuda", torch.cuda.current_device())  # it compares equal
        self.verify = verify
        self.stats = TierStats()
        self._lru: LRUBytes[tuple[KVBlock, tuple]] = LRUBytes(budget_bytes)

    @property
    def used_bytes(self) -> int:
        return self._lru.used

    def _own_copy(self, t: torch.Tensor) -> torch.Tensor:
        # Always copy: the caller's tensor may be a view into a larger segment (its storage would
        # stay alive, outside the budget) or may be overwritten later.
        out = torch.empty(t.shape, dtype=t.dtype, device=self.device)
        out.copy_(t, non_blocking=True)
        return out

    def put_many(self, items: Sequence[tuple[str, KVBlock]], owned: bool = False,
                 sums: Sequence[tuple | None] | None = None) -> list[KVBlock | None]:
        """Store copies on the device; returns them (None where a block can never fit).

        ``owned=True``: the blocks are fresh tensors on this device that nobody else writes
        (the host tier's device reads): kept as they are, no copy. ``sums``: their device
        checksums, just verified by the caller (else computed here). Blocks kept this way may
        be views of one larger buffer, which stays allocated until all of them are evicted."""
        fits = [(n, k, b) for n, (k, b) in enumerate(items) if b.nbytes <= self._lru.budget]
        self.stats.dropped_writes += len(items) - len(fits)
        if owned and all(b.keys.device == self.device for _, _, b in fits):
            copies = [b for _, _, b in fits]
        else:
            copies = [KVBlock(b.fingerprint, b.layers, b.token_hash,
                              self._own_copy(b.keys), self._own_copy(b.values))
                      for _, _, b in fits]
            sums = None  # the caller's sums were of its tensors, not of these copies
        if not self.verify:
            sums = [()] * len(copies)
        elif sums is None or any(sums[n] is None for n, _, _ in fits):
            sums = self._checksums(copies)
        else:
            sums = [tuple(sums[n]) for n, _, _ in fits]
        fits = [(k, b) for _, k, b in fits]
        stored = {}
        for (key, _), blk, ck in zip(fits, copies, sums):
            evicted = self._lru.put(key, (blk, ck), blk.nbytes)
            self.stats.bytes_in += blk.nbytes
            self.stats.evictions += len(evicted or ())
            stored[key] = blk
        return [stored.get(k) for k, _ in items]

    @staticmethod
    def _checksums(blocks: Sequence[KVBlock]) -> list[tuple[int, ...]]:
        flat = device_checksums([t for b in blocks for t in (b.keys, b.values)])
        return [tuple(flat[2 * i] + flat[2 * i + 1]) for i in range(len(blocks))]

    def get_many(self, keys: Sequence[str]) -> list[KVBlock | None]:
        entries = [self._lru.get(k) for k in keys]
        found = [i for i, e in enumerate(entries) if e is not None]
        if self.verify and found:
            now = self._checksums([entries[i][0] for i in found])
            for i, ck in zip(found, now):
                if ck != entries[i][1]:
                    self._lru.pop(keys[i])
                    self.stats.corrupt += 1
                    entries[i] = None
        out: list[KVBlock | None] = []
        for e in entries:
            if e is None:
                self.stats.misses += 1
                out.append(None)
            else:
                self.stats.hits += 1
                self.stats.bytes_out += e[0].nbytes
                out.append(e[0])
        return out

    def contains(self, key: str) -> bool:
        return key in self._lru

    def evict(self, key: str) -> bool:
        return self._lru.pop(key) is not None

    def __len__(self) -> int:
        return len(self._lru)
