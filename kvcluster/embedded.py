"""The embedded cluster: the whole request path in one process.

One ReuseEngine (SmolLM2 by default) behind a lock, an in-memory segment store, and the
IndexService over an embedded Qdrant (``index.qdrant_path``, ``":memory:"``, or a folder under the
user cache dir) or a Qdrant server (``index.qdrant_url``). ``submit()`` runs:

    validate -> tokenize (chat template) -> lookup (exact prefix + semantic) -> generate with the
    reuse plan (bad or missing donor KV: recompute, logged) -> write the prompt's KV back as a
    segment (store + index, with tenant and scope) -> SubmitResult

The index never fails a request: a Qdrant that cannot be opened, or a lookup that raises, is a
miss plus one warning. Segments evicted from the store leave the index at once (``on_evict``), and
on start the index is reconciled with the (empty) store so that no lookup returns a donor whose
KV died with an earlier process.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any

from kvcluster.config import ConfigError, KVClusterConfig
from kvcluster.types import (ClusterConnectionError, PromptTooLongError, Request, SubmitResult,
                             as_config, validate_request)
from workers.errors import DonorKVError, DonorMissingError, InvalidParameterError

log = logging.getLogger(__name__)


class EmbeddedCluster:
    """In-process kvcluster. Thread-safe: requests run one at a time on the engine.

    ``runner``, ``tokenizer`` and ``embedder`` may be passed in to share one loaded model between
    several clusters (the demo and the tests run baselines side by side that way); a runner with a
    KVSharer strategy applied must not be shared with a cluster that expects none.
    """

    def __init__(self, config: Any = None, *, runner=None, tokenizer=None, embedder=None) -> None:
        self.config: KVClusterConfig = as_config(config)
        cfg = self.config
        from workers.engine import ReuseEngine, ReuseSettings
        from workers.model_loader import load_runner, load_tokenizer
        from workers.segments import InMemorySegmentStore

        t0 = time.perf_counter()
        if cfg.model.tensor_parallel_size > 1:
            log.warning("model.tensor_parallel_size=%d is ignored by the embedded engine (one process); "
                        "tensor-parallel workers run on Ray (cluster.address)", cfg.model.tensor_parallel_size)
        if runner is None:
            runner = load_runner(cfg.model.name, cfg.model.gguf_file, cfg.model.dtype, cfg.model.device)
            if cfg.model.kv_sharing_strategy:
                _apply_kv_sharing(runner, cfg.model.kv_sharing_strategy)
        self.runner = runner
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model.name, cfg.model.gguf_file)
        self.fingerprint: str = runner.fingerprint
        self.settings = ReuseSettings(mode=cfg.reuse.mode, recompute_ratio=cfg.reuse.recompute_ratio,
                                      check_layer=cfg.reuse.check_layer, decode_recompute=cfg.reuse.decode_recompute,
                                      epic_tokens=cfg.reuse.epic_tokens, suffix_tokens=cfg.reuse.suffix_tokens,
                                      min_recompute=cfg.reuse.min_recompute)
        try:
            self.settings.validate(runner.spec.num_layers)
        except InvalidParameterError as e:
            raise ConfigError(f"invalid kvcluster config: reuse.check_layer: {e}") from None
        budget = cfg.tiers.gpu_bytes if runner.device.type == "cuda" else cfg.tiers.host_bytes
        self.store = InMemorySegmentStore(max_bytes=budget, on_evict=self._on_evict)
        self._lock = threading.Lock()  # the engine, the store, and lookup + write-back with them
        self._tok_lock = threading.Lock()
        self._closed = False
        self.engine = ReuseEngine(runner, self.store, self.settings, max_context=cfg.model.max_context,
                                  static_tokens=cfg.model.cuda_graph_tokens)
        self.max_context: int = self.engine.max_context
        self.index = self._open_index(embedder)
        self._warm_up()
        self.stats = {"requests": 0, "prompt_tokens": 0, "reused_tokens": 0, "cached_tokens": 0,
                      "recomputed_tokens": 0, "fallbacks": 0, "prefix": 0, "semantic": 0, "miss": 0}
        log.info("embedded kvcluster ready in %.1f s: model %s (%s), reuse %s, index %s",
                 time.perf_counter() - t0, runner.name, self.fingerprint, self.settings.mode,
                 cfg.index.qdrant_url or cfg.index.qdrant_path or "default path")

    def _warm_up(self) -> None:
        """One tiny prefill + decode step, so that the first request's TTFT is not the framework's
        first-call cost (seconds on a CPU)."""
        try:
            self.engine.generate(self.tokenize("Hi")[:8], None, max_tokens=2, keep_segment=False)
        except Exception as e:  # noqa: BLE001 - a failed warm-up only costs the first request time
            log.warning("engine warm-up failed (%s: %s)", type(e).__name__, e)

    # ---- index ----------------------------------------------------------------------------------
    def _open_index(self, embedder):
        cfg = self.config
        if cfg.reuse.mode == "full":
            return None  # full compute reuses nothing: no index, no write-back
        try:
            from index_service.embedder import Embedder
            from index_service.service import IndexService
            embedder = _RecentEmbeddings(embedder if embedder is not None else Embedder())
            if cfg.reuse.mode != "prefix":
                embedder.warmup()  # load MiniLM now, not inside the first request's TTFT
            ix = IndexService(qdrant_url=cfg.index.qdrant_url, qdrant_path=cfg.index.qdrant_path,
                              collection=cfg.index.collection, top_k=cfg.index.top_k,
                              min_score=cfg.index.min_score, block_tokens=cfg.index.block_tokens,
                              min_run=cfg.reuse.min_run, embedder=embedder)
        except Exception as e:  # noqa: BLE001 - no index means misses, never a failed request
            log.warning("cannot open the index (%s: %s); every lookup is a miss", type(e).__name__, e)
            return None
        if cfg.index.qdrant_url is None:
            # Embedded: this process owns the index, and its store starts empty, so every indexed
            # segment is a dangling donor. (A shared Qdrant server is left alone: other workers'
            # segments live there; a dangling donor there costs a logged recompute.)
            try:
                dropped = ix.reconcile(self.store.ids())
                if dropped:
                    log.info("index reconciled with the segment store: dropped %d segments of an "
                             "earlier process", len(dropped))
            except Exception as e:  # noqa: BLE001
                log.warning("index reconcile failed (%s: %s)", type(e).__name__, e)
        return ix

    def _on_evict(self, segment_id: str) -> None:
        if self.index is not None:
            try:
                self.index.remove(segment_id)
            except Exception as e:  # noqa: BLE001
                log.warning("could not drop evicted segment %s from the index (%s)", segment_id, e)

    def _prepare(self, req: Request) -> None:
        """Embed the prompt before taking the engine lock (the lookup and the write-back reuse it)."""
        if self.index is not None and self.settings.mode not in ("full", "prefix"):
            try:
                self.index.embedder.embed_one(req.text)
            except Exception:  # noqa: BLE001 - the lookup will warn
                pass

    def _lookup(self, ids: list[int], req: Request):
        if self.index is None:
            return None
        top_k = 0 if self.settings.mode == "prefix" else None  # prefix caching alone: no search
        try:
            plan = self.index.lookup(ids, req.text, req.tenant, self.fingerprint, req.cache_salt, top_k=top_k)
        except Exception as e:  # noqa: BLE001
            log.warning("index lookup failed (%s: %s); treating it as a miss", type(e).__name__, e)
            return None
        return self._visible(plan, req)

    def _visible(self, plan, req: Request):
        """Defence in depth: every donor must be the tenant's own or public, with the same salt."""
        if plan is None or not plan.spans:
            return plan
        from index_service.service import salt_key
        salt = salt_key(req.cache_salt)
        for did in plan.donor_ids:
            seg = self.store.get(did)
            if seg is None:
                continue  # missing: the engine raises DonorMissingError and we recompute
            if (seg.tenant != req.tenant and seg.scope != "public") or seg.meta.get("salt", "") != salt:
                log.error("index returned segment %s that tenant %r may not read; dropping the plan",
                          did, req.tenant)
                return None
        return plan

    # ---- tokenizing -----------------------------------------------------------------------------
    def tokenize(self, prompt) -> list[int]:
        """Token ids of a prompt: chat messages (and a plain string, as one user message) through
        the model's chat template with the generation prompt; raw text when it has none."""
        tok = self.tokenizer
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        with self._tok_lock:  # a fast tokenizer is not re-entrant across threads
            if getattr(tok, "chat_template", None):
                text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
                return list(tok(text, add_special_tokens=False)["input_ids"])
            if isinstance(prompt, str):
                return list(tok(prompt)["input_ids"])
            text = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
            return list(tok(text)["input_ids"])

    def detokenize(self, token_ids: list[int]) -> str:
        with self._tok_lock:
            return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    # ---- requests -------------------------------------------------------------------------------
    def submit(self, prompt, max_tokens: int = 64, temperature: float = 0.0, tenant: str = "default",
               share: str = "private", cache_salt: str | None = None, top_p: float = 1.0,
               seed: int | None = None) -> SubmitResult:
        t0 = time.perf_counter()
        req = validate_request(prompt, max_tokens, temperature, tenant, share, cache_salt, top_p, seed,
                               config=self.config)
        return self.submit_request(req, t0)

    def submit_request(self, req: Request, t0: float | None = None) -> SubmitResult:
        t0 = time.perf_counter() if t0 is None else t0
        if self._closed:
            raise ClusterConnectionError("this embedded cluster is closed")
        ids = self.tokenize(req.prompt)
        if len(ids) + req.max_tokens > self.max_context:
            raise PromptTooLongError(f"{len(ids)} prompt tokens + {req.max_tokens} new tokens exceed the "
                                     f"context of {self.max_context} tokens")
        self._prepare(req)
        fallback = None
        with self._lock:
            if self._closed:
                raise ClusterConnectionError("this embedded cluster is closed")
            # looked up under the lock, so a request queued behind a similar one reuses its KV
            t_lookup = time.perf_counter()
            plan = self._lookup(ids, req)
            lookup_s = time.perf_counter() - t_lookup
            t_gen = time.perf_counter()
            try:
                res, seq = self._generate(ids, plan, req)
            except DonorKVError as e:
                fallback = f"{type(e).__name__}: {e}"
                log.warning("donor KV unusable (%s); recomputing the prompt in full", fallback)
                self._drop_dangling(plan, e)
                plan = None
                t_gen = time.perf_counter()
                res, seq = self._generate(ids, None, req)
            pre_s = t_gen - t0
            segment_id = self._write_back(ids, seq, plan, req)
        del seq
        if plan is None or not res.reused_tokens:
            source = "miss"
        else:  # prefix caching alone reuses only the exact prefix, whatever else the plan matched
            source = "prefix" if self.settings.mode == "prefix" else plan.source
        text = self.detokenize(res.token_ids)
        out = SubmitResult(text=text, token_ids=list(res.token_ids), prompt_tokens=res.prompt_tokens,
                           cached_tokens=res.cached_tokens, recomputed_tokens=res.recomputed_tokens,
                           source=source, ttft_s=pre_s + res.ttft_s, decode_s=res.decode_s,
                           finish_reason=res.finish_reason, segment_id=segment_id,
                           donor_ids=list(plan.donor_ids) if (plan is not None and res.reused_tokens) else [],
                           tenant=req.tenant, lookup_s=lookup_s, prefill_s=res.ttft_s,
                           decode_recomputed=res.decode_recomputed, flops_fraction=res.flops_fraction,
                           fallback=fallback)
        self._count(out)
        return out

    def _generate(self, ids, plan, req: Request):
        return self.engine.generate(ids, plan, max_tokens=req.max_tokens, temperature=req.temperature,
                                    top_p=req.top_p, seed=req.seed, keep_segment=self.index is not None)

    def _drop_dangling(self, plan, err: Exception) -> None:
        if plan is None or self.index is None or not isinstance(err, DonorMissingError):
            return
        for did in plan.donor_ids:
            if not self.store.contains(did):
                try:
                    self.index.remove(did)
                except Exception:  # noqa: BLE001
                    pass

    def _write_back(self, ids: list[int], seq, plan, req: Request) -> str | None:
        """Store the prompt's KV and index it; None when nothing new is worth storing."""
        if self.index is None:
            return None
        if plan is not None and plan.prefix_len >= len(ids):
            return None  # the whole prompt is already a stored prefix
        from index_service.service import salt_key
        sid = uuid.uuid4().hex
        seg = self.engine.segment_of(seq, sid, req.tenant, req.share)
        seg.meta["salt"] = salt_key(req.cache_salt)
        self.store.put(seg)
        try:
            self.index.add(sid, ids, req.text, req.tenant, req.share, self.fingerprint, req.cache_salt)
        except Exception as e:  # noqa: BLE001 - an unindexed segment is only wasted memory
            log.warning("could not index segment %s (%s: %s); dropping it", sid, type(e).__name__, e)
            self.store.evict(sid, notify=False)
            return None
        if not self.store.contains(sid):  # evicted while being indexed
            self._on_evict(sid)
            return None
        return sid

    def _count(self, r: SubmitResult) -> None:
        s = self.stats
        with self._lock:
            s["requests"] += 1
            s["prompt_tokens"] += r.prompt_tokens
            s["reused_tokens"] += r.reused_tokens
            s["cached_tokens"] += r.cached_tokens
            s["recomputed_tokens"] += r.recomputed_tokens
            s["fallbacks"] += r.fallback is not None
            s[r.source] = s.get(r.source, 0) + 1

    async def asubmit(self, prompt, **kwargs) -> SubmitResult:
        import asyncio
        return await asyncio.to_thread(self.submit, prompt, **kwargs)

    # ---- lifecycle ------------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self.index is not None:
                try:
                    self.index.close()
                except Exception as e:  # noqa: BLE001
                    log.warning("closing the index failed (%s)", e)

    def __enter__(self) -> "EmbeddedCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _RecentEmbeddings:
    """The embedder, remembering its last few prompts: a request embeds its text for the lookup
    and again for the write-back; the second one is free."""

    def __init__(self, embedder, size: int = 32) -> None:
        from collections import OrderedDict
        self.inner = embedder
        self.dim = embedder.dim
        self._size = size
        self._recent: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def embed_one(self, text: str):
        with self._lock:
            vec = self._recent.get(text)
            if vec is not None:
                self._recent.move_to_end(text)
                return vec
        vec = self.inner.embed_one(text)
        vec.setflags(write=False)
        with self._lock:
            self._recent[text] = vec
            while len(self._recent) > self._size:
                self._recent.popitem(last=False)
        return vec

    def embed(self, texts):
        return self.inner.embed(texts)

    def warmup(self) -> None:
        self.inner.warmup()

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def _apply_kv_sharing(runner, path: str) -> None:
    """Apply a KVSharer strategy file (``kvcluster layers search`` writes one) to the runner."""
    from workers.kvsharer import apply_strategy
    try:
        apply_strategy(runner, path)
    except ValueError as e:  # StrategyError: unreadable, malformed, or searched on another model
        raise ConfigError(f"invalid kvcluster config: model.kv_sharing_strategy: {e}") from None
