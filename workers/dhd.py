"""Which reused tokens to recompute: DHD (KVShare), CacheBlend and EPIC selection rules."""
from __future__ import annotations

import torch

from index_service.plan import ReusePlan


def v_deviation(v_fresh: torch.Tensor, v_reused: torch.Tensor) -> torch.Tensor:
    """L1 distance per token over heads and head_dim; inputs [Hkv, m, d] -> [m]."""
    return (v_fresh.float() - v_reused.float()).abs().sum(dim=(0, 2))


def top_ratio(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Indices (into ``scores``) of the round(ratio * len) highest scores."""
    k = int(round(ratio * scores.numel()))
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=scores.device)
    return torch.topk(scores, min(k, scores.numel())).indices


def select_dhd_tokens(attention: torch.Tensor, deviation: torch.Tensor, ratio: float) -> torch.Tensor:
    """Dual-High Deviation: tokens both attended to and deviating; indices into the reused set."""
    return top_ratio(attention * deviation, ratio)


def select_cacheblend_tokens(deviation: torch.Tensor, ratio: float) -> torch.Tensor:
    return top_ratio(deviation, ratio)


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
