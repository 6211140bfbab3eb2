"""Qdrant as the system of record for segment vectors: one point per stored segment.

Embedded (a folder, or ":memory:") by default, a Qdrant server when a URL is given. A store that
cannot be opened or a call that fails logs one warning and answers as a miss (no candidates,
nothing written); it never raises to the caller, because a miss only costs recomputation. The
open is retried at most every retry_s seconds.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

PUBLIC = "public"
PRIVATE = "private"
SCOPES = (PRIVATE, PUBLIC)
FILTER_FIELDS = ("fingerprint", "tenant", "scope", "salt", "segment_id")
_NS = uuid.UUID("5f0c7f8e-7a51-4c8e-9d2a-6b1f4c3e2d10")  # point id = uuid5(_NS, segment id)


def default_path() -> str:
    """Embedded storage under the user's cache dir."""
    import platformdirs

    return str(Path(platformdirs.user_cache_dir("kvcluster")) / "index" / "qdrant")


def point_id(segment_id: str) -> str:
    """Qdrant ids are ints or UUIDs; segment ids are free strings."""
    return str(uuid.uuid5(_NS, segment_id))


@dataclass(frozen=True)
class SegmentMeta:
    segment_id: str
    fingerprint: str
    tenant: str
    scope: str  # "private" | "public"
    salt: str  # hash of the cache_salt, "" for none
    n_tokens: int
    created: float

    def payload(self, last_used: float | None = None) -> dict:
        return {"segment_id": self.segment_id, "fingerprint": self.fingerprint, "tenant": self.tenant,
                "scope": self.scope, "salt": self.salt, "n_tokens": self.n_tokens,
                "created": self.created, "last_used": self.created if last_used is None else last_used}


