"""TCP channel: an asyncio server that serves (and accepts) many blocks per message.

Framing is transport/message.py: a fixed prefix with lengths, a msgpack header, then the raw
blocks. Both sides move bytes with socket send/recv_into on memoryviews (``loop.sock_*`` in
asyncio), not StreamReader: StreamReader copies every byte twice through its internal buffer,
which halves throughput on large blocks. A connection that drops mid-message raises
``ChannelClosed``; a partially received message is never handed to anyone.

Requests: {"op": "get", keys} -> {"op": "blocks", keys, sizes} + blocks;
          {"op": "put", keys, sizes} + blocks -> {"op": "ok"}.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import threading
from typing import Callable, Sequence

import numpy as np

from transport.errors import ChannelClosed, ChannelError, ChannelTimeout, ProtocolError
from transport.message import (DEFAULT_MAX_BODY_BYTES, PREFIX, pack_message, parse_header,
                               parse_prefix, split_body)

log = logging.getLogger(__name__)

Source = Callable[[list[str]], Sequence[object | None]]
Sink = Callable[[list[tuple[str, memoryview]]], None]
SOCK_BUF = 4 << 20  # large kernel buffers: fewer wakeups per MiB


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        sock.setsockopt(socket.SOL_SOCKET, opt, SOCK_BUF)


# -- asyncio side -----------------------------------------------------------------------------
async def _arecv_into(loop, sock, mv: memoryview) -> None:
    got = 0
    while got < mv.nbytes:
        n = await loop.sock_recv_into(sock, mv[got:])
        if n == 0:
            raise ChannelClosed(f"connection closed after {got} of {mv.nbytes} B")
        got += n


async def arecv_message(loop, sock, max_body_bytes: int, first_byte_timeout: float | None,
                        timeout: float | None) -> tuple[dict, list[memoryview | None]] | None:
    """One message, or None on a clean close between messages."""
    prefix = bytearray(PREFIX.size)
    mv = memoryview(prefix)
    n = await asyncio.wait_for(loop.sock_recv_into(sock, mv), first_byte_timeout)
    if n == 0:
        return None

    async def rest() -> tuple[dict, list]:
        await _arecv_into(loop, sock, mv[n:])
        hlen, hhash, body_len = parse_prefix(prefix, max_body_bytes)
        raw = bytearray(hlen)
        await _arecv_into(loop, sock, memoryview(raw))
        header = parse_header(raw, hhash, body_len)
        body = np.empty(body_len, dtype=np.uint8)  # not bytearray: that zero-fills first
        await _arecv_into(loop, sock, memoryview(body))
        return header, split_body(header, body)

    try:
        return await asyncio.wait_for(rest(), timeout)
    except asyncio.TimeoutError:
        raise ChannelTimeout("peer stalled in the middle of a message") from None


async def asend_message(loop, sock, parts: Sequence[memoryview]) -> None:
    for p in parts:
        await loop.sock_sendall(sock, p)


class TCPServer:
    """Serve blocks from ``source`` (keys -> encoded buffers) and hand pushed ones to ``sink``."""

    def __init__(self, source: Source | None = None, sink: Sink | None = None,
                 host: str = "127.0.0.1", port: int = 0, timeout_s: float = 30.0,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.source, self.sink = source, sink
        self.host, self.port = host, port
        self.timeout_s = timeout_s
        self.max_body_bytes = max_body_bytes
        self._sock: socket.socket | None = None
        self._tasks: set[asyncio.Task] = set()
        self._accept: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    async def start(self) -> int:
        self._loop = asyncio.get_running_loop()
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.host, self.port))
        s.listen(128)
        s.setblocking(False)
        self._sock, self.port = s, s.getsockname()[1]
        self._accept = asyncio.create_task(self._accept_loop())
        return self.port

    async def _accept_loop(self) -> None:
        while True:
            conn, _ = await self._loop.sock_accept(self._sock)
            conn.setblocking(False)
            _tune(conn)
            task = asyncio.create_task(self._serve(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: socket.socket) -> None:
        loop = self._loop
        try:
            while True:
                msg = await arecv_message(loop, conn, self.max_body_bytes, None, self.timeout_s)
                if msg is None:
                    return
                reply = await self._handle(*msg)
                await asyncio.wait_for(asend_message(loop, conn, reply), self.timeout_s)
        except (ChannelError, OSError, asyncio.TimeoutError) as e:
            log.debug("tcp connection dropped: %s", e)
        finally:
            conn.close()

    async def _handle(self, header: dict, blocks: list) -> list[memoryview]:
        op, keys = header["op"], header["keys"]
        if op == "get" and self.source is not None:
            # the source may encode GPU blocks: keep the event loop free meanwhile
            bufs = await self._loop.run_in_executor(None, self.source, keys)
            return pack_message("blocks", keys, list(bufs))
        if op == "put" and self.sink is not None:
            items = [(k, b) for k, b in zip(keys, blocks) if b is not None]
            await self._loop.run_in_executor(None, self.sink, items)
            return pack_message("ok")
        return pack_message("error", error=f"unsupported op {op!r}")

    async def close(self) -> None:
        if self._accept is not None:
            self._accept.cancel()
        for t in list(self._tasks):
            t.cancel()
        if self._sock is not None:
            self._sock.close()

    # a server on its own event loop thread, for synchronous callers (tests, Ray actors)
    def start_background(self) -> int:
        started = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            loop.run_until_complete(self.start())
            started.set()
            loop.run_forever()
            loop.run_until_complete(self.close())
            loop.close()

        self._thread = threading.Thread(target=run, name="kv-tcp-server", daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise ChannelError("tcp server did not start")
        return self.port

    def stop(self) -> None:
        if self._thread is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._thread = None


def _check_reply(header: dict, want: str) -> None:
    if header["op"] != want:
        raise ProtocolError(f"peer answered {header['op']!r}: {header.get('error', '')}")


class AsyncTCPClient:
    """asyncio client: ``await fetch(keys)`` -> encoded blocks (None where the peer has none)."""

    def __init__(self, host: str, port: int, timeout_s: float = 10.0,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.addr = (host, port)
        self.timeout_s = timeout_s
        self.max_body_bytes = max_body_bytes
        self._sock: socket.socket | None = None
        self._lock = asyncio.Lock()

    async def _conn(self) -> socket.socket:
        if self._sock is None:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            _tune(s)
            try:
                await asyncio.wait_for(asyncio.get_running_loop().sock_connect(s, self.addr),
                                       self.timeout_s)
            except asyncio.TimeoutError:
                s.close()
                raise ChannelTimeout(f"connect to {self.addr} timed out") from None
            except OSError as e:
                s.close()
                raise ChannelClosed(f"connect to {self.addr} failed: {e}") from None
            self._sock = s
        return self._sock

    async def _request(self, parts: Sequence[memoryview], want: str):
        loop = asyncio.get_running_loop()
        async with self._lock:
            try:
                sock = await self._conn()
                await asyncio.wait_for(asend_message(loop, sock, parts), self.timeout_s)
                msg = await arecv_message(loop, sock, self.max_body_bytes, self.timeout_s,
                                          self.timeout_s)
            except asyncio.TimeoutError:
                await self.close()
                raise ChannelTimeout("peer did not answer in time") from None
            except OSError as e:
                await self.close()
                raise ChannelClosed(str(e)) from None
            except ChannelError:
                await self.close()  # the stream position is unknown now: start over
                raise
            if msg is None:
                await self.close()
                raise ChannelClosed("peer closed the connection")
            _check_reply(msg[0], want)
            return msg

    async def fetch(self, keys: Sequence[str]) -> list[memoryview | None]:
        header, blocks = await self._request(pack_message("get", list(keys)), "blocks")
        if header["keys"] != list(keys):
            raise ProtocolError("peer answered for other keys")
        return blocks

    async def push(self, items: Sequence[tuple[str, object]]) -> None:
        await self._request(pack_message("put", [k for k, _ in items], [b for _, b in items]), "ok")

    async def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


# -- blocking side --------------------------------------------------------------------------------
def _recv_into(sock: socket.socket, mv: memoryview) -> None:
    got = 0
    while got < mv.nbytes:
        n = sock.recv_into(mv[got:])
        if n == 0:
            raise ChannelClosed(f"connection closed after {got} of {mv.nbytes} B")
        got += n


class TCPClient:
    """Blocking client for synchronous callers (the engine); usable directly as a TieredStore peer.

    One connection, reopened after any error; thread-safe (one request at a time).
    """

    def __init__(self, host: str, port: int, timeout_s: float = 10.0,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.addr = (host, port)
        self.timeout_s = timeout_s
        self.max_body_bytes = max_body_bytes
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def _conn(self) -> socket.socket:
        if self._sock is None:
            s = socket.create_connection(self.addr, timeout=self.timeout_s)
            _tune(s)
            self._sock = s
        return self._sock

    def _recv_message(self, sock: socket.socket) -> tuple[dict, list]:
        prefix = bytearray(PREFIX.size)
        _recv_into(sock, memoryview(prefix))
        hlen, hhash, body_len = parse_prefix(prefix, self.max_body_bytes)
        raw = bytearray(hlen)
        _recv_into(sock, memoryview(raw))
        header = parse_header(raw, hhash, body_len)
        body = np.empty(body_len, dtype=np.uint8)  # not bytearray: that zero-fills first
        _recv_into(sock, memoryview(body))
        return header, split_body(header, body)

    def _request(self, parts: Sequence[memoryview], want: str) -> tuple[dict, list]:
        with self._lock:
            try:
                sock = self._conn()
                for p in parts:
                    sock.sendall(p)
                header, blocks = self._recv_message(sock)
            except socket.timeout:
                self.close()
                raise ChannelTimeout("peer did not answer in time") from None
            except OSError as e:
                self.close()
                raise ChannelClosed(str(e)) from None
            except ChannelError:
                self.close()
                raise
            _check_reply(header, want)
            return header, blocks

    def fetch(self, keys: Sequence[str]) -> list[memoryview | None]:
        header, blocks = self._request(pack_message("get", list(keys)), "blocks")
        if header["keys"] != list(keys):
            raise ProtocolError("peer answered for other keys")
        return blocks

    __call__ = fetch

    def push(self, items: Sequence[tuple[str, object]]) -> None:
        self._request(pack_message("put", [k for k, _ in items], [b for _, b in items]), "ok")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
