"""UCX channel through ``ucxx`` (optional extra ``kvcluster[ucx]``): same messages as TCP.

UCX picks the best transport it finds (shared memory, TCP, InfiniBand/RoCE, CUDA IPC); on a
CPU-only machine it runs over TCP and shared memory. Tag messages must be received into buffers
of known size, so a message goes as: prefix (24 B), header, then one UCX send per block; the
receiver allocates the body once and receives each block straight into its slice of it.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable, Sequence

import numpy as np

from transport.errors import ChannelClosed, ChannelError, ChannelTimeout, ProtocolError
from transport.message import (DEFAULT_MAX_BODY_BYTES, PREFIX, pack_message, parse_header,
                               parse_prefix, split_body)

log = logging.getLogger(__name__)


def _ucxx():
    try:
        import ucxx
    except Exception as e:  # ImportError, or a broken native library
        raise ChannelError("the UCX channel needs the optional package ucxx "
                           f"(pip install 'kvcluster[ucx]', i.e. ucxx-cu12): {e}") from None
    return ucxx


def ucx_available() -> bool:
    try:
        _ucxx()
        return True
    except ChannelError:
        return False


def _as_array(b) -> np.ndarray:
    return np.frombuffer(memoryview(b).cast("B"), dtype=np.uint8)


async def _send(ep, parts: Sequence[memoryview]) -> None:
    # parts[0] is prefix+header: split so the receiver can post a fixed-size receive first
    head = parts[0]
    await ep.send(_as_array(head[:PREFIX.size]))
    await ep.send(_as_array(head[PREFIX.size:]))
    for p in parts[1:]:
        await ep.send(_as_array(p))


async def _recv(ep, max_body_bytes: int) -> tuple[dict, list[memoryview | None]]:
    prefix = np.empty(PREFIX.size, dtype=np.uint8)
    await ep.recv(prefix)
    hlen, hhash, body_len = parse_prefix(prefix, max_body_bytes)
    raw = np.empty(hlen, dtype=np.uint8)
    await ep.recv(raw)
    header = parse_header(memoryview(raw), hhash, body_len)
    body = np.empty(body_len, dtype=np.uint8)
    off = 0
    for s in header["sizes"]:
        if s > 0:
            await ep.recv(body[off:off + s])
            off += s
    return header, split_body(header, memoryview(body))


def _translate(e: BaseException) -> ChannelError:
    if isinstance(e, ChannelError):
        return e
    if isinstance(e, asyncio.TimeoutError):
        return ChannelTimeout("UCX peer did not answer in time")
    return ChannelClosed(f"UCX connection failed: {type(e).__name__}: {e}")


class UCXServer:
    """Serves blocks from ``source`` and accepts pushes into ``sink``; run inside an event loop."""

    def __init__(self, source: Callable[[list[str]], Sequence[object | None]] | None = None,
                 sink: Callable[[list[tuple[str, memoryview]]], None] | None = None,
                 port: int | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.source, self.sink = source, sink
        self.port = port
        self.max_body_bytes = max_body_bytes
        self._listener = None

    async def start(self) -> int:
        ucxx = _ucxx()
        self._listener = ucxx.create_listener(self._serve, port=self.port)
        self.port = self._listener.port
        return self.port

    async def _serve(self, ep) -> None:
        ucxx = _ucxx()
        try:
            while True:
                header, blocks = await _recv(ep, self.max_body_bytes)
                op, keys = header["op"], header["keys"]
                if op == "get" and self.source is not None:
                    reply = pack_message("blocks", keys, list(self.source(keys)))
                elif op == "put" and self.sink is not None:
                    self.sink([(k, b) for k, b in zip(keys, blocks) if b is not None])
                    reply = pack_message("ok")
                elif op == "bye":
                    return
                else:
                    reply = pack_message("error", error=f"unsupported op {op!r}")
                await _send(ep, reply)
        except (ucxx.exceptions.UCXError, ChannelError, asyncio.CancelledError) as e:
            # the client went away (a cancelled receive is how ucxx reports a closed endpoint)
            log.debug("ucx connection ended: %r", e)
        finally:
            if not ep.closed:
                await ep.close()

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None


class UCXClient:
    """asyncio client: ``c = await UCXClient.connect(host, port)``; ``await c.fetch(keys)``."""

    def __init__(self, ep, timeout_s: float, max_body_bytes: int) -> None:
        self._ep = ep
        self.timeout_s = timeout_s
        self.max_body_bytes = max_body_bytes
        self._lock = asyncio.Lock()

    @classmethod
    async def connect(cls, host: str, port: int, timeout_s: float = 10.0,
                      max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> "UCXClient":
        ucxx = _ucxx()
        try:
            ep = await asyncio.wait_for(ucxx.create_endpoint(host, port), timeout_s)
        except Exception as e:
            raise _translate(e) from None
        return cls(ep, timeout_s, max_body_bytes)

    async def _request(self, parts: Sequence[memoryview], want: str):
        async with self._lock:
            try:
                await asyncio.wait_for(_send(self._ep, parts), self.timeout_s)
                header, blocks = await asyncio.wait_for(_recv(self._ep, self.max_body_bytes),
                                                        self.timeout_s)
            except Exception as e:
                raise _translate(e) from None
        if header["op"] != want:
            raise ProtocolError(f"peer answered {header['op']!r}: {header.get('error', '')}")
        return header, blocks

    async def fetch(self, keys: Sequence[str]) -> list[memoryview | None]:
        header, blocks = await self._request(pack_message("get", list(keys)), "blocks")
        if header["keys"] != list(keys):
            raise ProtocolError("peer answered for other keys")
        return blocks

    async def push(self, items: Sequence[tuple[str, object]]) -> None:
        await self._request(pack_message("put", [k for k, _ in items], [b for _, b in items]), "ok")

    async def close(self) -> None:
        if not self._ep.closed:
            try:
                await _send(self._ep, pack_message("bye"))
            except Exception:
                pass
            await self._ep.close()
