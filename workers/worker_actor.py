"""A worker: one model replica, its reuse engine and its own KV tiers, serving requests with a
reuse plan, exporting KV blocks to peers, and fetching the donors it lacks from them.

``Worker`` is a plain class (tests and single-process use need no Ray); ``WorkerActor`` is the same
class as a Ray actor. Create the actor as a threaded actor (``max_concurrency`` >= 2, see
``ACTOR_OPTIONS``) so that a peer's ``export_blocks`` is served while this worker generates, and
so that concurrent requests meet in the continuous batcher (``workers/continuous_batcher.py``): a
background thread prefills each admitted request with reuse and decodes all running requests
together, one batched forward per token, over paged KV blocks. ``batching=False`` (or a request
too large for the KV pool) takes the old path: one request at a time behind a lock.

Request path on the worker (DESIGN.md, "The request path", steps 6-10):

1. validate the request (it crossed a process boundary: types, sizes, the plan's spans);
2. fetch: each donor of the plan is read through the worker's TieredStore, GPU -> host -> peer ->
   Redis. The peer step asks the worker the router named as the donor's holder, through the
   configured channel (Ray object store: numpy arrays, never torch tensors; TCP; or in-process),
   and every block that arrives is verified (header and payload xxh64, model fingerprint,
   token hash against the manifest) before it is used; a donor that cannot be had whole, or that
   belongs to another tenant and is not public, is dropped from the plan (those tokens are
   computed);
3. prefill with the plan (a DonorKVError at that point: recompute the whole prompt), decode,
   yielding events: "prefill" (stats), "token" (one per token), "done";
4. write the prompt's KV back as a segment (blocks into the tiers, flushed so that peers and
   Redis can serve it before the router indexes it).

Not done here (said plainly): chunked prefill (a long prompt's prefill stalls the running batch
while it runs), and batched DHD decode-stage recomputation (such a request decodes alone, in the
batcher's loop, until its stale tokens are used up, then joins the batch).
"""
from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Iterator

import torch

from index_service.plan import ReusePlan, ReuseSpan
from transport.block import block_key
from transport.tiers.host import HostTier
from transport.tiers.tiered import TieredStore
from workers.continuous_batcher import BatchRequest
from workers.engine import MODES, ReuseEngine, ReuseSettings, sample
from workers.errors import DonorKVError, InvalidParameterError
from workers.segments import SegmentKV
from workers.tiered_store import TieredSegmentStore

log = logging.getLogger(__name__)

CHANNELS = ("ray", "tcp", "inproc")
SCOPES = ("private", "public")
MAX_NEW_TOKENS = 1 << 16
MAX_EXPORT_KEYS = 1 << 16
_SEGMENT_ID = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
_REQUEST_KEYS = {"request_id", "token_ids", "max_tokens", "temperature", "top_p", "seed", "stop_ids", "plan",
                 "donor_locations", "segment_id", "tenant", "scope", "mode"}


@dataclass
class WorkerOptions:
    model: str = "smollm2-135m"
    gguf_file: str | None = None
    dtype: str = "float32"
    device: str = "auto"
    max_context: int | None = None
    kv_sharing_strategy: str | None = None
    reuse: dict = field(default_factory=dict)  # ReuseSettings fields
    block_tokens: int = 64
    gpu_bytes: int = 2 << 30  # used only when the model runs on CUDA (on CPU the host tier is it)
    host_bytes: int = 4 << 30
    redis_url: str | None = None
    redis_prefix: str = "kvcluster:"
    redis_ttl_s: int = 3600
    max_block_bytes: int = 64 << 20
    channel: str = "ray"
    tcp_host: str = "127.0.0.1"
    advertise_host: str | None = None
    num_threads: int | None = None  # torch intra-op threads (several workers on one CPU host)
    fetch_timeout_s: float = 10.0
    flush_timeout_s: float = 10.0
    batching: bool = True  # continuous batching of concurrent requests over paged KV blocks
    max_batch: int = 16  # sequences decoded together
    kv_pool_bytes: int = 512 << 20  # the paged KV pool (K and V) the batch shares
    kv_block_size: int = 16  # tokens per paged KV block
    tensor_parallel_size: int = 1  # > 1: the worker is a group of shards (workers/tp_group.py)
    cuda_graph_tokens: int = 8192  # on CUDA: static KV pool + CUDA-graph replay up to this length; 0 = eager
    warmup: bool = True  # a few tokens through every path at start, not in the first requests' TTFT
    warmup_graph_tokens: int = 2048  # with warmup on CUDA: batched-decode graphs captured at start up to this KV length

    @classmethod
    def coerce(cls, options: "WorkerOptions | dict | None") -> "WorkerOptions":
        if options is None:
            return cls()
        if isinstance(options, cls):
            return options
        if isinstance(options, dict):
            known = {f.name for f in fields(cls)}
            bad = set(options) - known
            if bad:
                raise InvalidParameterError(f"unknown worker options {sorted(bad)}")
            return cls(**options)
        raise InvalidParameterError(f"worker options must be WorkerOptions or a dict, got {type(options).__name__}")

    @classmethod
    def from_config(cls, cfg: Any, **overrides: Any) -> "WorkerOptions":
        """From a KVClusterConfig (read by attribute: workers do not import kvcluster)."""
        m, r, t = cfg.model, cfg.reuse, cfg.tiers
        reuse = {k: getattr(r, k) for k in ("mode", "recompute_ratio", "check_layer", "decode_recompute",
                                            "epic_tokens", "suffix_tokens", "min_recompute")}
        opts = cls(model=m.name, gguf_file=m.gguf_file, dtype=m.dtype, device=m.device,
                   max_context=m.max_context, kv_sharing_strategy=m.kv_sharing_strategy, reuse=reuse,
                   block_tokens=t.block_tokens, gpu_bytes=t.gpu_bytes, host_bytes=t.host_bytes,
                   redis_url=t.redis_url, redis_prefix=t.redis_prefix, redis_ttl_s=t.redis_ttl_s,
                   max_block_bytes=t.max_block_bytes,
                   tensor_parallel_size=getattr(m, "tensor_parallel_size", 1),
                   cuda_graph_tokens=getattr(m, "cuda_graph_tokens", 8192))
        c = getattr(cfg, "cluster", None)
        for k in ("batching", "max_batch", "kv_pool_bytes", "kv_block_size"):
            if hasattr(c, k):
                setattr(opts, k, getattr(c, k))
        return replace(opts, **overrides)


