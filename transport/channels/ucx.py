"""UCX channel through ``ucxx`` (optional extra ``kvcluster[ucx]``): same messages as TCP.

UCX picks the best transport it finds (shared memory, TCP, InfiniBand/RoCE, CUDA IPC); on a
CPU-only machine it runs over TCP and shared memory. Tag messages must be received into buffers
of known size, so a message goes as: prefix (24 B), header, then one UCX message per block. The
sender posts all of a message's sends at once; the receiver, once it has the header, posts one
receive per block straight into its slice of a pooled body buffer (transport/receive.py, shared
with TCP) and verifies each block as it lands (transport/verify.py: header checks and payload
xxh64). UCX matches the tag messages of one endpoint in the order they were posted, so posting
them all at once is safe, and the blocks then stream back to back: one send and one receive
awaited after the other cost a round trip per block (0.45-0.5 of a raw ucxx transfer at 1 MiB
blocks), and a fresh body per message a page fault per 4 KiB.

ucxx (by default) waits for a request by polling it on every turn of the event loop: a server
with a client connected sits on the receive of the next request and keeps a core busy even when
idle (measured: ~100% of a core per idle connection). ucxx's python-future mode
(``UCXPY_ENABLE_PYTHON_FUTURE=1``) waits without polling; it was not measured here.

Verification works as on TCP: a block that fails is counted (``corrupt``) and handed out as an
unmarked copy of its bytes (whose decode fails); the server drops failed blocks of a push.
``verify=False`` turns it off (for benchmarks).
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import logging
from typing import Callable, Sequence

import numpy as np

from transport.errors import ChannelClosed, ChannelError, ChannelTimeout
from transport.message import (DEFAULT_MAX_BODY_BYTES, PREFIX, blocks_for, check_reply, get_request, pack_message,
                               parse_header, parse_prefix, put_request)
from transport.receive import POOL, answer, blocks_of, new_body
from transport.verify import BodyVerifier

log = logging.getLogger(__name__)
HEAD_BYTES = 64 << 10  # first message of each message: the prefix and (most) headers
WINDOW = 128  # UCX sends/receives of one message in flight at once (see _in_window)


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


def _quiet(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: no "exception was never retrieved" at exit


async def _in_window(op: Callable, bufs: Sequence, done: Callable[[int], None] | None = None,
                     window: int = WINDOW) -> None:
    """``op(buf)`` (an endpoint's send or recv) for every buffer, in order, up to ``window`` of
    them in flight. Posting the next one only when the previous completes leaves the link idle
    until the event loop notices (ucxx polls each request once per turn of the loop, which is
    slow when the CPU is busy): measured at 1 MiB blocks, 2 in flight ran at 0.7 of a raw
    transfer, 4 at 0.8, all of them at 0.95. The window only bounds the number of tasks.
    ``done(i)`` runs as the i-th completes. On a failure or a cancellation the ones in flight
    are cancelled."""
    flight: collections.deque = collections.deque()
    nxt = 0
    try:
        for i in range(len(bufs)):
            while nxt < len(bufs) and len(flight) < window:
                flight.append(asyncio.ensure_future(op(_as_array(bufs[nxt]))))
                nxt += 1
            await flight.popleft()
            if done is not None:
                done(i)
    except BaseException:
        for t in flight:
            t.cancel()
            t.add_done_callback(_quiet)
        raise


async def _send(ep, parts: Sequence[memoryview]) -> None:
    # parts[0] is prefix+header: its first HEAD_BYTES go as one message (see _recv_head)
    head = parts[0]
    msgs = [head[:HEAD_BYTES], *([head[HEAD_BYTES:]] if head.nbytes > HEAD_BYTES else []),
            *parts[1:]]
    await _in_window(ep.send, msgs)


async def _recv_head(ep, max_body_bytes: int) -> tuple[dict, int]:
    """The message's header and body length. Prefix and header come as one message received into
    HEAD_BYTES (a shorter message fits a larger receive), the rest of a longer header as a
    second one: a round trip of two small messages took 0.1-3 ms here (p10-p50), so each
    message waited for in turn counts."""
    first = np.empty(HEAD_BYTES, dtype=np.uint8)
    await ep.recv(first)
    hlen, hhash, body_len = parse_prefix(first[:PREFIX.size], max_body_bytes)
    end = PREFIX.size + hlen
    if end <= HEAD_BYTES:
        raw = first[PREFIX.size:end]
    else:
        raw = np.empty(hlen, dtype=np.uint8)
        raw[:HEAD_BYTES - PREFIX.size] = first[PREFIX.size:]
        await ep.recv(raw[HEAD_BYTES - PREFIX.size:])
    return parse_header(memoryview(raw), hhash, body_len), body_len


async def _recv_body(ep, header: dict, body_len: int, verify: bool) -> tuple[list, int]:
    """The blocks (views of a pooled body) and how many failed verification."""
    body = new_body(body_len, verify)
    verifier = BodyVerifier(body, header["sizes"]) if verify else None
    sizes = [s for s in header["sizes"] if s > 0]  # the sender sends no empty message
    ends = list(itertools.accumulate(sizes))
    feed = None if verifier is None else (lambda i: verifier.feed(ends[i]))
    try:
        await _in_window(ep.recv, [body[e - s:e] for s, e in zip(sizes, ends)], feed)
    except BaseException:
        POOL.discard(body)  # a cancelled receive may still write into it
        raise
    return blocks_of(header, body, verifier)


async def _exchange(ep, parts: Sequence[memoryview], max_body_bytes: int, verify: bool
                    ) -> tuple[dict, list, int]:
    """Send a request and receive the reply: (header, blocks, number that failed). The reply's
    first receive is posted before the request goes out, so that no wakeup sits between them."""
    head = asyncio.ensure_future(_recv_head(ep, max_body_bytes))
    try:
        await _send(ep, parts)
        header, body_len = await head
    except BaseException:
        head.cancel()
        head.add_done_callback(_quiet)
        raise
    return (header, *await _recv_body(ep, header, body_len, verify))


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
                 port: int | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 verify: bool = True) -> None:
        self.source, self.sink = source, sink
        self.port = port
        self.max_body_bytes = max_body_bytes
        self.verify = verify  # pushed blocks: the sink gets only verified ones
        self.corrupt = 0
        self._listener = None

    async def start(self) -> int:
        ucxx = _ucxx()
        self._listener = ucxx.create_listener(self._serve, port=self.port)
        self.port = self._listener.port
        return self.port

    def _handle(self, header: dict, blocks: list) -> list[memoryview] | None:
        return answer(header, blocks, self.source, self.sink, self.verify)

    async def _serve(self, ep) -> None:
        ucxx = _ucxx()
        try:
            while True:
                header, body_len = await _recv_head(ep, self.max_body_bytes)
                blocks, bad = await _recv_body(ep, header, body_len, self.verify)
                self.corrupt += bad
                reply = self._handle(header, blocks)
                if reply is None:
                    return
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
    """asyncio client: ``c = await UCXClient.connect(host, port)``; ``await c.fetch(keys)``.

    One endpoint, one request at a time. After any error the endpoint is aborted (where the
    next message starts is unknown) and the next request connects again."""

    def __init__(self, ep, timeout_s: float, max_body_bytes: int, verify: bool = True,
                 addr: tuple[str, int] | None = None) -> None:
        self._ep = ep
        self.addr = addr
        self.timeout_s = timeout_s
        self.max_body_bytes = max_body_bytes
        self.verify = verify
        self.corrupt = 0  # blocks that failed verification (handed out as unmarked copies)
        self._lock = asyncio.Lock()

    @classmethod
    async def connect(cls, host: str, port: int, timeout_s: float = 10.0,
                      max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                      verify: bool = True) -> "UCXClient":
        return cls(await _connect(host, port, timeout_s), timeout_s, max_body_bytes, verify,
                   (host, port))

    async def _endpoint(self):
        if self._ep is None:
            if self.addr is None:
                raise ChannelClosed("no UCX connection (closed, or dropped after an error)")
            self._ep = await _connect(*self.addr, self.timeout_s)
        return self._ep

    def _drop(self) -> None:
        if self._ep is not None:
            try:
                self._ep.abort()  # cancels its requests still in flight
            except Exception as e:
                log.debug("ucx abort failed: %r", e)
            self._ep = None

    async def _request(self, parts: Sequence[memoryview], want: str):
        async with self._lock:
            ep = await self._endpoint()
            try:
                header, blocks, bad = await asyncio.wait_for(
                    _exchange(ep, parts, self.max_body_bytes, self.verify), self.timeout_s)
            except BaseException as e:
                self._drop()
                if not isinstance(e, Exception):
                    raise  # cancelled by our caller
                raise _translate(e) from None
            self.corrupt += bad
        check_reply(header, want)
        return header, blocks

    async def fetch(self, keys: Sequence[str]) -> list[memoryview | None]:
        return blocks_for(keys, *await self._request(get_request(keys), "blocks"))

    async def push(self, items: Sequence[tuple[str, object]]) -> None:
        await self._request(put_request(items), "ok")

    async def close(self) -> None:
        ep, self._ep, self.addr = self._ep, None, None
        if ep is not None and not ep.closed:
            try:
                await _send(ep, pack_message("bye"))
            except Exception:
                pass
            await ep.close()


async def _connect(host: str, port: int, timeout_s: float):
    ucxx = _ucxx()
    try:
        return await asyncio.wait_for(ucxx.create_endpoint(host, port), timeout_s)
    except Exception as e:
        raise _translate(e) from None
