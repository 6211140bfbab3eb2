"""Host-tier memory: large slabs (pinned when CUDA is present), blocks packed at aligned offsets.

Pinning each block on its own costs twice: torch's pinned allocator rounds every allocation up
to a power of two (a 1 MiB block plus its header takes 2 MiB), and a read of n blocks to a GPU
is n copies. Here blocks live in a few slabs of ``slab_bytes`` each; blocks written together
(a segment's) are allocated one after another, so they sit back to back, at the same offsets
from each other as ``gather.plan_layout`` gives them in the device buffer: a read of them is one
copy per contiguous run (``contiguous_runs``).

The allocator is a first-fit free list per slab (sorted extents, merged with their neighbours on
free). Slabs are made lazily, up to ``max_slabs``; the caller (HostTier) evicts by LRU when an
allocation does not fit. Everything here but ``SlabPool``'s slab tensors is plain Python and
unit-tested on CPU.
"""
from __future__ import annotations

import bisect
import sys
import threading
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch

ALIGN = 64


def align_up(n: int, a: int = ALIGN) -> int:
    return -(-n // a) * a


class FreeList:
    """Free extents of one slab of ``size`` bytes: first fit, merged with neighbours on free."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._off: list[int] = [0]     # sorted starts of the free extents
        self._len: list[int] = [size]  # their lengths

    @property
    def free_bytes(self) -> int:
        return sum(self._len)

    @property
    def largest(self) -> int:
        return max(self._len, default=0)

    def alloc(self, n: int) -> int | None:
        """Offset of n bytes (n a multiple of the alignment), or None if no extent is that big."""
        for i, ln in enumerate(self._len):
            if ln >= n:
                off = self._off[i]
                if ln == n:
                    del self._off[i], self._len[i]
                else:
                    self._off[i] += n
                    self._len[i] -= n
                return off
        return None

    def free(self, off: int, n: int) -> None:
        i = bisect.bisect_left(self._off, off)
        if (i < len(self._off) and self._off[i] < off + n) or \
                (i > 0 and self._off[i - 1] + self._len[i - 1] > off) or off + n > self.size:
            raise ValueError(f"free of [{off}, {off + n}) overlaps free space or the slab end")
        merge_prev = i > 0 and self._off[i - 1] + self._len[i - 1] == off
        merge_next = i < len(self._off) and self._off[i] == off + n
        if merge_prev and merge_next:
            self._len[i - 1] += n + self._len[i]
            del self._off[i], self._len[i]
        elif merge_prev:
            self._len[i - 1] += n
        elif merge_next:
            self._off[i] = off
            self._len[i] += n
        else:
            self._off.insert(i, off)
            self._len.insert(i, n)

    def extents(self) -> list[tuple[int, int]]:
        return list(zip(self._off, self._len))


@dataclass(eq=False)
class Slot:
    """n bytes at ``off`` in slab ``slab``. ``view`` (a numpy uint8 array over exactly those
    bytes) is what the tier hands out, always wrapped in a memoryview: every object derived from
    it then references ``view``, so its reference count tells whether anyone still reads it."""

    slab: int
    off: int
    n: int
    view: np.ndarray = field(repr=False)

    @property
    def span(self) -> int:
        return align_up(self.n)


class SlabPool:
    """Slabs of ``slab_bytes`` (at most ``max_slabs``), allocated on first use.

    Freed slots are not reused at once: a reader may still hold a view of them (a block served
    to a peer, a CPU block). ``release`` queues them; ``alloc`` first takes back the queued ones
    that nothing references any more. Callers serialize alloc/release (HostTier's lock)."""

    def __init__(self, slab_bytes: int, max_slabs: int, pin: bool = False) -> None:
        if slab_bytes % ALIGN:
            raise ValueError("slab_bytes must be a multiple of 64")
        self.slab_bytes = slab_bytes
        self.max_slabs = max(1, max_slabs)
        self.pin = pin
        self.slabs: list[torch.Tensor] = []
        self._np: list[np.ndarray] = []
        self._free: list[FreeList] = []
        self._pending: list[Slot] = []
        self._plock = threading.Lock()  # release() may come from any thread

    @property
    def capacity(self) -> int:
        return len(self.slabs) * self.slab_bytes

    @property
    def free_bytes(self) -> int:
        return sum(f.free_bytes for f in self._free)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _new_slab(self) -> bool:
        if len(self.slabs) >= self.max_slabs:
            return False
        t = torch.empty(self.slab_bytes, dtype=torch.uint8, pin_memory=self.pin)
        self.slabs.append(t)
        self._np.append(t.numpy())
        self._free.append(FreeList(self.slab_bytes))
        return True

    def alloc(self, n: int, grow: bool = True) -> Slot | None:
        """A slot of n bytes (first fit over the slabs, then a new slab if ``grow`` and the limit
        allows); None if it does not fit now (the caller evicts and tries again)."""
        span = align_up(max(n, 1))
        if span > self.slab_bytes:
            return None
        self.reclaim()
        for i, fl in enumerate(self._free):
            off = fl.alloc(span)
            if off is not None:
                return Slot(i, off, n, self._np[i][off:off + n])
        if grow and self._new_slab():
            i = len(self.slabs) - 1
            off = self._free[i].alloc(span)
            return Slot(i, off, n, self._np[i][off:off + n])
        return None

    def release(self, slot: Slot) -> None:
        """Give a slot back; reused once nothing references its view."""
        with self._plock:
            self._pending.append(slot)

    def reclaim(self) -> int:
        """Free the released slots that no one references any more; how many were freed."""
        with self._plock:
            pending, self._pending = self._pending, []
        keep, freed = [], 0
        for s in pending:
            # references: s.view and getrefcount's own argument; more = a reader still holds it
            if sys.getrefcount(s.view) <= 2:
                self._free[s.slab].free(s.off, s.span)
                freed += 1
            else:
                keep.append(s)
        with self._plock:
            self._pending[:0] = keep
        return freed

    def source(self, slab: int, off: int, nbytes: int) -> torch.Tensor:
        """The slab bytes [off, off + nbytes) as a (pinned, if the slab is) uint8 tensor."""
        return self.slabs[slab][off:off + nbytes]


def contiguous_runs(slots: Sequence[Slot | None], max_bytes: int | None = None
                    ) -> Iterator[tuple[int, int]]:
    """Maximal runs [a, b) of consecutive slots that lie back to back in one slab, in this order
    (each next one at the previous one's offset + its aligned size); None breaks a run, and so
    does reaching ``max_bytes``. A run [a, b) is the slab bytes [slots[a].off, slots[b-1].off +
    slots[b-1].n). A generator: a caller can start copying the first run before the rest are found."""
    n, a = len(slots), 0
    while a < n:
        if slots[a] is None:
            a += 1
            continue
        b, end = a + 1, slots[a].off + slots[a].span
        while b < n and (s := slots[b]) is not None and s.slab == slots[a].slab and s.off == end \
                and (max_bytes is None or end + s.n - slots[a].off <= max_bytes):
            end += s.span
            b += 1
        yield a, b
        a = b
