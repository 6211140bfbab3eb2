"""Which reused tokens to recompute: DHD (KVShare), CacheBlend and EPIC selection rules."""
from __future__ import annotations

import torch

from index_service.plan import ReusePlan


def v_deviation(v_fresh: torch.Tensor, v_reused: torch.Tensor) -> torch.Tensor:
    """L1 distance per token over heads and head_dim; inputs [Hkv, m, d] -> [m]."""
    return (v_fresh.float() - v_reused.float()).abs().sum(dim=(0, 2))


def recompute_budget(candidates: int, ratio: float, min_tokens: int = 0) -> int:
    """How many of ``candidates`` reused tokens to recompute: round(ratio * candidates), but at
    least min(min_tokens, candidates). The floor matters when few candidates are left after a
    long exact prefix (a reworded last chat turn: 16 candidates at r = .15 give 2)."""
    if candidates <= 0:
        return 0
    return min(candidates, max(int(round(ratio * candidates)), min_tokens))


def top_ratio(scores: torch.Tensor, ratio: float, min_tokens: int = 0) -> torch.Tensor:
    """Indices (into ``scores``) of the ``recompute_budget`` highest scores; among equal scores
    the earliest first (a stable sort, not topk, whose ties are arbitrary), so the graphed check
    (workers/graphed_check.py) chooses the same tokens. Ties happen: with the check layer reading
    layer 0's KV (KVSharer), every V deviation is 0."""
    k = recompute_budget(scores.numel(), ratio, min_tokens)
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=scores.device)
    return torch.argsort(scores, descending=True, stable=True)[:k]


def select_dhd_tokens(attention: torch.Tensor, deviation: torch.Tensor, ratio: float,
                      min_tokens: int = 0) -> torch.Tensor:
    """Dual-High Deviation: tokens both attended to and deviating; indices into the reused set."""
    return top_ratio(attention * deviation, ratio, min_tokens)


def select_cacheblend_tokens(deviation: torch.Tensor, ratio: float, min_tokens: int = 0) -> torch.Tensor:
    return top_ratio(deviation, ratio, min_tokens)


def epic_positions(plan: ReusePlan, first_k: int) -> list[int]:
    """The first ``first_k`` positions of every reused run (EPIC: cancels attention sinks at
    chunk starts). A run is a span; adjacent spans that continue the same donor run are one.
    Spans inside the exact prefix are skipped: their KV is what full compute would give."""
    out: list[int] = []
    prev = None
    for s in plan.spans:
        if s.new_end <= plan.prefix_len:  # the exact prefix is exact KV: nothing to cancel
            prev = s
            continue
        continues = (prev is not None and prev.donor_id == s.donor_id and prev.new_end == s.new_start
                     and prev.donor_start + prev.length == s.donor_start)
        if not continues:
            out.extend(range(s.new_start, min(s.new_end, s.new_start + first_k)))
        prev = s
    return out
