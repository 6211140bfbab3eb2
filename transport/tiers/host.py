"""Host-memory tier: encoded blocks in (pinned, when CUDA is present) host buffers, LRU by bytes.

Blocks are kept encoded: that is what peers and Redis exchange, so serving a peer or writing back
to Redis needs no re-encoding. Reads re-verify the block. Reads *to a device* (``get_many(keys,
device=...)``) verify the payload there instead, with the device checksum recorded when the block
was stored (after a full xxh64 check): xxh64 on the CPU runs at ~10 GB/s, a pinned copy to an
H100 at ~54 GB/s, so hashing on the host would cap the host -> GPU path at a fifth of its speed.

Blocks are stored in large slabs (pinned when CUDA is present; transport/tiers/slab.py), packed
at 64-aligned offsets: blocks written together sit back to back. A read of many blocks to a
device moves each run of blocks that lie back to back in a slab in ONE copy (the whole encoded
blocks, padding included) into ONE device buffer laid out the same way, and verifies and views
them a strided group at a time (transport/tiers/gather.py): a few CUDA calls per run instead of
~10 per block. The byte budget is the LRU's (encoded bytes); the slabs hold at most one slab
more than the budget, and an allocation that does not fit (fragmentation) evicts further by LRU.
A freed slot is reused only once no reader holds a view of it (views handed out on the CPU
paths), and device reads hold the tier's lock until their copies have finished. What a block's header
says (dtype, shape, layers, ...) is taken once at put, after the full check, and kept beside the
buffer: the device read uses that, never the header bytes in memory again, and the payload is
checked against the device checksums recorded at put.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from transport.block import (_NAME_OF, DEFAULT_MAX_BLOCK_BYTES, KVBlock, decode_block,
                             encode_block, join_parts)
from transport.checksum import device_checksums
from transport.errors import BlockError
from transport.tiers import gather
from transport.tiers.base import LRUBytes, TierStats
from transport.tiers.slab import ALIGN as SLAB_ALIGN, SlabPool, Slot, contiguous_runs

DEFAULT_SLAB_BYTES = 64 << 20
# a run of blocks is copied in pieces of at most this: the first copy starts after a few blocks
# are planned, not a whole slab's, and the rest of the planning overlaps it
RUN_COPY_BYTES = 16 << 20


@dataclass(frozen=True)
class _Verified:
    """Kept beside a buffer that passed the full check at put: its device checksums and layout."""

    sums: list            # [[k_sum, k_odd], [v_sum, v_odd]] as transport.checksum computes them
    layout: gather.Layout
    flat: tuple = ()      # the same four numbers, flat, as GPUTier keeps them


class HostTier:
    name = "host"

    def __init__(self, budget_bytes: int, pin: bool | None = None,
                 max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES,
                 expected_fingerprint: str | None = None,
                 device_verify: bool | None = None, gather_below: int = 0,
                 slab_bytes: int | None = None) -> None:
        self.pin = torch.cuda.is_available() if pin is None else pin
        # record device checksums at put time (so reads to a GPU can verify there)
        self.device_verify = torch.cuda.is_available() if device_verify is None else device_verify
        self.max_block_bytes = max_block_bytes
        self.expected_fingerprint = expected_fingerprint
        # device reads: blocks smaller than this are gathered into one pinned staging buffer
        # on the CPU and sent in one copy (0: never; every block is sent from its own buffer)
        self.gather_below = gather_below
        self.stats = TierStats()
        # key -> (buffer, _Verified or None); a buffer in a slab is its Slot's numpy view
        self._lru: _SlabLRU = _SlabLRU(budget_bytes, self._dropped)
        self._slots: dict[str, Slot] = {}
        if slab_bytes is None:  # 64 MiB, or the budget rounded up to a power of two if smaller
            slab_bytes = min(DEFAULT_SLAB_BYTES, 1 << max(12, (max(budget_bytes, 1) - 1).bit_length()))
        slab_bytes = -(-slab_bytes // SLAB_ALIGN) * SLAB_ALIGN
        self._pool = SlabPool(slab_bytes, -(-budget_bytes // slab_bytes) + 1, pin=self.pin)
        # held by puts and by device reads (until their copies are done): no slot is reused
        # while a copy may still read it
        self._lock = threading.RLock()
        self._staging: torch.Tensor | None = None
        self._staging_lock = threading.Lock()
        self._streams: dict = {}  # per device: the side stream device reads copy on

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
        return b"".join(parts)

    def _dropped(self, key: str, value) -> None:
        """An entry left the LRU (evicted, replaced, discarded): give its slot back."""
        slot = self._slots.get(key)
        if slot is not None and value[0] is slot.view:
            del self._slots[key]
            self._pool.release(slot)

    def _put(self, key: str, parts: Sequence[memoryview], block: bool = True) -> None:
        n = sum(p.nbytes for p in parts)
        if n > self._lru.budget or n > self.max_block_bytes:
            self.stats.dropped_writes += 1
            return
        with self._lock:
            self._lru.pop(key)
            evicted = 0
            while self._lru.used + n > self._lru.budget and self._lru.pop_oldest() is not None:
                evicted += 1
            slot = self._pool.alloc(n)
            fits = -(-n // SLAB_ALIGN) * SLAB_ALIGN <= self._pool.slab_bytes
            while slot is None and fits and self._lru.pop_oldest() is not None:  # fragmented
                evicted += 1
                slot = self._pool.alloc(n)
            self.stats.evictions += evicted
            if slot is None:  # bigger than a slab, or the slabs' free space is still being read
                buf = self._store_buffer(parts)
            else:
                join_parts(parts, out=memoryview(slot.view))
                buf = slot.view
            dsum = None
            if self.device_verify and block:
                dsum = self._device_checksums(buf)
                if dsum is None:
                    if slot is not None:
                        self._pool.release(slot)
                    return
            if slot is not None:
                self._slots[key] = slot
            self.stats.evictions += len(self._lru.put(key, (buf, dsum), n) or ())
            self.stats.bytes_in += n

    def _device_checksums(self, buf) -> _Verified | None:
        """Fully verify once (xxh64), then record the device checksums and layout; None if corrupt."""
        mv = _view(buf)
        try:
            blk = decode_block(mv, self.expected_fingerprint, self.max_block_bytes)
        except BlockError:
            self.stats.corrupt += 1
            return None
        half = blk.nbytes // 2
        layout = gather.Layout(mv.nbytes - 2 * half, half, _NAME_OF[blk.keys.dtype],
                               tuple(blk.keys.shape), blk.fingerprint, blk.layers, blk.token_hash)
        sums = device_checksums([blk.keys, blk.values])
        return _Verified(sums, layout, (sums[0][0], sums[0][1], sums[1][0], sums[1][1]))

    def put_many(self, items: Sequence[tuple[str, KVBlock]]) -> None:
        for key, blk in items:
            self._put(key, encode_block(blk))

    def put_encoded_many(self, items: Sequence[tuple[str, object]]) -> None:
        """Store already encoded blocks (bytes, bytearray, memoryview) as they are."""
        for key, buf in items:
            self._put(key, [memoryview(buf).cast("B")])

    def put_records(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Store small opaque records (segment manifests, checked by their reader): not KV
        blocks, so never decoded for device checksums (with ``device_verify`` a record that is
        not a block would be dropped as corrupt)."""
        for key, buf in items:
            self._put(key, [memoryview(buf).cast("B")], block=False)

    def _raw(self, key: str) -> memoryview | None:
        e = self._lru.get(key)
        return None if e is None else _view(e[0])

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

    def get_many(self, keys: Sequence[str], device: torch.device | str | None = None
                 ) -> list[KVBlock | None]:
        """Verified blocks: views of the stored buffers, or copies on ``device`` if given."""
        if device is not None and self.device_verify:
            return self.get_many_to_device(keys, device)[0]
        out: list[KVBlock | None] = []
        for key in keys:
            e = self._lru.get(key)
            raw = None if e is None else _view(e[0])
            blk = None
            if raw is not None:
                try:
                    blk = decode_block(raw, self.expected_fingerprint, self.max_block_bytes)
                except BlockError:
                    self._discard(key)
            out.append(blk)
        if device is not None:
            out = [b.to(device, non_blocking=True) if b is not None else None for b in out]
        for b in out:
            self._count_block(b)
        return out

    def get_many_to_device(self, keys: Sequence[str], device: torch.device | str
                           ) -> tuple[list[KVBlock | None], list[tuple | None]]:
        """Blocks on ``device``, verified there, with their device checksums as GPUTier keeps
        them ((k_sum, k_odd, v_sum, v_odd), None for a miss). The blocks are views of one fresh
        device buffer that nothing else references. Needs ``device_verify``."""
        if not self.device_verify:
            raise ValueError("get_many_to_device needs a tier built with device_verify=True")
        with self._lock:  # no slot read here is reused before the read-back below
            return self._get_many_to_device(keys, device)

    def _get_many_to_device(self, keys: Sequence[str], device: torch.device | str
                            ) -> tuple[list[KVBlock | None], list[tuple | None]]:
        entries = self._lru.get_many(keys)
        hit = [i for i, e in enumerate(entries) if e is not None and e[1] is not None]
        out: list[KVBlock | None] = [None] * len(keys)
        sums_out: list[tuple | None] = [None] * len(keys)
        for i, e in enumerate(entries):  # stored without checksums (cannot happen with
            if e is not None and e[1] is None:  # device_verify): verify the slow way
                self._discard(keys[i])
        if hit:
            # (list comprehensions: this is all host work before the first copy is issued)
            slot_of, bufs_in = self._slots.get, [entries[i][0] for i in hit]
            slots: list[Slot | None] = [slot_of(keys[i]) for i in hit]
            slots = [s if s is not None and s.view is b else None for s, b in zip(slots, bufs_in)]
            bufs: list[torch.Tensor | None] = [None if s is not None else _as_u8(b) for s, b in zip(slots, bufs_in)]
            offs, total = gather.plan_layout([s.n if s is not None else b.numel()
                                              for s, b in zip(slots, bufs)])
            dev = torch.empty(max(total, gather.ALIGN), dtype=torch.uint8, device=device)
            side = self._side_stream(dev.device)
            if side is not None:  # copies on a side stream: each run's checksums overlap the next copy
                side.wait_stream(torch.cuda.current_stream(dev.device))
                with torch.cuda.stream(side):
                    segments = self._copy_runs(dev, slots, offs, events=True)
                    segments += self._copy_in(dev, bufs, offs, events=True)
            else:
                segments = self._copy_runs(dev, slots, offs) + self._copy_in(dev, bufs, offs)
            vers = [entries[i][1] for i in hit]
            lays = [x.layout for x in vers]
            kinds = [x.kind for x in lays]
            parts = []
            for a0, b0, done in sorted(segments, key=lambda t: t[0]):
                if done is not None:
                    torch.cuda.current_stream(dev.device).wait_event(done)
                for a, b, stride in gather.uniform_groups(offs[a0:b0], kinds[a0:b0]):
                    a, b = a + a0, b + a0
                    ks, vs = gather.group_views(dev, offs[a], b - a, stride, lays[a])
                    parts.append(gather.group_checksums(dev, offs[a], b - a, stride, lays[a]))
                    for n, k, v in zip(range(a, b), ks, vs):
                        lay = lays[n]
                        out[hit[n]] = KVBlock(lay.fingerprint, lay.layers, lay.token_hash, k, v)
                        sums_out[hit[n]] = vers[n].flat
            want = np.array([x.flat for x in vers], dtype=np.uint64)
            # one blocking read-back: it also waits for the copies above (same stream)
            got = (torch.cat(parts) if len(parts) > 1 else parts[0]).cpu()
            bad = (got.numpy().reshape(-1, 4).view(np.uint64) != want).any(axis=1)
            for n in np.flatnonzero(bad).tolist():
                self._discard(keys[hit[n]])
                out[hit[n]] = sums_out[hit[n]] = None
        for b in out:
            self._count_block(b)
        return out, sums_out

    def _side_stream(self, device: torch.device):
        if device.type != "cuda":
            return None
        st = self._streams.get(device)
        if st is None:
            st = self._streams[device] = torch.cuda.Stream(device)
        return st

    def _copy_runs(self, dev: torch.Tensor, slots: list[Slot | None], offs: list[int],
                   events: bool = False) -> list[tuple[int, int, object]]:
        """Slab blocks -> their offsets in ``dev``: one copy per run of blocks back to back in a
        slab (the device layout, 64-aligned back to back, is the slab's for such a run).
        Returns segments [a, b) of neighbouring runs, ~RUN_COPY_BYTES each, with a CUDA event
        after their copies (when ``events``): blocks read out of order are single-block runs, and
        one event and one checksum group per block would cost more than the copies."""
        out: list[tuple[int, int, object]] = []
        seg_a = seg_b = None
        pending = 0
        for a, b in contiguous_runs(slots, RUN_COPY_BYTES):
            if seg_a is not None and a != seg_b:  # a block not in a slab in between
                out.append((seg_a, seg_b, _recorded() if events else None))
                seg_a, pending = None, 0
            first, last = slots[a], slots[b - 1]
            nbytes = last.off + last.n - first.off
            dev[offs[a]:offs[a] + nbytes].copy_(self._pool.source(first.slab, first.off, nbytes),
                                                non_blocking=True)
            seg_a, seg_b = (a if seg_a is None else seg_a), b
            pending += nbytes
            if pending >= RUN_COPY_BYTES:
                out.append((seg_a, seg_b, _recorded() if events else None))
                seg_a, pending = None, 0
        if seg_a is not None:
            out.append((seg_a, seg_b, _recorded() if events else None))
        return out

    def _copy_in(self, dev: torch.Tensor, bufs: list[torch.Tensor | None], offs: list[int],
                 events: bool = False) -> list[tuple[int, int, object]]:
        """Host buffers not in a slab (None: copied by ``_copy_runs``) -> their offsets in
        ``dev``: small blocks gathered through the pinned staging buffer in one copy (if
        ``gather_below`` says so), the others one copy each. Returns each block as a segment
        [n, n + 1) with one event after all of them (when ``events``)."""
        todo = [n for n, b in enumerate(bufs) if b is not None]
        small = [n for n, b in enumerate(bufs) if b is not None and b.numel() < self.gather_below
                 and b.numel() % gather.ALIGN == 0]
        if len(small) > 1:
            # consecutive runs of small blocks sit back to back (sizes are 64-multiples)
            runs, a = [], 0
            while a < len(small):
                b = a + 1
                while b < len(small) and small[b] == small[b - 1] + 1:
                    b += 1
                runs.append(small[a:b])
                a = b
            with self._staging_lock:
                for run in runs:
                    if len(run) == 1:
                        continue
                    n = sum(bufs[j].numel() for j in run)
                    st = self._stage(n)
                    torch.cat([bufs[j] for j in run], out=st[:n])
                    dev[offs[run[0]]:offs[run[0]] + n].copy_(st[:n], non_blocking=True)
                    # the staging buffer is reused by the next read: wait for this copy
                    torch.cuda.current_stream(dev.device).synchronize() if dev.is_cuda else None
                    for j in run:
                        bufs[j] = None
        # (torch._foreach_copy_ of the same was slower on an H100: 0.64 vs 0.76 of a raw copy)
        for n, b in enumerate(bufs):
            if b is not None:
                dev[offs[n]:offs[n] + b.numel()].copy_(b, non_blocking=True)
        done = None
        if events and todo:
            done = torch.cuda.Event()
            done.record()
        return [(n, n + 1, done) for n in todo]

    def _stage(self, n: int) -> torch.Tensor:
        if self._staging is None or self._staging.numel() < n:
            size = 1 << max(20, (n - 1).bit_length())  # grown in powers of two, as pinned
            self._staging = torch.empty(size, dtype=torch.uint8, pin_memory=self.pin)
        return self._staging

    def _discard(self, key: str) -> None:
        self._lru.pop(key)
        self.stats.corrupt += 1

    def _count_block(self, blk: KVBlock | None) -> None:
        if blk is None:
            self.stats.misses += 1
        else:
            self.stats.hits += 1
            self.stats.bytes_out += blk.nbytes

    def contains(self, key: str) -> bool:
        return key in self._lru

    def evict(self, key: str) -> bool:
        return self._lru.pop(key) is not None

    def __len__(self) -> int:
        return len(self._lru)


class _SlabLRU(LRUBytes):
    """LRUBytes that tells the tier about every entry leaving it (so its slot goes back)."""

    def __init__(self, budget: int, on_drop) -> None:
        super().__init__(budget)
        self._on_drop = on_drop

    def dropped(self, key, value) -> None:
        self._on_drop(key, value)


def _recorded() -> torch.cuda.Event:
    ev = torch.cuda.Event()
    ev.record()
    return ev


def _view(buf) -> memoryview:
    return memoryview(buf.numpy()) if isinstance(buf, torch.Tensor) else memoryview(buf)


def _as_u8(buf) -> torch.Tensor:
    """A flat uint8 tensor over a stored buffer (pinned tensors as they are)."""
    if isinstance(buf, torch.Tensor):
        return buf
    return torch.from_numpy(np.frombuffer(buf, dtype=np.uint8))
