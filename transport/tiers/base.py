"""What every tier shares: the interface, the stats counters, and byte-budgeted LRU bookkeeping."""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Generic, Iterator, Protocol, Sequence, TypeVar

from transport.block import KVBlock


@dataclass
class TierStats:
    hits: int = 0
    misses: int = 0
    bytes_in: int = 0       # bytes written into the tier
    bytes_out: int = 0      # bytes served from the tier
    evictions: int = 0      # entries pushed out by the byte budget (not explicit evict())
    dropped_writes: int = 0  # writes refused: over budget, queue full, or the tier is down
    corrupt: int = 0        # blocks that failed verification (discarded, evicted, served as a miss)
    errors: int = 0         # backend failures (e.g. Redis connection errors)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class Tier(Protocol):
    name: str
    stats: TierStats

    def get_many(self, keys: Sequence[str]) -> list[KVBlock | None]: ...
    def put_many(self, items: Sequence[tuple[str, KVBlock]]) -> None: ...
    def contains(self, key: str) -> bool: ...
    def evict(self, key: str) -> bool: ...


V = TypeVar("V")


class LRUBytes(Generic[V]):
    """An OrderedDict with a byte budget: least recently used entries go first. Thread-safe."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.used = 0
        self._d: OrderedDict[str, tuple[V, int]] = OrderedDict()
        self.lock = threading.RLock()

    def get(self, key: str) -> V | None:
        with self.lock:
            e = self._d.get(key)
            if e is None:
                return None
            self._d.move_to_end(key)
            return e[0]

    def get_many(self, keys: Sequence[str]) -> list[V | None]:
        """``get`` of each key under one lock (a read of hundreds of blocks)."""
        d, out = self._d, []
        with self.lock:
            for k in keys:
                e = d.get(k)
                if e is not None:
                    d.move_to_end(k)
                out.append(None if e is None else e[0])
        return out

    def put(self, key: str, value: V, nbytes: int) -> list[str] | None:
        """Insert; returns the keys evicted to make room, or None if it can never fit."""
        if nbytes > self.budget:
            return None
        with self.lock:
            self.pop(key)
            evicted = []
            while self.used + nbytes > self.budget and self._d:
                evicted.append(self.pop_oldest())
            self._d[key] = (value, nbytes)
            self.used += nbytes
            return evicted

    def pop(self, key: str) -> V | None:
        with self.lock:
            e = self._d.pop(key, None)
            if e is None:
                return None
            self.used -= e[1]
            self.dropped(key, e[0])
            return e[0]

    def pop_oldest(self) -> str | None:
        """Evict the least recently used entry; its key (None if empty)."""
        with self.lock:
            if not self._d:
                return None
            k, (v, n) = self._d.popitem(last=False)
            self.used -= n
            self.dropped(k, v)
            return k

    def dropped(self, key: str, value: V) -> None:
        """Called, under the lock, for every entry that leaves (popped or evicted)."""

    def __contains__(self, key: str) -> bool:
        return key in self._d

    def __len__(self) -> int:
        return len(self._d)

    def keys(self) -> Iterator[str]:
        return iter(list(self._d))
