"""The donor token ids and metadata of every indexed segment, in sqlite next to the Qdrant data.

Alignment needs a donor's token ids, which Qdrant does not hold; keeping them in a small sqlite
file beside the Qdrant folder makes a restart with the same path come back consistent (tokens,
prefix index and vectors rebuilt from the same two files). Tokens stay on disk and are read only
for the few donors a lookup aligns against.
"""
from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from index_service.qdrant_store import SegmentMeta

_SCHEMA = """CREATE TABLE IF NOT EXISTS segments (
    segment_id TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, tenant TEXT NOT NULL, scope TEXT NOT NULL,
    salt TEXT NOT NULL, n_tokens INTEGER NOT NULL, created REAL NOT NULL, prefix_salt TEXT,
    tokens BLOB NOT NULL)"""
_COLS = "segment_id, fingerprint, tenant, scope, salt, n_tokens, created"


class SegmentTable:
    def __init__(self, path: str = ":memory:") -> None:
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL" if path != ":memory:" else "PRAGMA journal_mode=MEMORY")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_SCHEMA)
        self._lock = threading.Lock()

    def put(self, meta: SegmentMeta, tokens: np.ndarray, cache_salt: str | None) -> None:
        self.put_many([(meta, tokens, cache_salt)])

    def put_many(self, rows: Sequence[tuple[SegmentMeta, np.ndarray, str | None]]) -> None:
        data = [(m.segment_id, m.fingerprint, m.tenant, m.scope, m.salt, m.n_tokens, m.created, salt,
                 np.asarray(t, dtype="<i8").tobytes()) for m, t, salt in rows]
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR REPLACE INTO segments VALUES (?,?,?,?,?,?,?,?,?)", data)
            self._db.execute("COMMIT")

    def delete(self, segment_ids: Sequence[str]) -> None:
        with self._lock:
            self._db.executemany("DELETE FROM segments WHERE segment_id = ?", [(s,) for s in segment_ids])

    def tokens(self, segment_ids: Sequence[str]) -> dict[str, np.ndarray]:
        if not segment_ids:
            return {}
        marks = ",".join("?" * len(segment_ids))
        with self._lock:
            rows = self._db.execute(f"SELECT segment_id, tokens FROM segments WHERE segment_id IN ({marks})",
                                    list(segment_ids)).fetchall()
        return {sid: np.frombuffer(blob, dtype="<i8") for sid, blob in rows}

    def meta(self, segment_id: str) -> SegmentMeta | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_COLS} FROM segments WHERE segment_id = ?", (segment_id,)).fetchone()
        return SegmentMeta(*row) if row else None

    def ids(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT segment_id FROM segments")}

    def scan(self) -> Iterator[tuple[SegmentMeta, str | None, np.ndarray]]:
        """Every (meta, cache_salt, tokens): rebuilds the prefix index on start."""
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLS}, prefix_salt, tokens FROM segments").fetchall()
        for r in rows:
            yield SegmentMeta(*r[:7]), r[7], np.frombuffer(r[8], dtype="<i8")

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM segments").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
