"""Pipelined GETs read off the socket straight into one buffer per value, verified as they arrive.

redis-py with hiredis copies a large value three times on its way in (socket -> its 64 KiB read
buffer -> hiredis's own buffer -> a new bytes object), and the tier then hashes it once more: a
multi-MiB KV block costs more in copies than in transfer. Here a GET pipeline is sent on a
connection of redis-py's pool (AUTH, SELECT and health checks stay redis-py's), and the RESP2
replies are parsed by hand: each bulk string lands by ``recv_into`` in an aligned buffer (one
copy), and a ``BodyVerifier`` checks the block (header, payload xxh64) grain by grain while those
bytes are still in the CPU cache. Verified values come back as ``VerifiedBody`` views, so that
decoding them needs no second hash. Values that are not blocks (segment manifests) pass through
unverified, as on the TCP channel; any decode of them as a block fails on the magic.

Only GET's replies are expected: bulk strings, nil and errors. Anything else, a value over the
size limit (its bytes are read and dropped, the connection stays usable), a closed socket or a
timeout ends the call with a typed error; the caller drops the connection.
"""
from __future__ import annotations

import socket
from typing import Sequence

import numpy as np

from transport.errors import ProtocolError
from transport.receive import POOL, BodyPool
from transport.verify import BodyVerifier, VerifiedBody

SCRATCH = 64 << 10  # reply lines and small values are read through this buffer
MAX_LINE = 4096
VERIFY_FROM = 256 << 10  # smaller values are verified when decoded: a verifier costs ~20 us
TOO_LARGE = object()  # a value over the size limit: read, dropped, reported as this marker


class ReplyError:
    """An error reply (``-ERR ...``) to one GET; the server is up, this key failed."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


class Arena:
    """Values of one pipeline carved back to back (64-aligned) out of one pooled receive buffer:
    fresh multi-MiB allocations per call would page-fault on every 4 KiB as they are written.
    The buffer goes back to the pool once the caller drops the last value; a value that does
    not fit gets a buffer of its own."""

    def __init__(self, nbytes: int) -> None:
        self.buf = POOL.take(nbytes) if nbytes else None
        self.off = 0

    def take(self, n: int) -> np.ndarray:
        if self.buf is not None and self.off + n <= self.buf.nbytes:
            out = self.buf[self.off:self.off + n]
            self.off += -(-n // 64) * 64
            return out
        return BodyPool._aligned(np.empty(n + 64, dtype=np.uint8), n, 64)


class RespReader:
    """RESP2 replies from a blocking socket; bulk strings go straight into their own buffers."""

    def __init__(self, sock: socket.socket, arena: Arena | None = None) -> None:
        self.sock = sock
        self.arena = arena or Arena(0)
        self.buf = bytearray(SCRATCH)
        self.mv = memoryview(self.buf)
        self.lo = self.hi = 0  # unread bytes: buf[lo:hi]

    def _fill(self) -> None:
        if self.lo == self.hi:
            self.lo = self.hi = 0
        elif self.hi == len(self.buf):
            n = self.hi - self.lo
            self.mv[:n] = self.mv[self.lo:self.hi]
            self.lo, self.hi = 0, n
        got = self.sock.recv_into(self.mv[self.hi:])
        if got == 0:
            raise ConnectionError("redis closed the connection in the middle of a reply")
        self.hi += got

    def line(self) -> bytes:
        while True:
            i = self.buf.find(b"\r\n", self.lo, self.hi)
            if i >= 0:
                out = bytes(self.mv[self.lo:i])
                self.lo = i + 2
                return out
            if self.hi - self.lo > MAX_LINE:
                raise ProtocolError("redis reply line over 4 KiB")
            self._fill()

    def read_into(self, dst: memoryview, feed=None) -> None:
        """Exactly dst.nbytes bytes: what is buffered first, then straight from the socket."""
        have = min(self.hi - self.lo, dst.nbytes)
        dst[:have] = self.mv[self.lo:self.lo + have]
        self.lo += have
        got = have
        if feed is not None and got:
            feed(got)
        while got < dst.nbytes:
            n = self.sock.recv_into(dst[got:got + (1 << 20)])
            if n == 0:
                raise ConnectionError("redis closed the connection in the middle of a value")
            got += n
            if feed is not None:
                feed(got)

    def crlf(self) -> None:
        while self.hi - self.lo < 2:
            self._fill()
        if self.mv[self.lo:self.lo + 2] != b"\r\n":
            raise ProtocolError("redis bulk string not followed by CRLF")
        self.lo += 2

    def skip(self, n: int) -> None:
        junk = memoryview(bytearray(min(n, 1 << 20)))
        while n > 0:
            k = min(n, junk.nbytes)
            self.read_into(junk[:k])
            n -= k

    def get_reply(self, max_bytes: int, verify: bool):
        """One GET reply: a memoryview of the (verified) value, None (nil), ReplyError or
        TOO_LARGE."""
        line = self.line()
        kind = line[:1]
        if kind == b"$":
            try:
                n = int(line[1:])
            except ValueError:
                raise ProtocolError(f"bad bulk length {line[:32]!r}") from None
            if n < 0:
                return None
            if n > max_bytes:
                self.skip(n + 2)
                return TOO_LARGE
            value = self.arena.take(n)
            verifier = None
            if verify and n >= VERIFY_FROM:
                value = value.view(VerifiedBody)
                verifier = BodyVerifier(value, [n], threads=None)  # inline: bytes still in cache
            self.read_into(memoryview(value), None if verifier is None else verifier.feed)
            self.crlf()
            if verifier is not None and verifier.finish():
                return bytes(value)  # failed: an unmarked copy, whose decode fails and is counted
            return memoryview(value)
        if kind == b"-":
            return ReplyError(line[1:].decode("utf-8", "replace"))
        raise ProtocolError(f"unexpected redis reply type {kind!r} to GET")


def pipelined_get(conn, keys: Sequence[str], max_bytes: int, verify: bool = True,
                  expect_bytes: int = 0) -> list:
    """GET every key in one pipeline on a redis-py connection (RESP2), replies read by hand;
    ``expect_bytes``: the values' likely total, for one pooled buffer to hold them all."""
    conn.send_packed_command(conn.pack_commands([("GET", k) for k in keys]))
    reader = RespReader(conn._sock, Arena(expect_bytes))
    out = [reader.get_reply(max_bytes, verify) for _ in keys]
    if reader.hi != reader.lo:
        raise ProtocolError("redis sent more than the GET replies")
    return out
