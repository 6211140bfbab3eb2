"""TCP channel: an asyncio server that serves (and accepts) many blocks per message.

Framing is transport/message.py: a fixed prefix with lengths, a msgpack header, then the raw
blocks. Both sides move bytes with socket ``sendmsg``/``recv_into`` on memoryviews (``loop.sock_*``
in asyncio), not StreamReader: StreamReader copies every byte twice through its internal buffer,
which halves throughput on large blocks. A message is sent as one gather list (prefix+header,
then the blocks' own buffers, never joined) and received into one buffer per message; the
blocks handed out are memoryview slices of it.

Receivers verify every block while it arrives (transport/verify.py: header checks and the
payload's xxh64, chunk by chunk on bytes still in the CPU cache), and mark the buffers they hand
out as verified (``channel_verified``), so that the TieredStore does not hash them again. A
block that fails is counted (``corrupt``) and handed out as a plain copy of its bytes, unmarked:
whoever decodes it sees the failure and counts it where it always has (the TieredStore's peer
stats), and it is never used. The server drops failed blocks of a push (the sink never sees
them). ``verify=False`` turns verification off (for benchmarks). A connection that drops mid-message raises ``ChannelClosed``; a partially received
message is never handed to anyone.

Requests: {"op": "get", keys} -> {"op": "blocks", keys, sizes} + blocks;
          {"op": "put", keys, sizes} + blocks -> {"op": "ok"}.
"""
from __future__ import annotations

import asyncio
import logging
import select
import socket
import threading
from typing import Callable, Sequence

from transport.errors import ChannelClosed, ChannelError, ChannelTimeout
from transport.message import (DEFAULT_MAX_BODY_BYTES, PREFIX, blocks_for, check_reply, get_request, pack_message,
                               parse_header, parse_prefix, put_request)
from transport.receive import answer, blocks_of, new_body
from transport.verify import BodyVerifier

log = logging.getLogger(__name__)

Source = Callable[[list[str]], Sequence[object | None]]
Sink = Callable[[list[tuple[str, memoryview]]], None]
SOCK_BUF = 4 << 20  # large kernel buffers: fewer wakeups per MiB
RECV_CHUNK = 1 << 20  # bytes per recv_into: the verifier hashes each chunk while it is in cache
_IOV_MAX = 512  # buffers per sendmsg call (Linux allows 1024)


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        sock.setsockopt(socket.SOL_SOCKET, opt, SOCK_BUF)


# -- asyncio side -----------------------------------------------------------------------------
def _advance(parts: list[memoryview], sent: int) -> list[memoryview]:
    """Drop ``sent`` bytes from the front of a gather list."""
    i = 0
    while i < len(parts) and sent >= parts[i].nbytes:
        sent -= parts[i].nbytes
        i += 1
    parts = parts[i:]
    if sent:
        parts[0] = parts[0][sent:]
    return parts


def _gather(parts: Sequence[object]) -> list[memoryview]:
    views = [memoryview(p).cast("B") for p in parts]
    return [v for v in views if v.nbytes]


def _timeout_ctx(timeout: float | None):
    # asyncio.timeout (3.11+) does not wrap the body in a new task as wait_for does
    return asyncio.timeout(timeout) if hasattr(asyncio, "timeout") else None


async def _with_timeout(coro, timeout: float | None):
    ctx = _timeout_ctx(timeout)
    if ctx is None:
        return await asyncio.wait_for(coro, timeout)
    async with ctx:
        return await coro


async def _arecv_into(loop, sock, mv: memoryview, feed=None) -> None:
    got = 0
    while got < mv.nbytes:
        n = await loop.sock_recv_into(sock, mv[got:got + RECV_CHUNK])
        if n == 0:
            raise ChannelClosed(f"connection closed after {got} of {mv.nbytes} B")
        got += n
        if feed is not None:
            feed(got)


async def arecv_message(loop, sock, max_body_bytes: int, first_byte_timeout: float | None,
                        timeout: float | None, verify: bool = True
                        ) -> tuple[dict, list[memoryview | None], int] | None:
    """One message as (header, blocks, number of blocks that failed verification), or None on a
    clean close between messages."""
    prefix = bytearray(PREFIX.size)
    mv = memoryview(prefix)
    n = await _with_timeout(loop.sock_recv_into(sock, mv), first_byte_timeout)
    if n == 0:
        return None

    async def rest() -> tuple[dict, list, int]:
        await _arecv_into(loop, sock, mv[n:])
        hlen, hhash, body_len = parse_prefix(prefix, max_body_bytes)
        raw = bytearray(hlen)
        await _arecv_into(loop, sock, memoryview(raw))
        header = parse_header(raw, hhash, body_len)
        body = new_body(body_len, verify)
        verifier = BodyVerifier(body, header["sizes"]) if verify else None
        await _arecv_into(loop, sock, memoryview(body),
                          None if verifier is None else verifier.feed)
        return (header, *blocks_of(header, body, verifier))

    try:
        return await _with_timeout(rest(), timeout)
    except asyncio.TimeoutError:
        raise ChannelTimeout("peer stalled in the middle of a message") from None


async def _writable(loop, sock) -> None:
    fut = loop.create_future()
    fd = sock.fileno()
    loop.add_writer(fd, lambda: fut.done() or fut.set_result(None))
    try:
        await fut
    finally:
        loop.remove_writer(fd)


async def asend_message(loop, sock, parts: Sequence[object]) -> None:
    """Send a gather list with sendmsg (no joining, few syscalls), waiting while the socket is full."""
    parts = _gather(parts)
    while parts:
        try:
            sent = sock.sendmsg(parts[:_IOV_MAX])
        except (BlockingIOError, InterruptedError):
            sent = 0
        parts = _advance(parts, sent)
        if parts:
            await _writable(loop, sock)


