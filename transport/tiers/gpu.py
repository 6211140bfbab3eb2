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

SLAB_BYTES = 64 << 20  # blocks copied in together share buffers of at most this size


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
            copies = self._slab_copies([b for _, _, b in fits])
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

    def _slab_copies(self, blocks: list[KVBlock]) -> list[KVBlock]:
        """Copies of the blocks, each run of equal-shaped ones in one buffer [n, 2, ...] (keys,
        values; at most SLAB_BYTES or one block): their checksums then take two reductions per
        buffer instead of two per tensor. Always copies: the caller's tensor may be a view into a
        larger segment (its storage would stay alive, outside the budget) or be overwritten later.
        A buffer stays allocated until all its blocks are evicted; a segment's blocks are put,
        read and aged together, so they mostly leave together, and SLAB_BYTES bounds the rest."""
        out: list[KVBlock] = []
        a = 0
        while a < len(blocks):
            k0 = blocks[a].keys
            b = a + 1
            per_slab = max(1, SLAB_BYTES // blocks[a].nbytes)
            while (b < len(blocks) and b - a < per_slab and blocks[b].keys.shape == k0.shape
                   and blocks[b].keys.dtype == k0.dtype):
                b += 1
            slab = torch.empty((b - a, 2, *k0.shape), dtype=k0.dtype, device=self.device)
            for i, blk in enumerate(blocks[a:b]):
                slab[i, 0].copy_(blk.keys, non_blocking=True)
                slab[i, 1].copy_(blk.values, non_blocking=True)
                out.append(KVBlock(blk.fingerprint, blk.layers, blk.token_hash, slab[i, 0], slab[i, 1]))
            a = b
        return out

    @staticmethod
    def _checksums(blocks: Sequence[KVBlock]) -> list[tuple[int, ...]]:
        # keys, then values: in a slab and in the host tier's gathered reads each list is one
        # constant-stride run (see transport.checksum.strided_runs)
        n = len(blocks)
        flat = device_checksums([b.keys for b in blocks] + [b.values for b in blocks])
        return [tuple(flat[i] + flat[n + i]) for i in range(n)]

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
