"""Continuous batching: many requests share one model, one decode step at a time.

Each ``step``:
  1. cancelled requests leave (their blocks go back to the pool);
  2. waiting requests are admitted, oldest first, while the batch has room (``max_batch``), the
     pool has blocks for the prompt and the step's prefill budget (``max_prefill_tokens``) lasts.
     An admitted request is prefilled WITH REUSE by ``ReuseEngine.prefill`` (every reuse mode
     works unchanged), its first token is sampled from the prefill logits, and its KV (the
     engine's ``Sequence.cache``, keys after RoPE, slot = position) is copied into its paged blocks;
  3. every running sequence decodes one token: one batched forward over all of them
     (``paged_decode_step``), each attending over its own blocks;
  4. sequences that hit ``max_tokens`` or a stop id leave and free their blocks; new ones join
     at the next step.

On CUDA with the engine's graphs on (``cuda_graph_tokens`` > 0) the batched step is replayed from
a CUDA graph per (batch bucket, table-width bucket) (``GraphedPagedStep``; eager beyond the
engine's pool length, or if a capture fails). A request that arrives to an idle batcher decodes
alone on the engine's one-token CUDA graph over the engine's static pool (its fused one-token
kernels need no block gather); when the next request is admitted, its KV moves into paged blocks
and it joins the batch before that request's prefill takes the pool.

Out of blocks: admission waits; a decode step that lacks blocks swaps the newest sequences out
(their KV is copied out of the pool and back in when blocks free up: exact, nothing recomputed).

DHD decode-stage recomputation (``decode_recompute`` > 0 on a DHD prefill that left reused
tokens stale) is per sequence: it picks tokens by that sequence's own attention and reruns them
from its saved layer-c hidden states. Such a sequence decodes on the engine's single-sequence
path (``ReuseEngine.decode_step`` over its own contiguous cache), interleaved with the batched
steps, until no stale token is left; then it moves into paged blocks and joins the batch.

Sampling per request: greedy, or temperature / top_p with its own seeded generator
(``workers.engine.sample``), so a request's tokens do not depend on what it was batched with.
"""
from __future__ import annotations

import collections
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from index_service.plan import ReusePlan
from workers.block_manager import BlockManager, OutOfBlocksError
from workers.engine import GenerationResult, PrefillStats, ReuseEngine, ReuseSettings, Sequence, sample
from workers.errors import InvalidParameterError
from workers.kv_cache import KVCache
from workers.paged_decode import GraphCaptureError, GraphedPagedStep, paged_decode_step

log = logging.getLogger(__name__)


@dataclass
class BatchRequest:
    token_ids: list[int]
    max_tokens: int = 64
    plan: ReusePlan | None = None
    settings: ReuseSettings | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: tuple[int, ...] | list[int] | None = None  # None: the model's EOS ids
    keep_segment: bool = False
    request_id: str = field(default_factory=lambda: os.urandom(8).hex())
    # instead of engine.prefill (the worker's: donors it fetched, fallback on bad donor KV)
    prefill_fn: Callable[[], tuple[Sequence, torch.Tensor]] | None = None
    # called in the loop thread right after prefill, while the sequence's own cache still exists
    on_prefill: Callable[[Sequence], None] | None = None
    on_token: Callable[[int], None] | None = None


class Ticket:
    """A submitted request: its tokens as they come (``stream``) or at the end (``result``)."""

    def __init__(self, request: BatchRequest) -> None:
        self.request = request
        self.token_ids: list[int] = []
        self.stats: PrefillStats | None = None
        self.first_logits: torch.Tensor | None = None
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.decode_recomputed = 0
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.decode_s = 0.0
        self.events: queue.Queue = queue.Queue()
        self._done = threading.Event()

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def _put(self, kind: str, value: Any) -> None:
        self.events.put((kind, value))

    def _finish(self, reason: str | None, error: BaseException | None = None) -> None:
        if self._done.is_set():
            return
        self.finish_reason, self.error = reason, error
        self.finished_at = time.perf_counter()
        self._put("error", error) if error is not None else self._put("done", reason)
        self._done.set()

    def stream(self, timeout: float | None = None) -> Iterator[tuple[str, Any]]:
        """("prefill", PrefillStats), ("token", id)..., then ("done", reason) or ("error", exc)."""
        while True:
            kind, value = self.events.get(timeout=timeout)
            yield kind, value
            if kind in ("done", "error"):
                return

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def result(self, timeout: float | None = None) -> GenerationResult:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} did not finish in {timeout} s")
        if self.error is not None:
            raise self.error
        s = self.stats or PrefillStats(prompt_tokens=len(self.request.token_ids))
        return GenerationResult(list(self.token_ids), s.prompt_tokens, s.reused_tokens, s.recomputed_tokens,
                                s.cached_tokens, s.ttft_s, self.decode_s, self.decode_recomputed,
                                s.flops_fraction, self.first_logits, self.finish_reason or "length")


