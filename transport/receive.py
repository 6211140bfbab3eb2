"""What every channel does with a message body it receives (TCP and UCX alike).

A body (many encoded blocks back to back, see message.py) is received into a buffer taken from
``POOL``; the blocks handed out are memoryview slices of it, so the buffer goes back to the pool
by itself once the caller drops the last of them. A verifying channel receives into a
``VerifiedBody`` view and feeds a ``BodyVerifier`` as bytes arrive; ``blocks_of`` then replaces
any block that failed by an unmarked copy (whose decode fails) and counts it.
"""
from __future__ import annotations

import logging
import sys
import threading

import numpy as np

from transport.errors import ProtocolError
from transport.message import pack_message, split_body
from transport.verify import BodyVerifier, VerifiedBody, channel_verified

log = logging.getLogger(__name__)


class BodyPool:
    """Receive buffers reused once nothing refers to them. A fresh multi-MiB buffer per message
    costs a page fault per 4 KiB on first write (~15% of a loopback transfer here); the raw socket
    it is compared with reuses one buffer. A buffer is free again when no block view of it is
    alive: every view holds a reference to it, so its reference count says."""

    def __init__(self, max_buffers: int = 8, max_bytes: int = 512 << 20,
                 min_bytes: int = 64 << 10) -> None:
        # below min_bytes malloc serves from its heap (no page faults): pooling would only
        # fill the pool's slots with requests' empty bodies
        self.max_buffers, self.max_bytes, self.min_bytes = max_buffers, max_bytes, min_bytes
        self._bufs: list[np.ndarray] = []
        self._lock = threading.Lock()

    def take(self, nbytes: int, align: int = 64) -> np.ndarray:
        want = nbytes + align
        if nbytes < self.min_bytes:
            return self._aligned(np.empty(want, dtype=np.uint8), nbytes, align)
        with self._lock:
            for i in range(len(self._bufs)):
                # 2 = the list's reference + getrefcount's argument: no view of it is alive
                if want <= self._bufs[i].nbytes <= 2 * want and sys.getrefcount(self._bufs[i]) <= 2:
                    return self._aligned(self._bufs[i], nbytes, align)
            raw = np.empty(want, dtype=np.uint8)  # not bytearray: that zero-fills first
            if len(self._bufs) < self.max_buffers and sum(b.nbytes for b in self._bufs) + want <= self.max_bytes:
                self._bufs.append(raw)
            return self._aligned(raw, nbytes, align)

    def discard(self, buf: np.ndarray) -> None:
        """Never hand out ``buf``'s memory again: a receive into it may still be in flight (an
        aborted UCX request), and it must not land in a body that someone else reads."""
        base = buf
        while isinstance(base, np.ndarray) and base.base is not None:
            base = base.base
        with self._lock:
            self._bufs = [b for b in self._bufs if b is not base]

    @staticmethod
    def _aligned(raw: np.ndarray, nbytes: int, align: int) -> np.ndarray:
        off = (-raw.ctypes.data) % align
        return raw[off:off + nbytes]


POOL = BodyPool()


def new_body(body_len: int, verify: bool) -> np.ndarray:
    """A pooled receive buffer, marked as verified when the channel verifies what lands in it."""
    body = POOL.take(body_len)
    return body.view(VerifiedBody) if verify else body


def blocks_of(header: dict, body, verifier: BodyVerifier | None) -> tuple[list, int]:
    """The body's blocks as views (None where the sender had none); a block that failed as a
    plain unmarked copy (decoding it fails); and how many failed."""
    blocks = split_body(header, body)
    if verifier is None:
        return blocks, 0
    bad = verifier.finish()
    if not verifier.done:  # cannot happen with a well-formed header: be safe anyway
        raise ProtocolError("message body ended in the middle of a block")
    for i in bad:
        blocks[i] = bytes(blocks[i])
    if bad:
        log.warning("discarded %d corrupt block(s) of a message", len(bad))
    return blocks, len(bad)


def answer(header: dict, blocks: list, source, sink, verify: bool) -> list[memoryview] | None:
    """A server's reply to one request, on every channel: ``get`` -> the source's blocks, ``put``
    -> the verified blocks into the sink, ``bye`` -> None (the client is leaving)."""
    op, keys = header["op"], header["keys"]
    if op == "get" and source is not None:
        return pack_message("blocks", keys, list(source(keys)))
    if op == "put" and sink is not None:
        # failed blocks come as unmarked copies (see blocks_of): not for the sink
        sink([(k, b) for k, b in zip(keys, blocks)
              if b is not None and (not verify or channel_verified(b))])
        return pack_message("ok")
    if op == "bye":
        return None
    return pack_message("error", error=f"unsupported op {op!r}")
