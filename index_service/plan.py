"""The reuse plan: for each position of a new prompt, which donor token's KV to reuse, or compute."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ReuseSpan:
    """``length`` new tokens from ``new_start`` reuse donor ``donor_id`` tokens from ``donor_start``."""

    new_start: int
    donor_id: str
    donor_start: int
    length: int

    @property
    def new_end(self) -> int:
        return self.new_start + self.length


@dataclass
class ReusePlan:
    n_tokens: int
    spans: list[ReuseSpan] = field(default_factory=list)  # sorted by new_start, non-overlapping
    prefix_len: int = 0  # leading tokens that are an exact prefix hit (same positions, same history)
    source: str = "miss"  # "prefix" | "semantic" | "miss"

    def __post_init__(self) -> None:
        self.spans.sort(key=lambda s: s.new_start)
        end = 0
        for s in self.spans:
            if s.length <= 0 or s.new_start < end or s.new_end > self.n_tokens or s.donor_start < 0:
                raise ValueError(f"invalid reuse span {s} in a plan of {self.n_tokens} tokens")
            end = s.new_end
        if not 0 <= self.prefix_len <= self.n_tokens:
            raise ValueError(f"prefix_len {self.prefix_len} outside [0, {self.n_tokens}]")

    @property
    def donor_ids(self) -> list[str]:
        return list(dict.fromkeys(s.donor_id for s in self.spans))

    @property
    def reused_tokens(self) -> int:
        return sum(s.length for s in self.spans)

    @property
    def reuse_rate(self) -> float:
        return self.reused_tokens / self.n_tokens if self.n_tokens else 0.0

    def donor_arrays(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(donor index per position or -1, donor position per position or -1, donor ids)."""
        ids = self.donor_ids
        slot = {d: i for i, d in enumerate(ids)}
        donor = np.full(self.n_tokens, -1, dtype=np.int64)
        pos = np.full(self.n_tokens, -1, dtype=np.int64)
        for s in self.spans:
            donor[s.new_start:s.new_end] = slot[s.donor_id]
            pos[s.new_start:s.new_end] = np.arange(s.donor_start, s.donor_start + s.length)
        return donor, pos, ids

    @classmethod
    def empty(cls, n_tokens: int) -> "ReusePlan":
        return cls(n_tokens=n_tokens)