class QdrantStore:
    def __init__(self, url: str | None = None, path: str | None = None, collection: str = "kvcluster_segments",
                 dim: int = 384, timeout_s: int = 5, retry_s: float = 30.0, touch_every_s: float = 30.0) -> None:
        self.url = url
        self.path = path if (path is not None or url is not None) else default_path()
        self.collection = collection
        self.dim = dim
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.touch_every_s = touch_every_s
        self._client = None
        self._failed_at: float | None = None
        self._warned = False
        self._lock = threading.RLock()
        self._touched: dict[str, float] = {}  # segment id -> last use, written in batches
        self._touch_flushed = time.monotonic()
        self._open()

    # -- connection ------------------------------------------------------------------------------
    @property
    def local(self) -> bool:
        return self.url is None

    @property
    def healthy(self) -> bool:
        return self._client is not None

    def _open(self) -> bool:
        from qdrant_client import QdrantClient

        try:
            if self.url is not None:
                client = QdrantClient(url=self.url, timeout=self.timeout_s, check_compatibility=False)
            elif self.path == ":memory:":
                client = QdrantClient(location=":memory:")
            else:
                Path(self.path).mkdir(parents=True, exist_ok=True)
                client = QdrantClient(path=self.path)
            self._ensure_collection(client)
        except Exception as e:  # noqa: BLE001 - any failure to open is a miss, not a crash
            self._fail("open", e)
            return False
        self._client, self._failed_at, self._warned = client, None, False
        return True

    def _ensure_collection(self, client) -> None:
        from qdrant_client import models

        if not client.collection_exists(self.collection):
            client.create_collection(self.collection, vectors_config=models.VectorParams(
                size=self.dim, distance=models.Distance.COSINE))
            if self.url is not None:  # embedded mode scans and ignores payload indexes (it warns)
                for f in FILTER_FIELDS:
                    client.create_payload_index(self.collection, f, field_schema=models.PayloadSchemaType.KEYWORD)

    def _fail(self, what: str, e: Exception) -> None:
        if not self._warned:
            where = self.url or self.path
            log.warning("Qdrant %s failed at %s (%s: %s); semantic lookups are misses until it recovers",
                        what, where, type(e).__name__, e)
            self._warned = True
        self._failed_at = time.monotonic()
        client, self._client = self._client, None
        if client is not None and self.url is None:
            try:  # release the embedded folder lock so a retry can reopen it
                client.close()
            except Exception:  # noqa: BLE001
                pass

    def _ready(self):
        if self._client is None and (self._failed_at is None or time.monotonic() - self._failed_at >= self.retry_s):
            self._open()
        return self._client

    def ensure(self) -> bool:
        """True when the store is open (reopening it if a retry is due)."""
        with self._lock:
            return self._ready() is not None

    def _call(self, what: str, fn, default):
        with self._lock:
            client = self._ready()
            if client is None:
                return default
            try:
                return fn(client)
            except Exception as e:  # noqa: BLE001
                self._fail(what, e)
                return default

    def close(self) -> None:
        with self._lock:
            self.flush_touches()
            if self._client is not None:
                try:
                    self._client.close()
                except Exception:  # noqa: BLE001
                    pass
                self._client = None

    # -- points ----------------------------------------------------------------------------------
    def upsert(self, metas: Sequence[SegmentMeta], vectors: np.ndarray) -> bool:
        """Store (or replace) points; False when the store is unavailable."""
        from qdrant_client import models

        vectors = np.asarray(vectors, dtype=np.float32).reshape(len(metas), self.dim)
        points = [models.PointStruct(id=point_id(m.segment_id), vector=v.tolist(), payload=m.payload())
                  for m, v in zip(metas, vectors)]
        if not points:
            return True
        return self._call("upsert", lambda c: c.upsert(self.collection, points=points, wait=True) and True, False)

    def delete(self, segment_ids: Sequence[str]) -> bool:
        from qdrant_client import models

        ids = [point_id(s) for s in segment_ids]
        with self._lock:
            for s in segment_ids:
                self._touched.pop(s, None)
        if not ids:
            return True
        return self._call("delete", lambda c: c.delete(self.collection, models.PointIdsList(points=ids), wait=True)
                          and True, False)

    def search(self, vector: np.ndarray, fingerprint: str, tenant: str, salt: str = "", top_k: int = 3,
               min_score: float | None = None) -> list[tuple[str, float]]:
        """Exact top-k visible segments: this model and salt, and the tenant's own or public."""
        from qdrant_client import models

        flt = visibility_filter(fingerprint, tenant, salt)
        q = np.asarray(vector, dtype=np.float32).tolist()
        params = None if self.local else models.SearchParams(exact=True)  # embedded mode is always exact

        def run(c):
            res = c.query_points(self.collection, query=q, query_filter=flt, limit=top_k, with_payload=["segment_id"],
                                 score_threshold=min_score, search_params=params)
            return [(p.payload["segment_id"], float(p.score)) for p in res.points]

        return self._call("search", run, [])

    def scroll(self, batch: int = 2048) -> Iterator[tuple[dict, np.ndarray]]:
        """Every (payload, vector); empty when the store is unavailable. Used to rebuild caches."""
        offset = None
        while True:
            page = self._call("scroll", lambda c: c.scroll(self.collection, limit=batch, offset=offset,
                                                           with_payload=True, with_vectors=True), None)
            if page is None:
                return
            points, offset = page
            for p in points:
                yield p.payload, np.asarray(p.vector, dtype=np.float32)
            if offset is None:
                return

    def count(self) -> int:
        return self._call("count", lambda c: c.count(self.collection, exact=True).count, 0)

    def touch(self, segment_ids: Sequence[str]) -> None:
        """Note a use; last_used is written in batches every touch_every_s (one write per period)."""
        now = time.time()
        with self._lock:
            for s in segment_ids:
                self._touched[s] = now
            if time.monotonic() - self._touch_flushed >= self.touch_every_s:
                self.flush_touches()

    def flush_touches(self) -> None:
        with self._lock:
            touched, self._touched = self._touched, {}
            self._touch_flushed = time.monotonic()
            if not touched:
                return
            # only points that exist: a segment with no point (Qdrant refused it while it was down; it
            # serves exact prefixes only) would fail set_payload and take the whole store down
            when = {point_id(s): t for s, t in touched.items()}
            have = self._call("retrieve", lambda c: [str(p.id) for p in c.retrieve(
                self.collection, ids=list(when), with_payload=False, with_vectors=False)], [])
            for pid in have:
                self._call("set_payload", lambda c: c.set_payload(self.collection, {"last_used": when[pid]},
                                                                  points=[pid]), None)


def visibility_filter(fingerprint: str, tenant: str, salt: str = ""):
    from qdrant_client import models

    def eq(key, value):
        return models.FieldCondition(key=key, match=models.MatchValue(value=value))

    return models.Filter(must=[eq("fingerprint", fingerprint), eq("salt", salt)],
                         should=[eq("tenant", tenant), eq("scope", PUBLIC)])
