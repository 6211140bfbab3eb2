"""Blocks through Ray's object store, as numpy uint8 arrays.

Never put torch tensors in the object store: the same bytes as a torch tensor were measured 5-10x
slower than as numpy (Ray's numpy path is zero-copy on read; torch goes through its own
serialiser). A message is a list of uint8 arrays: [prefix+header, block, block, ...] in the
message format of transport/message.py, so the receiver validates it exactly like a TCP message.
``ray`` is imported lazily: nothing else in transport needs it.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from transport.errors import ChannelTimeout, ProtocolError
from transport.message import PREFIX, pack_message, parse_header, parse_prefix


def pack(items: Sequence[tuple[str, object | None]]) -> list[np.ndarray]:
    """Items -> arrays for ray.put / an actor's return value (views of the buffers, no copy)."""
    parts = pack_message("blocks", [k for k, _ in items], [b for _, b in items])
    return [np.frombuffer(p, dtype=np.uint8) for p in parts]


def unpack(arrays: Sequence[np.ndarray]) -> list[tuple[str, memoryview | None]]:
    """Arrays from ray.get -> [(key, encoded block or None)]; blocks are views of the arrays."""
    if not isinstance(arrays, (list, tuple)) or not arrays:
        raise ProtocolError("not a block message")
    head = memoryview(np.ascontiguousarray(arrays[0], dtype=np.uint8)).cast("B")
    if head.nbytes < PREFIX.size:
        raise ProtocolError("truncated message header")
    hlen, hhash, body_len = parse_prefix(head[:PREFIX.size])
    if head.nbytes != PREFIX.size + hlen:
        raise ProtocolError("message header length disagrees")
    header = parse_header(head[PREFIX.size:], hhash, body_len)
    blocks = iter(arrays[1:])
    out: list[tuple[str, memoryview | None]] = []
    for key, size in zip(header["keys"], header["sizes"]):
        if size <= 0:
            out.append((key, None if size < 0 else memoryview(b"")))
            continue
        arr = next(blocks, None)
        if arr is None or arr.dtype != np.uint8 or arr.nbytes != size:
            raise ProtocolError("message blocks disagree with the header")
        out.append((key, memoryview(arr).cast("B")))
    if next(blocks, None) is not None:
        raise ProtocolError("extra blocks in message")
    return out


class RayChannel:
    """Send blocks to other Ray workers by object ref.

    Producer: ``ref = ch.put(items)`` (or return ``pack(items)`` from an actor method).
    Consumer: ``ch.get(ref)`` -> [(key, encoded block or None)]; decode with ``decode_block``.
    """

    def __init__(self) -> None:
        import ray  # lazily: transport works without Ray
        self._ray = ray

    def put(self, items: Sequence[tuple[str, object | None]]):
        return self._ray.put(pack(items))

    def get(self, ref, timeout_s: float | None = 30.0) -> list[tuple[str, memoryview | None]]:
        try:
            arrays = self._ray.get(ref, timeout=timeout_s)
        except self._ray.exceptions.GetTimeoutError:
            raise ChannelTimeout("object not ready in time") from None
        return unpack(arrays)

    def fetcher(self, remote_fetch: Callable[[list[str]], object],
                timeout_s: float | None = 30.0) -> Callable[[list[str]], list]:
        """A TieredStore peer from an actor method that returns ``pack(source(keys))``,
        e.g. ``ch.fetcher(peer_actor.fetch_blocks.remote)``."""
        def fetch(keys: list[str]) -> list:
            return [b for _, b in self.get(remote_fetch(keys), timeout_s)]
        return fetch
