"""Verify the blocks of a message body while it arrives.

A channel receives a message body (many encoded blocks back to back, see message.py) in chunks.
``BodyVerifier.feed(upto)`` is called after each chunk; it checks each block's header as soon as
its bytes are in (the same checks as ``decode_block``: magic, header xxh64, fields, sizes, zero
padding), then hashes the payload (xxh64, incremental) in grains of ``HASH_GRAIN`` bytes while
those bytes are still in the CPU cache. The hashing runs on a hash thread (xxhash releases the
GIL), so that it overlaps with receiving the rest of the message; ``finish()`` waits for it.
Verification is then nearly free where a core is idle, and costs one pass of xxh64 (~11 GB/s
on the 2-core dev VM) where none is. A block that fails is marked bad: the channel hands it out
outside the verified body (an unmarked copy, whose decode fails), and counts it.

Buffers that do not start with the block magic are not blocks (segment manifests travel the same
way, with their own checksum): they pass through unverified, and any ``decode_block`` of them
fails on the magic. So every marked buffer a verifying channel returns is either a verified block
or not a block at all: ``channel_verified(buf)`` tells a consumer (the TieredStore) that decoding
it with ``verify_payload=False`` is enough.
"""
from __future__ import annotations

import itertools
import os
import queue
import threading
from typing import Sequence

import numpy as np
import xxhash

from transport.block import _PREFIX, DTYPES, MAGIC, MAX_HEADER_BYTES, _pad_len, _parse_header
from transport.errors import BlockError

_HEAD, _HASH, _SKIP = 0, 1, 2  # checking the block's head, hashing its payload, skipping it
HASH_GRAIN = 1 << 20  # hash this much at a time: few Python calls, data still in cache


class VerifiedBody(np.ndarray):
    """A message body whose every block-looking buffer was verified on receipt (a marker type)."""


def verified_empty(nbytes: int, align: int = 64) -> np.ndarray:
    """An uninitialized VerifiedBody of ``nbytes``, its start aligned to ``align`` bytes (so that
    blocks, whose tensors start 64-aligned within them, decode aligned when the body is one block)."""
    raw = np.empty(nbytes + align, dtype=np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off:off + nbytes].view(VerifiedBody)


def channel_verified(buf) -> bool:
    """True if ``buf`` is (a view of) a body that a verifying channel checked on receipt."""
    obj = buf.obj if isinstance(buf, memoryview) else buf
    return isinstance(obj, VerifiedBody)


class HashThreads:
    """Daemon threads that run hash updates in order per message (each message is pinned to one
    thread; messages are spread round-robin). Started lazily, shared by every channel."""

    def __init__(self, n: int) -> None:
        self.n = max(1, n)
        self._queues: list[queue.SimpleQueue] = []
        self._rr = itertools.count()
        self._lock = threading.Lock()

    def _start(self) -> None:
        with self._lock:
            if self._queues:
                return
            for i in range(self.n):
                q: queue.SimpleQueue = queue.SimpleQueue()
                threading.Thread(target=_run_jobs, args=(q,), name=f"kv-verify-{i}",
                                 daemon=True).start()
                self._queues.append(q)

    def lane(self) -> queue.SimpleQueue:
        if not self._queues:
            self._start()
        return self._queues[next(self._rr) % self.n]


def _run_jobs(q: queue.SimpleQueue) -> None:
    while True:
        fn, args = q.get()
        try:
            fn(*args)
        except Exception:  # a job must never kill the thread (jobs catch their own errors)
            pass


