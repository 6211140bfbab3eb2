"""Exact-prefix index of hash-chained token blocks (as vLLM's prefix cache).

Block i's hash is xxh3_64(tokens of block i, seed = hash of block i-1), so equal hashes mean equal
token histories: a hit is exact, its KV needs no correction. The chain's root is seeded by
(model fingerprint, owner, cache_salt), owner being the tenant or "public": two tenants never
share an entry unless the segment was stored public, and a different salt never matches.
The final partial block is kept as raw tokens under its parent hash and compared token by token,
so a prompt that repeats a stored one exactly (any length) is a full hit.
"""
from __future__ import annotations

import threading

import numpy as np
import xxhash

from index_service.align import as_tokens

PUBLIC_OWNER = "public"


def owner_key(tenant: str, public: bool) -> str:
    # "t:" keeps a tenant named "public" apart from the public scope
    return PUBLIC_OWNER if public else "t:" + tenant


def root_hash(fingerprint: str, owner: str, cache_salt: str | None) -> int:
    salt = "" if cache_salt is None else "s:" + cache_salt
    return xxhash.xxh3_64_intdigest("\x00".join((fingerprint, owner, salt)).encode())


def chain(tokens: np.ndarray, root: int, block: int) -> list[int]:
    """Hash of every full block, each covering all tokens before it."""
    data = tokens.astype("<i8", copy=False).tobytes()
    step = 8 * block
    out, h = [], root
    for at in range(0, (len(tokens) // block) * step, step):
        h = xxhash.xxh3_64_intdigest(data[at:at + step], seed=h)
        out.append(h)
    return out


class PrefixIndex:
    def __init__(self, block_tokens: int = 64) -> None:
        if block_tokens < 1:
            raise ValueError("block_tokens must be >= 1")
        self.block = block_tokens
        self._blocks: dict[int, list[str]] = {}  # block hash -> segments holding it, oldest first
        self._tails: dict[int, dict[str, np.ndarray]] = {}  # parent hash -> {segment: partial block}
        self._segs: dict[str, tuple[list[int], int]] = {}  # segment -> (its block hashes, tail parent)
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self._segs)

    def __contains__(self, segment_id: str) -> bool:
        return segment_id in self._segs

    def add(self, segment_id: str, tokens, tenant: str, fingerprint: str, public: bool = False,
            cache_salt: str | None = None) -> None:
        toks = as_tokens(tokens)
        if not toks.size:
            raise ValueError("cannot index an empty segment")
        hashes = chain(toks, root_hash(fingerprint, owner_key(tenant, public), cache_salt), self.block)
        parent = hashes[-1] if hashes else root_hash(fingerprint, owner_key(tenant, public), cache_salt)
        tail = toks[len(hashes) * self.block:]
        with self._lock:
            self.remove(segment_id)
            for h in hashes:
                self._blocks.setdefault(h, []).append(segment_id)
            if tail.size:
                self._tails.setdefault(parent, {})[segment_id] = tail.copy()
            self._segs[segment_id] = (hashes, parent)

    def remove(self, segment_id: str) -> None:
        with self._lock:
            entry = self._segs.pop(segment_id, None)
            if entry is None:
                return
            hashes, parent = entry
            for h in hashes:
                owners = self._blocks[h]
                owners.remove(segment_id)
                if not owners:
                    del self._blocks[h]
            tails = self._tails.get(parent)
            if tails is not None and tails.pop(segment_id, None) is not None and not tails:
                del self._tails[parent]

    def longest_prefix(self, tokens, tenant: str, fingerprint: str,
                       cache_salt: str | None = None) -> tuple[str | None, int]:
        """(segment, n) for the longest stored exact prefix visible to the tenant; (None, 0) if none."""
        toks = as_tokens(tokens)
        best: tuple[str | None, int] = (None, 0)
        for public in (False, True):  # the tenant's own chain, then the public one
            found = self._walk(toks, root_hash(fingerprint, owner_key(tenant, public), cache_salt))
            if found[1] > best[1]:
                best = found
        return best

    def _walk(self, toks: np.ndarray, root: int) -> tuple[str | None, int]:
        hashes = chain(toks, root, self.block)
        with self._lock:
            seg, n, parent = None, 0, root
            for i, h in enumerate(hashes):
                owners = self._blocks.get(h)
                if not owners:
                    break
                seg, n, parent = owners[0], (i + 1) * self.block, h
            rest = toks[n:n + self.block]
            return self._best_tail(seg, n, parent, rest)

    def _best_tail(self, seg, n, parent, rest) -> tuple[str | None, int]:
        """Extend a full-block match by the longest common run with a stored partial block."""
        best_sid, best_common = seg, 0
        for sid, tail in self._tails.get(parent, {}).items():
            m = min(len(tail), len(rest))
            diff = np.flatnonzero(tail[:m] != rest[:m])
            common = int(diff[0]) if diff.size else m
            if common > best_common:
                best_sid, best_common = sid, common
        return (best_sid, n + best_common) if best_sid is not None else (None, 0)