@dataclass
class _Transfer:
    fetches: int = 0
    blocks: int = 0
    bytes: int = 0
    seconds: float = 0.0
    errors: int = 0

    def as_dict(self) -> dict:
        return {"fetches": self.fetches, "blocks": self.blocks, "bytes": self.bytes,
                "seconds": self.seconds, "errors": self.errors}


class _StoreView:
    """What the engine reads donors from: the segments fetched for the current request, then the
    tiers (so a donor is reassembled once per request, not once per lookup)."""

    def __init__(self, worker: "Worker") -> None:
        self.w = worker

    def get(self, segment_id: str) -> SegmentKV | None:
        pre = getattr(self.w._ctx, "prefetched", None)
        if pre is not None and segment_id in pre:
            return pre[segment_id]
        return self.w.segments.get(segment_id)

    def contains(self, segment_id: str) -> bool:
        return self.get(segment_id) is not None

    def put(self, seg: SegmentKV) -> None:
        self.w.segments.put(seg)

    def evict(self, segment_id: str) -> bool:
        return self.w.segments.evict(segment_id)


class Worker:
    def __init__(self, worker_id: str = "w0", options: WorkerOptions | dict | None = None, runner=None) -> None:
        if not isinstance(worker_id, str) or not worker_id or ":" in worker_id:
            raise InvalidParameterError(f"worker_id must be a non-empty string without ':', got {worker_id!r}")
        self.worker_id = worker_id
        self.options = opts = WorkerOptions.coerce(options)
        if opts.channel not in CHANNELS:
            raise InvalidParameterError(f"channel must be one of {CHANNELS}, got {opts.channel!r}")
        if not _is_int(opts.cuda_graph_tokens) or opts.cuda_graph_tokens < 0:
            raise InvalidParameterError(f"cuda_graph_tokens must be an int >= 0, got {opts.cuda_graph_tokens!r}")
        if opts.num_threads:
            torch.set_num_threads(opts.num_threads)
        t0 = time.perf_counter()
        if runner is None:
            from workers.model_loader import load_runner
            runner = load_runner(opts.model, opts.gguf_file, opts.dtype, opts.device)
            if opts.kv_sharing_strategy:
                from workers.kvsharer import apply_strategy  # KVSharer's loader
                apply_strategy(runner, opts.kv_sharing_strategy)
        self.runner = runner
        self.fingerprint: str = runner.fingerprint
        self.tiers = self._make_tiers(opts)
        self.segments = TieredSegmentStore(self.tiers, self.fingerprint, opts.block_tokens)
        settings = ReuseSettings(**opts.reuse) if opts.reuse else ReuseSettings()
        self.engine = ReuseEngine(runner, _StoreView(self), settings, max_context=opts.max_context,
                                  static_tokens=opts.cuda_graph_tokens)
        self._lock = threading.Lock()  # one sequence at a time on the engine (unbatched path)
        self._count_lock = threading.Lock()
        self._ctx = threading.local()  # per request: donor locations, prefetched segments, transfer stats
        self._cancelled: set[str] = set()
        self._peers: dict[str, Any] = {}
        self._channels: dict[str, Callable[[list[str]], list]] = {}
        self.transfer: dict[str, _Transfer] = {}
        self.counters = {"requests": 0, "prompt_tokens": 0, "reused_tokens": 0, "recomputed_tokens": 0,
                         "generated_tokens": 0, "segments_written": 0, "fallbacks": 0, "donors_fetched": 0,
                         "donors_dropped": 0, "donors_local": 0, "cancelled": 0, "exports": 0,
                         "blocks_exported": 0}
        self._tcp = None
        self.tcp_address: tuple[str, int] | None = None
        if opts.channel == "tcp":
            from transport.channels.tcp import TCPServer
            self._tcp = TCPServer(source=self._export_source, host=opts.tcp_host, port=0)
            port = self._tcp.start_background()
            self.tcp_address = (opts.advertise_host or opts.tcp_host, port)
        self._batcher = None
        if opts.batching:
            from workers.block_manager import BlockManager
            from workers.continuous_batcher import ContinuousBatcher
            blocks = BlockManager.for_bytes(runner, opts.kv_pool_bytes, opts.kv_block_size)
            self._batcher = ContinuousBatcher(self.engine, blocks, max_batch=opts.max_batch)
        if opts.warmup:
            self._warm_up()
        if self._batcher is not None:
            self._batcher.start()
        log.info("worker %s ready in %.1f s: %s on %s, channel %s", worker_id, time.perf_counter() - t0,
                 self.fingerprint, runner.device, opts.channel)

    def _warm_up(self) -> None:
        """A short prompt alone (prefill, decode, the one-token CUDA graph), on CUDA a 1k-token
        prefill, and two short prompts at once through the batcher, which then captures its batched
        step's graphs (every batch bucket up to ``warmup_graph_tokens`` of KV). On a fresh GPU
        process the first requests otherwise pay for kernel compilation and graph capture inside
        their TTFT."""
        t0 = time.perf_counter()
        ids = self._warm_up_ids(16)
        try:
            self.engine.generate(ids, max_tokens=3, stop_ids=(), keep_segment=False)
            if self.runner.device.type == "cuda":  # a long prefill's first run is slow too (allocator, GEMM shapes)
                self.engine.generate(self._warm_up_ids(1024), max_tokens=1, stop_ids=(), keep_segment=False)
            if self._batcher is not None:
                self._batcher.warm_up(ids, graph_tokens=self.options.warmup_graph_tokens)
        except Exception as e:  # noqa: BLE001 - a failed warm-up only costs the first requests time
            log.warning("worker warm-up failed (%s: %s)", type(e).__name__, e)
            return
        log.info("worker %s warmed up in %.2f s", self.worker_id, time.perf_counter() - t0)

    def _warm_up_ids(self, n: int) -> list[int]:
        n = min(n, self.engine.max_context // 2)
        return [2 + i % (self.runner.spec.vocab_size - 2) for i in range(n)]

    def _make_tiers(self, opts: WorkerOptions) -> TieredStore:
        gpu = None
        if self.runner.device.type == "cuda" and opts.gpu_bytes > 0:
            from transport.tiers.gpu import GPUTier
            gpu = GPUTier(opts.gpu_bytes, device=self.runner.device)
        host = HostTier(opts.host_bytes, max_block_bytes=opts.max_block_bytes,
                        expected_fingerprint=self.fingerprint) if opts.host_bytes > 0 else None
        redis = None
        if opts.redis_url:
            from transport.tiers.redis_tier import RedisTier
            redis = RedisTier(opts.redis_url, prefix=opts.redis_prefix, ttl_s=opts.redis_ttl_s,
                              max_block_bytes=opts.max_block_bytes, expected_fingerprint=self.fingerprint)
        return TieredStore(gpu=gpu, host=host, redis=redis, peer=self._fetch_from_peers,
                           expected_fingerprint=self.fingerprint, max_block_bytes=opts.max_block_bytes)

    # ---- identity and health -----------------------------------------------------------------
    def info(self) -> dict:
        s = self.runner.spec
        return {"worker_id": self.worker_id, "fingerprint": self.fingerprint, "model": self.runner.name,
                "max_context": self.engine.max_context, "vocab_size": s.vocab_size,
                "eos_token_ids": list(s.eos_token_ids), "num_layers": s.num_layers,
                "device": str(self.runner.device), "channel": self.options.channel,
                "tcp": list(self.tcp_address) if self.tcp_address else None, "pid": os.getpid()}

    def ping(self) -> bool:
        return True

    # ---- peers --------------------------------------------------------------------------------
    def set_peers(self, peers: dict[str, Any]) -> None:
        """worker id -> a Worker (in-process), (host, port) (TCP) or a Ray actor handle."""
        if not isinstance(peers, dict):
            raise InvalidParameterError("peers must be a dict of worker id -> peer")
        self._peers = {k: v for k, v in peers.items() if k != self.worker_id}
        self._channels = {}

    def _channel(self, holder: str) -> Callable[[list[str]], list] | None:
        ch = self._channels.get(holder)
        if ch is not None:
            return ch
        peer = self._peers.get(holder)
        if peer is None:
            return None
        if isinstance(peer, Worker):
            from transport.channels.inproc import InProcessChannel
            ch = InProcessChannel(source=peer.export_encoded).fetch
        elif isinstance(peer, (tuple, list)):
            from transport.channels.tcp import TCPClient
            ch = TCPClient(str(peer[0]), int(peer[1]), timeout_s=self.options.fetch_timeout_s).fetch
        else:  # a Ray actor handle of another Worker
            from transport.channels.ray_channel import RayChannel
            ch = RayChannel().fetcher(peer.export_blocks.remote, self.options.fetch_timeout_s)
        self._channels[holder] = ch
        return ch

    def _segment_of_key(self, key: str) -> str | None:
        pre = self.fingerprint + ":"
        if not key.startswith(pre) or ":" not in key[len(pre):]:
            return None
        return key[len(pre):].rsplit(":", 1)[0]

    def _fetch_from_peers(self, keys: list[str]) -> list:
        """TieredStore's peer step: ask each key's segment holder (named by the router for the
        current request); None where no holder is known or it failed. Verification is the
        TieredStore's (every block is decoded and checked before use)."""
        out: list = [None] * len(keys)
        locs = getattr(self._ctx, "locations", None)
        if not locs:
            return out
        groups: dict[str, list[int]] = {}
        for i, k in enumerate(keys):
            holder = locs.get(self._segment_of_key(k))
            if holder and holder != self.worker_id:
                groups.setdefault(holder, []).append(i)
        for holder, idx in groups.items():
            ch = self._channel(holder)
            if ch is None:
                continue
            kind = self._channel_kind(holder)
            tr = self.transfer.setdefault(kind, _Transfer())
            t0 = time.perf_counter()
            try:
                raws = list(ch([keys[i] for i in idx]))
                if len(raws) != len(idx):
                    raise ValueError(f"peer answered {len(raws)} blocks for {len(idx)} keys")
            except Exception as e:  # noqa: BLE001 - any failure is a miss; the KV can be recomputed
                tr.errors += 1
                self._ctx.peer_errors.add(holder)
                log.warning("fetch from peer %s failed (%s: %s)", holder, type(e).__name__, e)
                continue
            dt = time.perf_counter() - t0
            got = [r for r in raws if r is not None]
            nbytes = sum(memoryview(r).nbytes for r in got)
            tr.fetches += 1
            tr.blocks += len(got)
            tr.bytes += nbytes
            tr.seconds += dt
            acc = self._ctx.fetch
            acc["peer_blocks"] += len(got)
            acc["peer_bytes"] += nbytes
            acc["peer_s"] += dt
            acc["channel"] = kind
            for i, r in zip(idx, raws):
                out[i] = r
        return out

    def _channel_kind(self, holder: str) -> str:
        peer = self._peers.get(holder)
        if isinstance(peer, Worker):
            return "inproc"
        if isinstance(peer, (tuple, list)):
            return "tcp"
        return "ray"

    # ---- serving peers ------------------------------------------------------------------------
    def _export_source(self, keys: list[str]) -> list:
        if not isinstance(keys, list) or len(keys) > MAX_EXPORT_KEYS:
            raise InvalidParameterError("keys must be a list of at most 65536 strings")
        ok = [isinstance(k, str) and len(k) <= 1024 and self._segment_of_key(k) is not None for k in keys]
        asked = [k for k, good in zip(keys, ok) if good]
        got = iter(self.tiers.get_encoded_many(asked) if asked else [])
        out = [next(got) if good else None for good in ok]
        self.counters["exports"] += 1
        self.counters["blocks_exported"] += sum(b is not None for b in out)
        return out

    def export_encoded(self, keys: list[str]) -> list:
        """Encoded blocks (and manifest records) this worker holds locally; None where it has none."""
        return self._export_source(list(keys))

    def export_blocks(self, keys: list[str]) -> list:
        """The Ray channel's producer: the same as numpy uint8 arrays in the transport message format."""
        from transport.channels.ray_channel import pack
        keys = list(keys)
        return pack(list(zip(keys, self._export_source(keys))))

    def has_segment(self, segment_id: str) -> bool:
        """Held in this worker's own tiers (not counting Redis or peers)."""
        return self._held_locally(segment_id)

    def drop_segment(self, segment_id: str) -> bool:
        return self.segments.evict(segment_id)

    # ---- requests -----------------------------------------------------------------------------
    def cancel(self, request_id: str) -> None:
        if isinstance(request_id, str):
            self._cancelled.add(request_id)
            if self._batcher is not None:
                self._batcher.cancel(request_id)

    def generate(self, request: dict) -> dict:
        """Run a request to the end: {"prefill": {...}, "token_ids": [...], "done": {...}}."""
        out: dict[str, Any] = {"token_ids": []}
        for ev in self.generate_stream(request):
            if ev["type"] == "token":
                out["token_ids"].append(ev["token_id"])
            else:
                out[ev["type"]] = ev
        return out

    def generate_stream(self, request: dict) -> Iterator[dict]:
        req = self._validate(request)
        b = self._batcher
        if b is not None and b.fits(len(req["token_ids"]), req["max_tokens"]):
            yield from self._generate_batched(req)
        else:
            yield from self._generate_alone(req)

    def _generate_alone(self, req: dict) -> Iterator[dict]:
        rid, ids, max_tokens = req["request_id"], req["token_ids"], req["max_tokens"]
        settings = self.engine.settings if req["mode"] is None else replace(self.engine.settings, mode=req["mode"])
        with self._lock:
            t0 = time.perf_counter()
            self.engine.check_prompt(ids, max_tokens)
            plan, fetch = self._prepare(req)
            keep = req["segment_id"] is not None
            pooled = self._batcher is None  # else the batcher's thread owns the engine's graph pool
            fallback = None
            try:
                try:
                    seq, logits = self.engine.prefill(ids, plan, settings, max_tokens, keep_segment=keep,
                                                      pooled=pooled)
                except DonorKVError as e:
                    fallback = f"{type(e).__name__}: {e}"
                    log.warning("request %s: donor KV unusable (%s); recomputing in full", rid, fallback)
                    self.counters["fallbacks"] += 1
                    seq, logits = self.engine.prefill(ids, None, settings, max_tokens, keep_segment=keep,
                                                      pooled=pooled)
            finally:
                self._ctx.prefetched = None
            c = self.counters
            yield self._prefill_event(seq.stats, t0, fetch, fallback, plan)
            gen = torch.Generator(device="cpu").manual_seed(req["seed"] if req["seed"] is not None else 0)
            stop = set(self.runner.spec.eos_token_ids if req["stop_ids"] is None else req["stop_ids"])
            reason, n_out, t1 = "length", 0, time.perf_counter()
            for i in range(max_tokens):
                if rid in self._cancelled:
                    reason = "cancelled"
                    c["cancelled"] += 1
                    break
                nxt = sample(logits, req["temperature"], req["top_p"], gen)
                n_out += 1
                yield {"type": "token", "token_id": nxt}
                if nxt in stop:
                    reason = "stop"
                    break
                if i + 1 < max_tokens:
                    logits = self.engine.decode_step(seq, nxt)
            decode_s = time.perf_counter() - t1
            self._cancelled.discard(rid)
            c["generated_tokens"] += n_out
            sid = self._write_back(seq, req) if keep else None
            decode_recomputed = seq.decode_recomputed
            del seq
        yield {"type": "done", "worker": self.worker_id, "finish_reason": reason, "completion_tokens": n_out,
               "decode_s": decode_s, "decode_recomputed": decode_recomputed, "segment_id": sid,
               "fetched_donors": fetch["fetched"], "missing_donors": fetch["missing"]}

    def _prefill_event(self, st, t0: float, fetch: dict, fallback: str | None, plan: ReusePlan | None) -> dict:
        with self._count_lock:
            c = self.counters
            c["requests"] += 1
            c["prompt_tokens"] += st.prompt_tokens
            c["reused_tokens"] += st.reused_tokens
            c["recomputed_tokens"] += st.recomputed_tokens
        return {"type": "prefill", "worker": self.worker_id, "prompt_tokens": st.prompt_tokens,
                "reused_tokens": st.reused_tokens, "recomputed_tokens": st.recomputed_tokens,
                "cached_tokens": st.cached_tokens, "computed_tokens": st.computed_tokens,
                "flops_fraction": st.flops_fraction, "prefill_s": st.ttft_s,
                "worker_ttft_s": time.perf_counter() - t0, "fetch": fetch, "fallback": fallback,
                "source": (plan.source if plan is not None and st.reused_tokens else "miss"),
                "donor_ids": list(plan.donor_ids) if plan is not None and st.reused_tokens else []}

    def _generate_batched(self, req: dict) -> Iterator[dict]:
        """The events of ``_generate_alone``; donors are fetched in this thread, prefill and decode
        run in the batcher's thread (with this request's fetched donors in view)."""
        rid, ids, max_tokens = req["request_id"], req["token_ids"], req["max_tokens"]
        settings = self.engine.settings if req["mode"] is None else replace(self.engine.settings, mode=req["mode"])
        t0 = time.perf_counter()
        self.engine.check_prompt(ids, max_tokens)
        plan, fetch = self._prepare(req)
        pre, self._ctx.prefetched = self._ctx.prefetched, None
        keep = req["segment_id"] is not None
        out: dict[str, Any] = {"fallback": None, "segment": None}

        def prefill():
            self._ctx.prefetched = pre
            try:
                try:
                    return self.engine.prefill(ids, plan, settings, max_tokens, keep_segment=keep)
                except DonorKVError as e:
                    out["fallback"] = f"{type(e).__name__}: {e}"
                    log.warning("request %s: donor KV unusable (%s); recomputing in full", rid, out["fallback"])
                    with self._count_lock:
                        self.counters["fallbacks"] += 1
                    return self.engine.prefill(ids, None, settings, max_tokens, keep_segment=keep)
            finally:
                self._ctx.prefetched = None

        def on_prefill(seq):  # the prompt's KV leaves the sequence's own cache right after this
            if keep:
                out["segment"] = self._segment_of(seq, req)

        ticket = self._batcher.submit(BatchRequest(
            ids, max_tokens, temperature=req["temperature"], top_p=req["top_p"], seed=req["seed"],
            stop_ids=req["stop_ids"], request_id=rid, prefill_fn=prefill, on_prefill=on_prefill))
        if rid in self._cancelled:
            self._batcher.cancel(rid)
        n_out, reason = 0, "length"
        try:
            for kind, value in ticket.stream():
                if kind == "prefill":
                    yield self._prefill_event(value, t0, fetch, out["fallback"], plan)
                elif kind == "token":
                    n_out += 1
                    yield {"type": "token", "token_id": value}
                elif kind == "error":
                    raise value
                else:
                    reason = value
        finally:
            if not ticket.finished:  # the caller stopped reading: free the request's blocks
                self._batcher.cancel(rid)
        self._cancelled.discard(rid)
        with self._count_lock:
            self.counters["cancelled"] += reason == "cancelled"
            self.counters["generated_tokens"] += n_out
        sid = self._store_segment(out["segment"], req) if out["segment"] is not None else None
        yield {"type": "done", "worker": self.worker_id, "finish_reason": reason, "completion_tokens": n_out,
               "decode_s": ticket.decode_s, "decode_recomputed": ticket.decode_recomputed, "segment_id": sid,
               "fetched_donors": fetch["fetched"], "missing_donors": fetch["missing"]}

    def _prepare(self, req: dict) -> tuple[ReusePlan | None, dict]:
        """Fetch the plan's donors (tiers, then peers, then Redis); drop the ones that cannot be used."""
        fetch = {"local": [], "fetched": [], "dropped": [], "missing": [], "peer_blocks": 0, "peer_bytes": 0,
                 "peer_s": 0.0, "channel": None, "fetch_s": 0.0}
        plan: ReusePlan | None = req["plan"]
        self._ctx.prefetched = None
        if plan is None or not plan.spans:
            return plan, fetch
        t0 = time.perf_counter()
        self._ctx.locations = req["donor_locations"]
        self._ctx.fetch = fetch
        self._ctx.peer_errors = set()
        pre: dict[str, SegmentKV] = {}
        try:
            for d in plan.donor_ids:
                local = self._held_locally(d)
                try:
                    seg = self.segments.get(d)
                except Exception as e:  # noqa: BLE001 - a broken tier is a miss
                    log.warning("reading donor %s failed (%s: %s)", d, type(e).__name__, e)
                    seg = None
                if seg is None:
                    holder = req["donor_locations"].get(d)
                    redis = self.tiers.redis
                    gone = holder not in self._ctx.peer_errors and (redis is None or redis.is_up)
                    fetch["missing" if gone else "dropped"].append(d)
                    continue
                if seg.tenant != req["tenant"] and seg.scope != "public":
                    log.error("donor %s belongs to another tenant and is private; not reusing it", d)
                    fetch["dropped"].append(d)
                    continue
                pre[d] = seg
                fetch["local" if local else "fetched"].append(d)
        finally:
            self._ctx.locations = None
        self._ctx.prefetched = pre
        c = self.counters
        c["donors_local"] += len(fetch["local"])
        c["donors_fetched"] += len(fetch["fetched"])
        c["donors_dropped"] += len(fetch["dropped"]) + len(fetch["missing"])
        fetch["fetch_s"] = time.perf_counter() - t0
        if len(pre) < len(plan.donor_ids):
            spans = [s for s in plan.spans if s.donor_id in pre]
            prefix = plan.prefix_len if all(s.donor_id in pre for s in plan.spans if s.new_start < plan.prefix_len) else 0
            plan = ReusePlan(plan.n_tokens, spans, prefix_len=prefix, source=plan.source)
        return plan, fetch

    def _held_locally(self, segment_id: str) -> bool:
        t = self.tiers
        if t.host is not None and t.host.contains(self.segments._manifest_key(segment_id)):
            return True
        return t.gpu is not None and t.gpu.contains(f"{self.fingerprint}:{segment_id}:0")

    @torch.inference_mode()
    def _write_back(self, seq, req: dict) -> str | None:
        return self._store_segment(self._segment_of(seq, req), req)

    @torch.inference_mode()
    def _segment_of(self, seq, req: dict) -> SegmentKV | None:
        try:
            return self.engine.segment_of(seq, req["segment_id"], req["tenant"], req["scope"], device="cpu")
        except Exception as e:  # noqa: BLE001 - a segment not stored is only a future miss
            log.warning("could not store segment %s (%s: %s)", req["segment_id"], type(e).__name__, e)
            return None

    def _store_segment(self, seg: SegmentKV | None, req: dict) -> str | None:
        sid = req["segment_id"]
        if seg is None:
            return None
        try:
            self.segments.put(seg)
            if not self._wait_local(sid, seg.n_tokens):
                log.warning("segment %s: write-back still queued after %.0f s", sid, self.options.flush_timeout_s)
        except Exception as e:  # noqa: BLE001 - a segment not stored is only a future miss
            log.warning("could not store segment %s (%s: %s)", sid, type(e).__name__, e)
            return None
        with self._count_lock:
            self.counters["segments_written"] += 1
        return sid

    def _wait_local(self, segment_id: str, n_tokens: int) -> bool:
        """Wait until this worker can serve the segment to peers (its blocks are in the GPU or host
        tier); the write-through to Redis goes on in the background."""
        t = self.tiers
        bt = self.options.block_tokens
        keys = [block_key(self.fingerprint, segment_id, i) for i in range(-(-n_tokens // bt))]
        if t.gpu is not None and all(t.gpu.contains(k) for k in keys):
            return True
        if t.host is None:
            return t.flush(self.options.flush_timeout_s)
        deadline = time.monotonic() + self.options.flush_timeout_s
        pause = 0.0005
        while not all(t.host.contains(k) for k in keys):
            if time.monotonic() > deadline or t.host.stats.dropped_writes and not t.host.contains(keys[-1]):
                return t.flush(max(0.0, deadline - time.monotonic()))
            time.sleep(pause)
            pause = min(pause * 2, 0.01)
        return True

    def _validate(self, r: Any) -> dict:
        if not isinstance(r, dict):
            raise InvalidParameterError(f"a request must be a dict, got {type(r).__name__}")
        bad = set(r) - _REQUEST_KEYS
        if bad:
            raise InvalidParameterError(f"unknown request fields {sorted(bad)}")
        out = {"request_id": r.get("request_id") or os.urandom(8).hex(), "max_tokens": r.get("max_tokens", 64),
               "temperature": r.get("temperature", 0.0), "top_p": r.get("top_p", 1.0), "seed": r.get("seed"),
               "stop_ids": r.get("stop_ids"), "tenant": r.get("tenant", "default"),
               "scope": r.get("scope", "private"), "segment_id": r.get("segment_id"), "mode": r.get("mode")}
        ids = r.get("token_ids")
        if not isinstance(ids, (list, tuple)) or not all(_is_int(t) for t in ids):
            raise InvalidParameterError("token_ids must be a list of ints")
        out["token_ids"] = list(ids)
        if not isinstance(out["request_id"], str) or len(out["request_id"]) > 256:
            raise InvalidParameterError("request_id must be a string of at most 256 characters")
        if not _is_int(out["max_tokens"]) or not 0 <= out["max_tokens"] <= MAX_NEW_TOKENS:
            raise InvalidParameterError(f"max_tokens must be an int in [0, {MAX_NEW_TOKENS}]")
        if not _is_num(out["temperature"]) or out["temperature"] < 0:
            raise InvalidParameterError("temperature must be a finite number >= 0")
        if not _is_num(out["top_p"]) or not 0 < out["top_p"] <= 1:
            raise InvalidParameterError("top_p must be in (0, 1]")
        if out["seed"] is not None and not _is_int(out["seed"]):
            raise InvalidParameterError("seed must be an int or None")
        s = out["stop_ids"]
        if s is not None and (not isinstance(s, (list, tuple)) or len(s) > 1024 or not all(_is_int(t) for t in s)):
            raise InvalidParameterError("stop_ids must be None or a list of at most 1024 ints")
        if not isinstance(out["tenant"], str) or not out["tenant"] or len(out["tenant"]) > 256:
            raise InvalidParameterError("tenant must be a non-empty string of at most 256 characters")
        if out["scope"] not in SCOPES:
            raise InvalidParameterError(f"scope must be one of {SCOPES}")
        if out["segment_id"] is not None and (not isinstance(out["segment_id"], str)
                                              or not _SEGMENT_ID.match(out["segment_id"])):
            raise InvalidParameterError("segment_id must be 1-128 characters of [A-Za-z0-9_.-]")
        if out["mode"] is not None and out["mode"] not in MODES:
            raise InvalidParameterError(f"mode must be one of {MODES}")
        locs = r.get("donor_locations") or {}
        if not isinstance(locs, dict) or len(locs) > 1024 or not all(
                isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in locs.items()):
            raise InvalidParameterError("donor_locations must map segment ids to worker ids (or None)")
        out["donor_locations"] = dict(locs)
        out["plan"] = _plan_from_wire(r.get("plan"), len(ids))
        return out

    # ---- stats and lifecycle ------------------------------------------------------------------
    _RESETTABLE = {"reuse", "redis_url", "redis_prefix", "redis_ttl_s", "host_bytes", "gpu_bytes"}

    def reset(self, overrides: dict | None = None) -> None:
        """Drop every cached segment (new, empty tiers) and zero the counters, optionally with new
        tier settings or reuse settings (benchmarks compare configurations on the same workers)."""
        overrides = dict(overrides or {})
        bad = set(overrides) - self._RESETTABLE
        if bad:
            raise InvalidParameterError(f"reset cannot change {sorted(bad)}")
        with self._lock:
            if self._batcher is not None:
                self._batcher.wait_idle()
            opts = replace(self.options, **overrides)
            settings = ReuseSettings(**opts.reuse) if opts.reuse else ReuseSettings()
            settings.validate(self.runner.spec.num_layers)
            self.tiers.close()
            self.options = opts
            self.tiers = self._make_tiers(opts)
            self.segments = TieredSegmentStore(self.tiers, self.fingerprint, opts.block_tokens)
            self.engine.settings = settings
            self.transfer = {}
            self.counters = {k: 0 for k in self.counters}

    def stats(self) -> dict:
        t = self.tiers
        used = {}
        if t.gpu is not None:
            used["gpu"] = t.gpu.used_bytes
        if t.host is not None:
            used["host"] = t.host.used_bytes
        return {"worker_id": self.worker_id, "tiers": t.stats(), "tier_used_bytes": used,
                "transfer": {k: v.as_dict() for k, v in self.transfer.items()}, "counters": dict(self.counters),
                "bad_segments": self.segments.bad_segments,
                "batching": self._batcher.snapshot() if self._batcher is not None else None}

    def clear_shared_tier(self) -> int:
        """Delete this cluster's keys from Redis (tests; a model upgrade)."""
        return self.tiers.redis.clear() if self.tiers.redis is not None else 0

    def shutdown(self) -> None:
        if self._batcher is not None:
            self._batcher.stop()
        if self._tcp is not None:
            self._tcp.stop()
            self._tcp = None
        self.tiers.close()


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _plan_from_wire(p: Any, n_tokens: int) -> ReusePlan | None:
    if p is None:
        return None
    if not isinstance(p, dict) or set(p) - {"n_tokens", "prefix_len", "source", "spans"}:
        raise InvalidParameterError("plan must be a dict with n_tokens, prefix_len, source, spans")
    spans = p.get("spans", [])
    if p.get("n_tokens") != n_tokens or not isinstance(spans, list) or len(spans) > n_tokens:
        raise InvalidParameterError(f"plan is for {p.get('n_tokens')!r} tokens, the prompt has {n_tokens}")
    out = []
    for s in spans:
        if (not isinstance(s, (list, tuple)) or len(s) != 4 or not _is_int(s[0]) or not isinstance(s[1], str)
                or not _SEGMENT_ID.match(s[1]) or not _is_int(s[2]) or not _is_int(s[3])):
            raise InvalidParameterError("plan spans must be [new_start, donor_id, donor_start, length]")
        out.append(ReuseSpan(s[0], s[1], s[2], s[3]))
    prefix = p.get("prefix_len", 0)
    source = p.get("source", "semantic")
    if not _is_int(prefix) or not isinstance(source, str) or len(source) > 32:
        raise InvalidParameterError("plan prefix_len must be an int and source a short string")
    try:
        return ReusePlan(n_tokens, out, prefix_len=prefix, source=source)
    except ValueError as e:
        raise InvalidParameterError(f"invalid plan: {e}") from None


# Ray is imported only here, where the actor is defined. A worker process on a GPU machine without
# Ray still imports this module: WorkerActor is then None.
ACTOR_OPTIONS = {"max_concurrency": 4, "max_restarts": 1, "max_task_retries": 0}
try:
    import ray as _ray
except ImportError:  # pragma: no cover - the GPU benchmark machines have no Ray
    WorkerActor = None
else:
    WorkerActor = _ray.remote(Worker)