class TCPServer:
    """Serve blocks from ``source`` (keys -> encoded buffers) and hand pushed ones to ``sink``."""

    def __init__(self, source: Source | None = None, sink: Sink | None = None,
                 host: str = "127.0.0.1", port: int = 0, timeout_s: float = 30.0,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, verify: bool = True) -> None:
        self.source, self.sink = source, sink
        self.verify = verify  # pushed blocks: the sink gets only verified ones
        self.corrupt = 0
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
                msg = await arecv_message(loop, conn, self.max_body_bytes, None, self.timeout_s,
                                          verify=self.verify)
                if msg is None:
                    return
                self.corrupt += msg[2]
                # The source may encode GPU blocks, so it runs off the event loop; the same
                # thread sends the reply, so the client gets its first byte without waiting
                # for the event loop to be woken up in between.
                await loop.run_in_executor(None, self._reply, conn, msg[0], msg[1])
        except (ChannelError, OSError, asyncio.TimeoutError) as e:
            log.debug("tcp connection dropped: %s", e)
        finally:
            conn.close()

    def _handle(self, header: dict, blocks: list) -> list[memoryview]:
        # TCP clients just close the connection; a "bye" gets an error reply like any unknown op
        return answer(header, blocks, self.source, self.sink, self.verify) \
            or pack_message("error", error="unsupported op 'bye'")

    def _reply(self, conn: socket.socket, header: dict, blocks: list) -> None:
        """In an executor thread: answer one request on ``conn`` (non-blocking; the event loop
        does not touch it until this returns)."""
        _send_nonblocking(conn, self._handle(header, blocks), self.timeout_s)

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


class AsyncTCPClient:
    """asyncio client: ``await fetch(keys)`` -> encoded blocks (None where the peer has none)."""

    def __init__(self, host: str, port: int, timeout_s: float = 10.0,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, verify: bool = True) -> None:
        self.addr = (host, port)
        self.timeout_s = timeout_s
        self.max_body_bytes = max_body_bytes
        self.verify = verify
        self.corrupt = 0  # blocks that failed verification (handed out as None)
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
                await _with_timeout(asend_message(loop, sock, parts), self.timeout_s)
                msg = await arecv_message(loop, sock, self.max_body_bytes, self.timeout_s,
                                          self.timeout_s, verify=self.verify)
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
            check_reply(msg[0], want)
            self.corrupt += msg[2]
            return msg[0], msg[1]

    async def fetch(self, keys: Sequence[str]) -> list[memoryview | None]:
        return blocks_for(keys, *await self._request(get_request(keys), "blocks"))

    async def push(self, items: Sequence[tuple[str, object]]) -> None:
        await self._request(put_request(items), "ok")

    async def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


# -- blocking side --------------------------------------------------------------------------------
def _recv_into(sock: socket.socket, mv: memoryview, feed=None) -> None:
    got = 0
    while got < mv.nbytes:
        n = sock.recv_into(mv[got:got + RECV_CHUNK])
        if n == 0:
            raise ChannelClosed(f"connection closed after {got} of {mv.nbytes} B")
        got += n
        if feed is not None:
            feed(got)


def _send_nonblocking(sock: socket.socket, parts: Sequence[object], timeout: float | None) -> None:
    """sendmsg a gather list on a non-blocking socket from a plain thread, polling while it is
    full; ChannelTimeout when no byte could be sent for ``timeout`` seconds."""
    parts = _gather(parts)
    poller = None
    while parts:
        try:
            sent = sock.sendmsg(parts[:_IOV_MAX])
        except (BlockingIOError, InterruptedError):
            sent = 0
        parts = _advance(parts, sent)
        if parts:
            if poller is None:
                poller = select.poll()
                poller.register(sock, select.POLLOUT)
            if not poller.poll(None if timeout is None else int(timeout * 1000)):
                raise ChannelTimeout("peer stopped reading the reply")


def _sendmsg_all(sock: socket.socket, parts: Sequence[object]) -> None:
    parts = _gather(parts)
    while parts:
        parts = _advance(parts, sock.sendmsg(parts[:_IOV_MAX]))


class TCPClient:
    """Blocking client for synchronous callers (the engine); usable directly as a TieredStore peer.

    One connection, reopened after any error; thread-safe (one request at a time).
    """

    def __init__(self, host: str, port: int, timeout_s: float = 10.0,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, verify: bool = True) -> None:
        self.addr = (host, port)
        self.timeout_s = timeout_s
        self.max_body_bytes = max_body_bytes
        self.verify = verify
        self.corrupt = 0  # blocks that failed verification (handed out as None)
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
        body = new_body(body_len, self.verify)
        verifier = BodyVerifier(body, header["sizes"]) if self.verify else None
        _recv_into(sock, memoryview(body), None if verifier is None else verifier.feed)
        blocks, bad = blocks_of(header, body, verifier)
        self.corrupt += bad
        return header, blocks

    def _request(self, parts: Sequence[memoryview], want: str) -> tuple[dict, list]:
        with self._lock:
            try:
                sock = self._conn()
                _sendmsg_all(sock, parts)
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
            check_reply(header, want)
            return header, blocks

    def fetch(self, keys: Sequence[str]) -> list[memoryview | None]:
        return blocks_for(keys, *self._request(get_request(keys), "blocks"))

    __call__ = fetch

    def push(self, items: Sequence[tuple[str, object]]) -> None:
        self._request(put_request(items), "ok")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
