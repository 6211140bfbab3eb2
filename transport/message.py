"""A message of many encoded blocks, shared by the TCP, UCX and Ray channels.

    prefix  24 B   magic b"KVMS" | u32 header length | u64 xxh64(header) | u64 body length
    header  msgpack {"op": str, "keys": [str], "sizes": [int, -1 = no such block], ...}
    body    the blocks, back to back (each block is self-checking, see block.py)

The header has its own checksum so that a corrupted key list can never pin a valid block to the
wrong key. Limits on header and body size stop a bad peer from making us allocate without bound.
"""
from __future__ import annotations

import struct
from typing import Sequence

import msgpack
import xxhash

from transport.errors import ProtocolError

MAGIC = b"KVMS"
PREFIX = struct.Struct("<4sIQQ")
MAX_HEADER_BYTES = 16 << 20
DEFAULT_MAX_BODY_BYTES = 4 << 30


def pack_message(op: str, keys: Sequence[str] = (), bufs: Sequence[object | None] | None = None,
                 **extra) -> list[memoryview]:
    """[prefix+header, block, block, ...]: block buffers are referenced, not copied.

    ``bufs=None`` sends the keys alone (a request)."""
    bufs = [None] * len(keys) if bufs is None else bufs
    views = [None if b is None else memoryview(b).cast("B") for b in bufs]
    if len(views) != len(keys):
        raise ValueError(f"{len(keys)} keys for {len(views)} buffers")
    sizes = [-1 if v is None else v.nbytes for v in views]
    header = msgpack.packb({"op": op, "keys": list(keys), "sizes": sizes, **extra})
    body_len = sum(s for s in sizes if s > 0)
    prefix = PREFIX.pack(MAGIC, len(header), xxhash.xxh64_intdigest(header), body_len)
    return [memoryview(prefix + header)] + [v for v in views if v is not None and v.nbytes]


def get_request(keys: Sequence[str]) -> list[memoryview]:
    return pack_message("get", list(keys))


def put_request(items: Sequence[tuple[str, object]]) -> list[memoryview]:
    return pack_message("put", [k for k, _ in items], [b for _, b in items])


def check_reply(header: dict, want: str) -> None:
    """A reply of another op (an "error" names its cause) is a protocol error."""
    if header["op"] != want:
        raise ProtocolError(f"peer answered {header['op']!r}: {header.get('error', '')}")


def blocks_for(keys: Sequence[str], header: dict, blocks: list) -> list:
    """A "get" reply's blocks, once the peer is seen to answer for exactly the keys asked."""
    if header["keys"] != list(keys):
        raise ProtocolError("peer answered for other keys")
    return blocks


def parse_prefix(raw, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> tuple[int, int, int]:
    magic, hlen, hhash, body_len = PREFIX.unpack(bytes(raw))
    if magic != MAGIC:
        raise ProtocolError("bad message magic")
    if hlen > MAX_HEADER_BYTES:
        raise ProtocolError(f"message header of {hlen} B is over the limit")
    if body_len > max_body_bytes:
        raise ProtocolError(f"message body of {body_len} B is over the limit of {max_body_bytes} B")
    return hlen, hhash, body_len


def parse_header(raw, hhash: int, body_len: int) -> dict:
    if xxhash.xxh64_intdigest(raw) != hhash:
        raise ProtocolError("message header checksum mismatch")
    try:
        h = msgpack.unpackb(raw, raw=False)
    except Exception as e:
        raise ProtocolError(f"message header is not msgpack: {type(e).__name__}") from None
    keys, sizes = (h.get("keys"), h.get("sizes")) if isinstance(h, dict) else (None, None)
    if (not isinstance(h.get("op") if isinstance(h, dict) else None, str)
            or not isinstance(keys, list) or not isinstance(sizes, list)
            or len(keys) != len(sizes) or not all(isinstance(k, str) for k in keys)
            or not all(type(s) is int and s >= -1 for s in sizes)
            or sum(s for s in sizes if s > 0) != body_len):
        raise ProtocolError("malformed message header")
    return h


def split_body(header: dict, body) -> list[memoryview | None]:
    """Views of each block in the body (None for the keys the sender did not have)."""
    mv = memoryview(body).cast("B") if body is not None else memoryview(b"")
    out: list[memoryview | None] = []
    off = 0
    for s in header["sizes"]:
        if s < 0:
            out.append(None)
        else:
            out.append(mv[off:off + s])
            off += s
    return out
