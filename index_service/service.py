"""IndexService: exact prefix + semantic donors -> token alignment -> ReusePlan.

Qdrant holds the vectors (system of record), a sqlite sidecar in the same folder holds the donor
token ids, the prefix index and the vector cache are in-process views rebuilt from those two on
start. A segment gets a vector in the cache only once Qdrant accepted it, so the fast path never
knows more than the record. When Qdrant is down, exact-prefix hits still work (they need only the
sidecar); semantic lookups are misses.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xxhash

from index_service.align import align, as_tokens, source_of
from index_service.embedder import Embedder
from index_service.plan import ReusePlan
from index_service.prefix_index import PrefixIndex, owner_key
from index_service.qdrant_store import PUBLIC, SCOPES, QdrantStore, SegmentMeta, default_path
from index_service.segment_table import SegmentTable
from index_service.vector_cache import VectorCache

log = logging.getLogger(__name__)
SIDECAR = "kvcluster_segments.sqlite"
MAX_TOKENS = 1 << 20


@dataclass
class LookupTimings:
    """Per-stage wall time of one lookup, in milliseconds, and the semantic candidates seen."""

    prefix_ms: float = 0.0
    embed_ms: float = 0.0
    search_ms: float = 0.0
    fetch_ms: float = 0.0
    align_ms: float = 0.0
    total_ms: float = 0.0
    candidates: list[tuple[str, float]] = field(default_factory=list)


def salt_key(cache_salt: str | None) -> str:
    """What Qdrant stores for a salt: a hash, never the salt itself."""
    return "" if cache_salt is None else xxhash.xxh3_128_hexdigest(cache_salt.encode())


class IndexService:
    def __init__(self, qdrant_url: str | None = None, qdrant_path: str | None = None,
                 collection: str = "kvcluster_segments", top_k: int = 3, min_score: float = 0.3,
                 block_tokens: int = 64, min_run: int = 4, embedder: Embedder | None = None,
                 engine: str = "auto", sidecar_path: str | None = None) -> None:
        if engine not in ("auto", "cache", "qdrant"):
            raise ValueError(f"engine must be auto, cache or qdrant, got {engine!r}")
        self.top_k, self.min_score, self.min_run = top_k, min_score, min_run
        self.embedder = embedder or Embedder()
        self.engine = ("qdrant" if qdrant_url else "cache") if engine == "auto" else engine
        path = qdrant_path if (qdrant_path is not None or qdrant_url is not None) else default_path()
        self.store = QdrantStore(url=qdrant_url, path=path, collection=collection, dim=self.embedder.dim)
        self.table = _open_table(sidecar_path or _sidecar_for(qdrant_url, path, collection))
        self.prefix = PrefixIndex(block_tokens)
        self.cache = VectorCache(self.embedder.dim)
        self._synced = False
        self._lock = threading.RLock()
        for meta, salt, toks in self.table.scan():
            self.prefix.add(meta.segment_id, toks, meta.tenant, meta.fingerprint, meta.scope == PUBLIC, salt)
        self._sync()

    # -- writes ----------------------------------------------------------------------------------
    def add(self, segment_id: str, token_ids: Sequence[int] | np.ndarray, text: str, tenant: str,
            scope: str, fingerprint: str, cache_salt: str | None = None,
            vector: np.ndarray | None = None) -> bool:
        """Index a stored segment (replacing one with the same id). True when it is also
        searchable semantically, False when Qdrant refused it (it still serves exact prefixes).
        vector: a precomputed embedding of text, to skip the embedder."""
        toks = _check_tokens(token_ids)
        _check_str(segment_id=segment_id, tenant=tenant, fingerprint=fingerprint)
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        if cache_salt is not None and not isinstance(cache_salt, str):
            raise TypeError("cache_salt must be str or None")
        vec = self.embedder.embed_one(text) if vector is None else np.asarray(vector, dtype=np.float32)
        if vec.shape != (self.embedder.dim,):
            raise ValueError(f"vector must have shape ({self.embedder.dim},), got {vec.shape}")
        meta = SegmentMeta(segment_id, fingerprint, tenant, scope, salt_key(cache_salt), len(toks), time.time())
        return self._add_many([(meta, toks, cache_salt, vec)])

    def add_many(self, items: Iterable[dict]) -> int:
        """Bulk add: dicts of add()'s arguments (vector required). Returns how many are searchable."""
        rows = []
        for it in items:
            toks = _check_tokens(it["token_ids"])
            _check_str(segment_id=it["segment_id"], tenant=it["tenant"], fingerprint=it["fingerprint"])
            if it["scope"] not in SCOPES:
                raise ValueError(f"scope must be one of {SCOPES}, got {it['scope']!r}")
            meta = SegmentMeta(it["segment_id"], it["fingerprint"], it["tenant"], it["scope"],
                               salt_key(it.get("cache_salt")), len(toks), time.time())
            rows.append((meta, toks, it.get("cache_salt"), np.asarray(it["vector"], dtype=np.float32)))
        return self._add_many(rows) * len(rows) if rows else 0

    def _add_many(self, rows) -> bool:
        with self._lock:
            for meta, *_ in rows:
                if meta.segment_id in self.prefix:
                    self.remove(meta.segment_id)
            # sidecar first: a crash before Qdrant leaves a prefix-only segment, never a dangling point
            self.table.put_many([(m, t, s) for m, t, s, _ in rows])
            for m, t, s, _ in rows:
                self.prefix.add(m.segment_id, t, m.tenant, m.fingerprint, m.scope == PUBLIC, s)
            ok = self.store.upsert([r[0] for r in rows], np.stack([r[3] for r in rows]))
            if ok and self._synced:
                for m, _, _, v in rows:
                    self.cache.add(m.segment_id, v, m.fingerprint, m.salt, owner_key(m.tenant, m.scope == PUBLIC))
            return ok

    def remove(self, segment_id: str) -> None:
        """Evict a segment from Qdrant, the prefix index and the sidecar together. A Qdrant point
        that could not be deleted now is dropped on the next start (it has no sidecar row)."""
        with self._lock:
            self.store.delete([segment_id])
            self.cache.remove(segment_id)
            self.prefix.remove(segment_id)
            self.table.delete([segment_id])

    def reconcile(self, existing_segment_ids: Iterable[str]) -> list[str]:
        """Drop every indexed segment whose KV the store no longer holds; returns the dropped ids."""
        keep = set(existing_segment_ids)
        with self._lock:
            gone = sorted(self.table.ids() - keep)
            for sid in gone:
                self.remove(sid)
        return gone

    def __len__(self) -> int:
        return len(self.prefix)

    def close(self) -> None:
        self.store.close()
        self.table.close()

    # -- reads -----------------------------------------------------------------------------------
    def lookup(self, tokens: Sequence[int] | np.ndarray, text: str | None, tenant: str, fingerprint: str,
               cache_salt: str | None = None, top_k: int | None = None) -> ReusePlan:
        return self.lookup_timed(tokens, text, tenant, fingerprint, cache_salt, top_k)[0]

    def lookup_timed(self, tokens: Sequence[int] | np.ndarray, text: str | None, tenant: str, fingerprint: str,
                     cache_salt: str | None = None, top_k: int | None = None) -> tuple[ReusePlan, LookupTimings]:
        """Best exact prefix + up to top_k semantic donors, aligned. Never raises for a store failure."""
        t0 = time.perf_counter()
        toks = _check_tokens(tokens)
        _check_str(tenant=tenant, fingerprint=fingerprint)
        if text is not None and not isinstance(text, str):
            raise TypeError(f"text must be str or None, got {type(text).__name__}")
        if cache_salt is not None and not isinstance(cache_salt, str):
            raise TypeError("cache_salt must be str or None")
        k = self.top_k if top_k is None else top_k
        if not isinstance(k, int) or not 0 <= k <= 64:
            raise ValueError(f"top_k must be an int in [0, 64], got {k!r}")
        tm = LookupTimings()

        seg, n = self.prefix.longest_prefix(toks, tenant, fingerprint, cache_salt)
        tm.prefix_ms = _ms(t0)
        donors = [seg] if seg else []
        if text and k and n < len(toks):  # a full prefix hit needs no search
            tm.candidates = self._semantic(text, tenant, fingerprint, cache_salt, k, tm)
            donors += [sid for sid, _ in tm.candidates if sid != seg]

        t = time.perf_counter()
        tokens_of = self.table.tokens(donors)
        tm.fetch_ms = _ms(t)
        t = time.perf_counter()
        plan = align(toks, [(d, tokens_of[d]) for d in donors if d in tokens_of], min_run=self.min_run)
        tm.align_ms = _ms(t)
        plan.source = source_of(plan)
        if plan.spans:
            self.store.touch(plan.donor_ids)
        tm.total_ms = _ms(t0)
        return plan, tm

    def _semantic(self, text, tenant, fingerprint, cache_salt, k, tm) -> list[tuple[str, float]]:
        t = time.perf_counter()
        vec = self.embedder.embed_one(text)
        tm.embed_ms = _ms(t)
        t = time.perf_counter()
        salt = salt_key(cache_salt)
        if self.engine == "qdrant":
            hits = self.store.search(vec, fingerprint, tenant, salt, k, self.min_score)
        else:
            if not self._synced:
                self._sync()
            keys = [(fingerprint, salt, owner_key(tenant, False)), (fingerprint, salt, owner_key(tenant, True))]
            hits = self.cache.search(vec, keys, k, self.min_score)
        tm.search_ms = _ms(t)
        return hits

    def _sync(self) -> None:
        """Fill the vector cache from Qdrant and drop points that have no sidecar row (left by a
        crash or a delete that failed while Qdrant was down)."""
        if self.engine != "cache" or not self.store.ensure():
            return
        with self._lock:
            known, dangling = self.table.ids(), []
            for payload, vec in self.store.scroll():
                sid = payload.get("segment_id")
                if sid not in known:
                    dangling.append(sid)
                    continue
                self.cache.add(sid, vec, payload["fingerprint"], payload["salt"],
                               owner_key(payload["tenant"], payload["scope"] == PUBLIC))
            if dangling:
                log.info("dropping %d Qdrant points without donor tokens", len(dangling))
                self.store.delete([d for d in dangling if d])
            self._synced = self.store.healthy


def _sidecar_for(url: str | None, path: str, collection: str) -> str:
    if url is None and path == ":memory:":
        return ":memory:"
    if url is None:
        return str(Path(path) / SIDECAR)
    return str(Path(default_path()).parent / f"{collection}.sqlite")


def _open_table(path: str) -> SegmentTable:
    try:
        return SegmentTable(path)
    except Exception as e:  # noqa: BLE001 - an unusable folder degrades to memory, like the store
        log.warning("cannot open the segment table at %s (%s: %s); keeping it in memory", path, type(e).__name__, e)
        return SegmentTable(":memory:")


def _check_tokens(tokens) -> np.ndarray:
    toks = as_tokens(tokens)
    if not toks.size:
        raise ValueError("token_ids is empty")
    if toks.size > MAX_TOKENS:
        raise ValueError(f"{toks.size} tokens exceed the limit of {MAX_TOKENS}")
    return toks


def _check_str(**fields) -> None:
    for name, v in fields.items():
        if not isinstance(v, str):
            raise TypeError(f"{name} must be str, got {type(v).__name__}")
        if not v:
            raise ValueError(f"{name} is empty")


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3