@dataclass
class _Running:
    ticket: Ticket
    sid: int
    gen: torch.Generator
    stop: set[int]
    next_token: int = -1
    n_out: int = 0
    solo: Sequence | None = None  # decoding on the engine's single-sequence path (DHD decode)
    swapped: tuple[torch.Tensor, torch.Tensor] | None = None  # KV while preempted
    length: int = 0  # tokens with KV (while swapped out)
    t_decode: float = 0.0


class ContinuousBatcher:
    def __init__(self, engine: ReuseEngine, blocks: BlockManager | None = None, max_batch: int = 16,
                 kv_bytes: int = 256 << 20, block_size: int = 16, max_prefill_tokens: int = 4096) -> None:
        if max_batch < 1 or max_prefill_tokens < 1:
            raise InvalidParameterError("max_batch and max_prefill_tokens must be >= 1")
        self.engine = engine
        self.runner = engine.runner
        self.blocks = blocks or BlockManager.for_bytes(engine.runner, kv_bytes, block_size)
        self.max_batch = max_batch
        self.max_prefill_tokens = max_prefill_tokens
        self.pool_decode = True  # a lone request decodes on the engine's CUDA graph (see the module)
        self.waiting: collections.deque[Ticket | _Running] = collections.deque()
        self.running: list[_Running] = []
        self._cancel: set[str] = set()
        self._cv = threading.Condition()
        self._next_sid = 0
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._busy = False
        self.stats = _new_stats()
        self.graphed = self._graphed_step()

    # ---- submitting -------------------------------------------------------------------------
    def blocks_needed(self, n_prompt: int, max_tokens: int) -> int:
        """Most blocks a request holds: KV of the prompt and of every generated token but the last
        (never fed back); none when it generates at most one token (it ends after prefill)."""
        return self.blocks.blocks_for(n_prompt + max_tokens - 1) if max_tokens > 1 else 0

    def fits(self, n_prompt: int, max_tokens: int) -> bool:
        """Whether the pool could ever hold the request's KV."""
        return self.blocks_needed(n_prompt, max_tokens) <= self.blocks.num_blocks

    def submit(self, request: BatchRequest) -> Ticket:
        req = request
        req.token_ids = self.engine.check_prompt(req.token_ids, req.max_tokens)
        if req.temperature < 0 or not 0 < req.top_p <= 1:
            raise InvalidParameterError(f"temperature must be >= 0 and top_p in (0, 1], got {req.temperature}, {req.top_p}")
        if not self.fits(len(req.token_ids), req.max_tokens):
            raise OutOfBlocksError(f"{len(req.token_ids)} prompt + {req.max_tokens} new tokens need "
                                   f"{self.blocks_needed(len(req.token_ids), req.max_tokens)} blocks; "
                                   f"the KV pool has {self.blocks.num_blocks}")
        ticket = Ticket(req)
        with self._cv:
            self.waiting.append(ticket)
            self._cv.notify_all()
        return ticket

    def cancel(self, request_id: str) -> None:
        """Stop a waiting or running request (its blocks are freed at the next step)."""
        with self._cv:
            self._cancel.add(request_id)
            self._cv.notify_all()

    def snapshot(self) -> dict[str, Any]:
        """Counters and pool occupancy, plain types (crosses Ray)."""
        out = dict(self.stats, batch_sizes=dict(self.stats["batch_sizes"]))
        out.update(running=len(self.running), waiting=len(self.waiting), max_batch=self.max_batch,
                   blocks_total=self.blocks.num_blocks, blocks_free=self.blocks.free_blocks,
                   block_size=self.blocks.block_size)
        return out

    # ---- driving ----------------------------------------------------------------------------
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def run(self) -> None:
        """Step until nothing is waiting or running (synchronous use: tests, benchmarks)."""
        while self.step():
            pass

    def start(self) -> "ContinuousBatcher":
        """Step in a background thread whenever there is work."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="kv-batcher", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._cv:  # nobody will step them any more: their readers must not wait forever
            left = [x if isinstance(x, Ticket) else x.ticket for x in self.waiting]
            self.waiting.clear()
        left += [r.ticket for r in self.running]
        for r in list(self.running):
            self.blocks.free(r.sid)
        self.running = []
        for t in left:
            t._finish(None, RuntimeError("the batcher was stopped"))

    def warm_up(self, token_ids: list[int], batch: int = 2, graph_tokens: int = 0) -> None:
        """Before ``start``: ``batch`` copies of a short prompt through prefill and a few batched
        steps, so kernel compilation is not in a request's TTFT; then, with graphs, every batch
        bucket's graph up to ``graph_tokens`` tokens of KV per sequence is captured. The counters
        start from zero afterwards."""
        if self._thread is not None or self.has_work():
            raise RuntimeError("warm_up runs before the batcher starts serving")
        tickets = [self.submit(BatchRequest(list(token_ids), 3, stop_ids=())) for _ in range(batch)]
        self.run()
        for t in tickets:
            t.result(0)
        if self.graphed is not None and graph_tokens > 0:  # a bucket that fails is tried again later
            n = self.graphed.capture_buckets(graph_tokens)
            log.info("batched decode: %d CUDA graphs captured (up to %d rows, %d tokens)",
                     n, self.graphed.max_rows, graph_tokens)
        self.stats = _new_stats()

    def wait_idle(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while self.has_work() or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(left)
        return True

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self.has_work():
                    self._cv.notify_all()  # wake wait_idle
                    self._cv.wait()
                if self._stopping:
                    return
                self._busy = True
            try:
                self.step()
            except Exception as e:  # noqa: BLE001 - fail the batch, keep serving
                log.exception("batch step failed; failing %d running requests", len(self.running))
                self._fail_running(e)
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()

    def step(self) -> bool:
        """One scheduling iteration; returns whether work is left."""
        self.stats["steps"] += 1
        self._reap_cancelled()
        self._admit()
        if self.running:
            self._decode()
        return self.has_work()

    # ---- cancel / admit ---------------------------------------------------------------------
    def _reap_cancelled(self) -> None:
        with self._cv:
            if not self._cancel:
                return
            gone = self._cancel
            self._cancel = set()
            keep = collections.deque()
            for item in self.waiting:
                t = item if isinstance(item, Ticket) else item.ticket
                if t.request_id in gone:
                    t._finish("cancelled")
                    self.stats["cancelled"] += 1
                else:
                    keep.append(item)
            self.waiting = keep
        for r in [r for r in self.running if r.ticket.request_id in gone]:
            self._leave(r, "cancelled")
            self.stats["cancelled"] += 1

    def _admit(self) -> None:
        budget = self.max_prefill_tokens
        admitted = 0
        while len(self.running) < self.max_batch:
            with self._cv:
                if not self.waiting:
                    return
                item = self.waiting[0]
            reserve = max(1, self.blocks.num_blocks // 100) if self.running else 0  # room to grow
            if isinstance(item, _Running):  # swapped out: back in as soon as its KV fits
                if self.blocks.blocks_for(item.length + 1) + reserve > self.blocks.free_blocks:
                    return
                with self._cv:
                    self.waiting.popleft()
                self._swap_in(item)
                continue
            n = len(item.request.token_ids)
            if admitted and n > budget:
                return
            # blocks for the prompt and the first fed-back token; max_tokens <= 1 never decodes
            need = self.blocks.blocks_for(n + 1) if item.request.max_tokens > 1 else 0
            if need and need + reserve > self.blocks.free_blocks:
                return
            with self._cv:
                self.waiting.popleft()
            budget -= n
            admitted += 1
            self._release_pool()
            self._start(item)

    @property
    def _engine_pool(self):
        """The engine's static CUDA-graph KV pool (None on CPU, or with cuda_graph_tokens 0)."""
        return getattr(self.engine, "_pool", None)

    def _release_pool(self) -> None:
        """A sequence decoding alone in the engine's pool moves out before a prefill takes it:
        into paged blocks (exact KV, it joins the batch), or into a copy of its own."""
        pool = self._engine_pool
        for r in self.running:
            seq = r.solo
            if pool is None or seq is None or seq.cache is not pool:
                continue
            n = seq.cache.length
            if not _needs_solo(seq) and self.blocks.can_allocate(n + 1):
                self.blocks.allocate(r.sid, n)
                self.blocks.write(r.sid, seq.cache.k[:, :, :n], seq.cache.v[:, :, :n])
                r.solo = None
                self.stats["migrated"] += 1
            else:
                seq.cache = KVCache(seq.cache.k.clone(), seq.cache.v.clone(), n)

    def _start(self, ticket: Ticket) -> None:
        sid = self._new_sid()
        try:
            self._prefill_and_join(ticket, sid)
        except Exception as e:  # noqa: BLE001 - this request fails, the batch goes on
            self.stats["errors"] += 1
            self.blocks.free(sid)
            self.running = [r for r in self.running if r.sid != sid]
            ticket._finish(None, e)

    def _prefill_and_join(self, ticket: Ticket, sid: int) -> None:
        req = ticket.request
        if req.prefill_fn is not None:
            seq, logits = req.prefill_fn()
        else:
            seq, logits = self.engine.prefill(req.token_ids, req.plan, req.settings, req.max_tokens,
                                              keep_segment=req.keep_segment)
        if req.on_prefill is not None:
            req.on_prefill(seq)
        self.stats["prefills"] += 1
        ticket.stats = seq.stats
        ticket.first_logits = logits.float().cpu()
        ticket._put("prefill", seq.stats)
        stop = set(self.runner.spec.eos_token_ids if req.stop_ids is None else req.stop_ids)
        gen = torch.Generator(device="cpu").manual_seed(req.seed if req.seed is not None else 0)
        r = _Running(ticket, sid, gen, stop, t_decode=time.perf_counter())
        if req.max_tokens == 0:
            ticket._finish("length")
            return
        if self._emit(r, sample(logits, req.temperature, req.top_p, gen)):
            return
        pooled = seq.cache is self._engine_pool
        if pooled and self.pool_decode and not self.running and not self.waiting:
            r.solo = seq  # alone: decodes on the engine's CUDA-graph step until a prefill needs the pool
        elif _needs_solo(seq):
            if pooled:
                seq.cache = KVCache(seq.cache.k.clone(), seq.cache.v.clone(), seq.cache.length)
            r.solo = seq
        else:
            n = seq.cache.length
            self.blocks.allocate(r.sid, n)
            self.blocks.write(r.sid, seq.cache.k[:, :, :n], seq.cache.v[:, :, :n])
        self.running.append(r)

    def _new_sid(self) -> int:
        self._next_sid += 1
        return self._next_sid

    # ---- decode -----------------------------------------------------------------------------
    def _decode(self) -> None:
        for r in [r for r in self.running if r.solo is not None]:
            self._solo_step(r)
        paged = [r for r in self.running if r.solo is None]
        paged = self._make_room(paged)
        if not paged:
            return
        B = len(paged)
        self.stats["decode_steps"] += 1
        self.stats["batch_sizes"][B] += 1
        self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], B)
        logits = self._paged_step([r.sid for r in paged], [r.next_token for r in paged])
        greedy = torch.argmax(logits, dim=-1).tolist()
        for i, r in enumerate(paged):
            req = r.ticket.request
            tok = greedy[i] if req.temperature == 0 else sample(logits[i], req.temperature, req.top_p, r.gen)
            self._emit(r, tok)

    def _graphed_step(self) -> GraphedPagedStep | None:
        pool = self._engine_pool
        if pool is None or self.runner.reduce is not None or self.blocks.num_blocks < 2 or self.blocks.tables:
            return None  # no graphs (CPU, cuda_graph_tokens 0, tensor parallel), or no block to spare
        return GraphedPagedStep(self.runner, self.blocks, self.max_batch, pool.capacity)

    def _paged_step(self, sids: list[int], tokens: list[int]) -> torch.Tensor:
        g = self.graphed
        if g is not None and g.fits(sids):
            try:
                logits = g(sids, tokens)
                self.stats["graph_steps"] += 1
                return logits
            except GraphCaptureError as e:
                log.warning("%s", e)
                self.stats["capture_failures"] += 1
        return paged_decode_step(self.runner, self.blocks, sids, tokens)

    def _solo_step(self, r: _Running) -> None:
        self.stats["solo_steps"] += 1
        req, seq = r.ticket.request, r.solo
        before = seq.decode_recomputed
        logits = self.engine.decode_step(seq, r.next_token)
        r.ticket.decode_recomputed += seq.decode_recomputed - before
        if self._emit(r, sample(logits, req.temperature, req.top_p, r.gen)):
            return
        n = seq.cache.length
        if seq.cache is self._engine_pool:
            return  # alone on the graph step: moved out by _release_pool when a prefill needs the pool
        if not _needs_solo(seq) and self.blocks.can_allocate(n + 1):  # nothing stale left: join the batch
            self.blocks.allocate(r.sid, n)
            self.blocks.write(r.sid, seq.cache.k[:, :, :n], seq.cache.v[:, :, :n])
            r.solo = None
            self.stats["migrated"] += 1

    def _make_room(self, paged: list[_Running]) -> list[_Running]:
        """Swap out the newest sequences until every one left has a slot for its next token."""
        bs = self.blocks.block_size
        while paged:
            need = sum(1 for r in paged if self.blocks.lengths[r.sid] % bs == 0)
            if need <= self.blocks.free_blocks:
                break
            self._swap_out(paged.pop())
        return paged

    def _swap_out(self, r: _Running) -> None:
        k, v = self.blocks.read(r.sid)
        r.length = k.shape[2]
        r.swapped = (k.cpu(), v.cpu()) if k.is_cuda else (k, v)
        self.blocks.free(r.sid)
        self.running.remove(r)
        with self._cv:
            self.waiting.appendleft(r)
        self.stats["preempted"] += 1

    def _swap_in(self, r: _Running) -> None:
        k, v = r.swapped
        self.blocks.allocate(r.sid, r.length)
        dev = self.blocks.k.device
        self.blocks.write(r.sid, k.to(dev), v.to(dev))
        r.swapped = None
        self.running.append(r)

    # ---- tokens out -------------------------------------------------------------------------
    def _emit(self, r: _Running, tok: int) -> bool:
        """Hand a token to its request; True if the request is finished (and has left)."""
        t = r.ticket
        if t.first_token_at is None:
            t.first_token_at = time.perf_counter()
        r.n_out += 1
        self.stats["tokens"] += 1
        t.token_ids.append(tok)
        t._put("token", tok)
        if t.request.on_token is not None:
            t.request.on_token(tok)
        if tok in r.stop:
            self._leave(r, "stop")
            return True
        if r.n_out >= t.request.max_tokens:
            self._leave(r, "length")
            return True
        r.next_token = tok
        return False

    def _leave(self, r: _Running, reason: str, error: BaseException | None = None) -> None:
        self.blocks.free(r.sid)
        r.solo = r.swapped = None
        if r in self.running:
            self.running.remove(r)
        r.ticket.decode_s = time.perf_counter() - r.t_decode
        r.ticket._finish(reason, error)

    def _fail_running(self, error: BaseException) -> None:
        self.stats["errors"] += 1
        for r in list(self.running):
            self._leave(r, None, error)


def _new_stats() -> dict[str, Any]:
    return {"steps": 0, "decode_steps": 0, "prefills": 0, "tokens": 0, "max_batch_seen": 0,
            "batch_sizes": collections.Counter(), "solo_steps": 0, "migrated": 0, "preempted": 0,
            "cancelled": 0, "errors": 0, "graph_steps": 0, "capture_failures": 0}


def _needs_solo(seq: Sequence) -> bool:
    """DHD decode recomputation still has stale reused tokens to pick from."""
    return (seq.settings.decode_recompute > 0 and seq.stale is not None and bool(seq.stale.any()))