def _default_threads() -> HashThreads | None:
    """Hash threads where there are cores to spare (a quarter of them, at most 4). On a 2-core
    machine a hash thread only takes turns with the receiving thread and the sender (measured:
    slower than hashing inline), so there the receiving thread hashes itself.
    ``KVCLUSTER_VERIFY_THREADS`` overrides the count (0: inline)."""
    env = os.environ.get("KVCLUSTER_VERIFY_THREADS", "").strip()
    n = int(env) if env else min(4, (os.cpu_count() or 1) // 4)
    return HashThreads(n) if n >= 1 else None


HASH_THREADS: HashThreads | None = _default_threads()


def _check_head(mv: memoryview, off: int, size: int, hlen: int, start: int) -> int:
    """decode_block's checks of a block's header; returns the payload checksum it names."""
    raw = mv[off + _PREFIX.size:off + _PREFIX.size + hlen]
    h = _parse_header(raw)
    a, b, c, d = h["shape"]
    half = a * b * c * d * DTYPES[h["dt"]][1].itemsize
    if start + 2 * half != size:
        raise BlockError("block size disagrees with its header")
    if any(mv[off + _PREFIX.size + hlen:off + start]):
        raise BlockError("non-zero padding")
    return h["ck"]


class BodyVerifier:
    """Incremental verifier of one message body; after ``finish()``, ``bad`` holds the indices
    (into ``sizes``) of the blocks that failed. Feed it growing ``upto`` (bytes received)."""

    def __init__(self, body, sizes: Sequence[int], threads: HashThreads | None | bool = True
                 ) -> None:
        """``threads``: True for the module's default (HASH_THREADS), None/False to hash inline."""
        self.body = memoryview(body).cast("B")
        self.spans: list[tuple[int, int, int]] = []  # (index into sizes, offset, size)
        off = 0
        for i, s in enumerate(sizes):
            if s >= 0:
                self.spans.append((i, off, s))
                off += s
        self.bad: list[int] = []
        if threads is True:
            threads = HASH_THREADS
        self._lane = threads.lane() if threads and self.spans else None
        self._k = 0          # current span
        self._state = _HEAD
        self._need = 0       # _HEAD: body bytes needed before the head can be checked
        self._pos = 0        # _HASH: next body offset to hash
        self._ck = 0
        self._hasher = None
        self._wake = 0       # feed() does nothing until this many bytes are in
        self._enter()

    def _enter(self) -> None:
        """Start the current span (if any): first we need its 16-byte prefix."""
        if self._k < len(self.spans):
            _, off, size = self.spans[self._k]
            self._state = _HEAD
            self._need = off + min(size, _PREFIX.size)

    def _next(self, bad: bool = False) -> None:
        if bad:
            self.bad.append(self.spans[self._k][0])
        self._k += 1
        self._hasher = None
        self._enter()

    def _head(self, upto: int) -> bool:
        """Check the current block's head if its bytes are in; False to wait for more."""
        _, off, size = self.spans[self._k]
        if upto < self._need:
            return False
        mv = self.body
        magic = bytes(mv[off:off + min(size, 4)])
        if magic != MAGIC:
            self._state = _SKIP    # not a block: an opaque record, passed through
            return True
        if size < _PREFIX.size:
            self._next(bad=True)   # a truncated block
            return True
        _, hlen, hhash = _PREFIX.unpack_from(mv, off)
        start = _PREFIX.size + hlen + _pad_len(hlen)
        if hlen > MAX_HEADER_BYTES or start > size:
            self._next(bad=True)
            return True
        if upto < off + start:
            self._need = off + start
            return False
        try:
            if xxhash.xxh64_intdigest(mv[off + _PREFIX.size:off + _PREFIX.size + hlen]) != hhash:
                raise BlockError("header checksum mismatch")
            self._ck = _check_head(mv, off, size, hlen, start)
        except BlockError:
            self._next(bad=True)
            return True
        self._hasher = xxhash.xxh64()
        self._pos, self._state = off + start, _HASH
        return True

    def feed(self, upto: int) -> None:
        """Bytes [0, upto) of the body have arrived: verify what can be verified."""
        if upto < self._wake:
            return
        while self._k < len(self.spans):
            i, off, size = self.spans[self._k]
            end = off + size
            if self._state == _HEAD:
                if not self._head(upto):
                    break
                continue
            if self._state == _SKIP:
                self._next()
                continue
            stop = min(upto, end)
            if stop - self._pos < HASH_GRAIN and stop < end:
                break
            if stop > self._pos:
                self._run(self._hasher.update, self.body[self._pos:stop])
                self._pos = stop
            if self._pos < end:
                break
            self._run(self._check_digest, self._hasher, self._ck, i)
            self._k += 1
            self._hasher = None
            self._enter()
        if self._k < len(self.spans):
            end = self.spans[self._k][1] + self.spans[self._k][2]
            self._wake = self._need if self._state == _HEAD else min(end, self._pos + HASH_GRAIN)

    def _run(self, fn, *args) -> None:
        if self._lane is None:
            fn(*args)
        else:
            self._lane.put((fn, args))

    def _check_digest(self, hasher, ck: int, index: int) -> None:
        if hasher.intdigest() != ck:
            self.bad.append(index)

    def finish(self) -> list[int]:
        """Wait for the hash thread; the indices of bad blocks. Call once the whole body is in."""
        if self._lane is not None:
            done = threading.Event()
            self._lane.put((done.set, ()))
            done.wait()
        return sorted(self.bad)

    @property
    def done(self) -> bool:
        return self._k >= len(self.spans)
