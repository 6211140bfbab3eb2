"""The tier stack a worker reads and writes: GPU -> host -> peer -> Redis -> miss.

Reads promote hits upward (into the GPU tier, and into the host tier when they came from a peer
or Redis). Writes go to the GPU tier at once and to the host tier and Redis from a background
thread through a bounded queue: the engine never waits on an encode or a network call, and when
the queue is full the write is dropped and counted (the KV can always be recomputed).
Every block read from any tier is verified; a bad one is dropped by that tier and counts as a miss.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable, Sequence

from transport.block import DEFAULT_MAX_BLOCK_BYTES, KVBlock, decode_block, encode_block_bytes
from transport.errors import BlockError, ChannelError
from transport.tiers.base import TierStats
from transport.tiers.gpu import GPUTier
from transport.tiers.host import HostTier
from transport.verify import channel_verified

log = logging.getLogger(__name__)

# A peer: keys -> encoded buffers (None where it has no such block), e.g. TCPClient.fetch.
PeerFetch = Callable[[list[str]], Sequence[object]]
_STOP = object()


class TieredStore:
    def __init__(self, gpu: GPUTier | None = None, host: HostTier | None = None,
                 redis=None, peer: PeerFetch | None = None, write_queue: int = 1024,
                 expected_fingerprint: str | None = None,
                 max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES) -> None:
        self.gpu, self.host, self.redis, self.peer = gpu, host, redis, peer
        self.expected_fingerprint = expected_fingerprint
        self.max_block_bytes = max_block_bytes
        self.peer_stats = TierStats()
        self.write_dropped = 0  # writes lost because the background queue was full
        self._q: queue.Queue = queue.Queue(maxsize=write_queue)
        self._writer: threading.Thread | None = None
        if host is not None or redis is not None:
            self._writer = threading.Thread(target=self._write_loop, name="kv-writeback",
                                            daemon=True)
            self._writer.start()

    # -- reads -----------------------------------------------------------------------------------
    def get_many(self, keys: Sequence[str]) -> list[KVBlock | None]:
        keys = list(keys)
        out: list[KVBlock | None] = [None] * len(keys)
        todo = list(range(len(keys)))
        if self.gpu is not None:
            todo = self._fill(out, todo, self.gpu.get_many(keys), keys)
        if todo and self.host is not None:
            dev = self.gpu.device if self.gpu is not None and self.gpu.device.type == "cuda" else None
            if self.gpu is not None and self.host.device_verify:
                # one device buffer, verified there; the GPU tier adopts the blocks as they are
                # (also with a CPU "GPU tier" when device_verify is asked for: tests, dry runs)
                got, sums = self.host.get_many_to_device([keys[i] for i in todo], self.gpu.device)
                todo = self._fill(out, todo, got, keys, to_gpu=True, owned=True, sums=sums)
            else:
                got = self.host.get_many([keys[i] for i in todo], device=dev)
                todo = self._fill(out, todo, got, keys, to_gpu=True)
        for source in (self._peer_get, self._redis_get):
            if todo and source is not None:
                got, raws = source([keys[i] for i in todo])
                todo = self._fill(out, todo, got, keys, to_gpu=True, raws=raws)
        return out

    def _fill(self, out, todo, got, keys, to_gpu: bool = False, raws=None, owned: bool = False,
              sums=None) -> list[int]:
        """Place hits, promote them upward (raws -> host tier, blocks -> GPU tier); return misses."""
        rest, hits = [], []
        for j, (i, blk) in enumerate(zip(todo, got)):
            if blk is None:
                rest.append(i)
            else:
                out[i] = blk
                hits.append((i, j))
        if raws is not None and self.host is not None and hits:
            self.host.put_encoded_many([(keys[i], raws[j]) for i, j in hits])
        if to_gpu and self.gpu is not None and hits:
            copies = self.gpu.put_many([(keys[i], out[i]) for i, _ in hits], owned=owned,
                                       sums=None if sums is None else [sums[j] for _, j in hits])
            for (i, _), c in zip(hits, copies):
                out[i] = c if c is not None else out[i].to(self.gpu.device)
        return rest

    def _peer_get(self, keys: list[str]):
        raws: list = [None] * len(keys)
        if self.peer is not None:
            try:
                raws = list(self.peer(keys))
                if len(raws) != len(keys):
                    raise ChannelError(f"peer answered {len(raws)} blocks for {len(keys)} keys")
            except (ChannelError, OSError, TimeoutError) as e:
                log.debug("peer fetch failed: %s", e)
                self.peer_stats.errors += 1
                raws = [None] * len(keys)
        blocks: list[KVBlock | None] = []
        for i, raw in enumerate(raws):
            blk = None
            if raw is not None:
                try:
                    # a verifying channel (TCP) checked the payload on receipt: not again
                    blk = decode_block(raw, self.expected_fingerprint, self.max_block_bytes,
                                       verify_payload=not channel_verified(raw))
                    self.peer_stats.bytes_out += memoryview(raw).nbytes
                except BlockError as e:
                    self.peer_stats.corrupt += 1
                    raws[i] = None
                    log.debug("discarded a bad block from a peer: %s", e)
            self.peer_stats.hits += blk is not None
            self.peer_stats.misses += blk is None
            blocks.append(blk)
        return blocks, raws

    def _redis_get(self, keys: list[str]):
        if self.redis is None:
            return [None] * len(keys), None
        return self.redis.get_verified(keys)

    def get_encoded_many(self, keys: Sequence[str]) -> list[object | None]:
        """Encoded blocks held locally (host tier, else GPU tier encoded): what a peer server serves."""
        keys = list(keys)
        out = self.host.get_encoded_many(keys) if self.host is not None else [None] * len(keys)
        if self.gpu is not None:
            miss = [i for i, b in enumerate(out) if b is None]
            for i, blk in zip(miss, self.gpu.get_many([keys[i] for i in miss])):
                if blk is not None:
                    out[i] = encode_block_bytes(blk)
        return out

    def contains(self, key: str) -> bool:
        for tier in (self.gpu, self.host, self.redis):
            if tier is not None and tier.contains(key):
                return True
        return False

    # -- small opaque records (segment manifests): host tier and Redis, no GPU -----------------
    def put_record(self, key: str, data: bytes) -> None:
        if self.host is not None:
            self.host.put_records([(key, data)])
        self._enqueue(key, bytes(data))

    def get_record(self, key: str) -> bytes | None:
        if self.host is not None:
            raw = self.host.get_encoded_many([key])[0]
            if raw is not None:
                return bytes(raw)
        raw = None
        if self.peer is not None:
            try:
                raw = self.peer([key])[0]
            except (ChannelError, OSError, TimeoutError):
                self.peer_stats.errors += 1
        if raw is None and self.redis is not None:
            raw = self.redis.get_encoded_many([key])[0]
        if raw is not None and self.host is not None:
            self.host.put_records([(key, bytes(raw))])
        return None if raw is None else bytes(raw)

    # -- writes ----------------------------------------------------------------------------------
    def put_many(self, items: Sequence[tuple[str, KVBlock]]) -> None:
        """Store blocks. Without a GPU tier the background writer encodes the caller's tensors
        later: do not modify them in place after put (fresh KV tensors are the normal case)."""
        items = list(items)
        if self.gpu is not None:
            kept = self.gpu.put_many(items)
            # encode from the tier's own copy (the caller may reuse its buffers)
            items = [(k, c if c is not None else b) for (k, b), c in zip(items, kept)]
        for key, blk in items:
            self._enqueue(key, blk)

    def _enqueue(self, key: str, item) -> None:
        if self._writer is None:
            return
        try:
            self._q.put_nowait((key, item))
        except queue.Full:
            self.write_dropped += 1

    def _write_loop(self) -> None:
        while True:
            first = self._q.get()
            batch = [first]
            while len(batch) < 64:
                try:
                    batch.append(self._q.get_nowait())
                except queue.Empty:
                    break
            try:
                stop = any(x is _STOP for x in batch)
                self._write_batch([x for x in batch if x is not _STOP])
            except Exception:  # the writer must survive anything; the KV can be recomputed
                log.exception("background write failed")
                stop = False
            finally:
                for _ in batch:
                    self._q.task_done()
            if stop:
                return

    def _write_batch(self, batch: list[tuple[str, object]]) -> None:
        encoded = []
        for key, item in batch:
            if isinstance(item, KVBlock):
                buf = encode_block_bytes(item)
                if self.host is not None:
                    self.host.put_encoded_many([(key, buf)])
            else:
                buf = item  # a record, already in the host tier
            encoded.append((key, buf))
        if self.redis is not None and encoded:
            self.redis.put_encoded_many(encoded)

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until queued writes are done; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._q.all_tasks_done:
            while self._q.unfinished_tasks:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._q.all_tasks_done.wait(left)
        return True

    # -- eviction and lifecycle --------------------------------------------------------------------
    def evict(self, key: str) -> bool:
        hit = False
        for tier in (self.gpu, self.host, self.redis):
            if tier is not None:
                hit = tier.evict(key) or hit
        return hit

    def stats(self) -> dict[str, dict[str, int]]:
        out = {t.name: t.stats.as_dict() for t in (self.gpu, self.host, self.redis) if t is not None}
        if self.peer is not None:
            out["peer"] = self.peer_stats.as_dict()
        out["store"] = {"write_dropped": self.write_dropped, "write_queue": self._q.qsize()}
        return out

    def close(self) -> None:
        if self._writer is not None and self._writer.is_alive():
            self.flush()
            self._q.put(_STOP)
            self._writer.join(timeout=10)
