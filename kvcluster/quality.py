"""Output-quality metrics for comparing reused-KV generations against full recompute.

KVShare reports ROUGE-L against full-compute outputs; we add exact-prefix agreement (greedy
decoding diverges at one token and then stays diverged, so "how long until the first
difference" is the sharpest signal) and the KL divergence of next-token distributions (it sees
quality loss before any sampled token changes).

numpy only at import; torch tensors are accepted without importing torch here, so benchmarks
on CPU-only tooling can use these functions.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence, Union

import numpy as np

Tokens = Union[str, Sequence[Any], np.ndarray]


class PrefixMatch(NamedTuple):
    fraction: float  # leading equal tokens / the longer sequence's length (1.0 iff identical)
    exact: bool  # the sequences are identical


def _tokens(x: Any) -> list:
    """Whitespace-split text, or a token sequence (list, tuple, numpy or torch 1-D) as a list."""
    if isinstance(x, str):
        return x.split()
    if hasattr(x, "detach"):  # a torch tensor, recognised without importing torch
        x = x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        if x.ndim != 1:
            raise ValueError(f"expected a 1-D token sequence, got shape {x.shape}")
        return x.tolist()
    return list(x)


def lcs_length(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Length of the longest common subsequence (not substring) of two sequences."""
    if not a or not b:
        return 0
    try:
        # rapidfuzz's LCSseq runs in C++ on any sequences of hashables (bit-parallel).
        from rapidfuzz.distance import LCSseq

        return int(LCSseq.similarity(a, b))
    except ImportError:  # pragma: no cover - rapidfuzz is a dependency; keep a fallback
        return _lcs_python(a, b)


def _lcs_python(a: Sequence[Any], b: Sequence[Any]) -> int:
    """O(len(a) * len(b)) dynamic programme over one row: fine for 64-token outputs."""
    if len(b) > len(a):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: Tokens, reference: Tokens, beta: float = 1.0) -> float:
    """ROUGE-L F-measure (LCS-based) of ``candidate`` against ``reference``.

    Text is split on whitespace (no lowercasing or stemming: we compare a model's output with
    the same model's output, so surface forms are directly comparable); token-id sequences are
    compared as they are. Two empty sequences score 1.0, one empty sequence 0.0.
    """
    c, r = _tokens(candidate), _tokens(reference)
    if not c and not r:
        return 1.0
    lcs = lcs_length(c, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(c), lcs / len(r)
    b2 = beta * beta
    return (1 + b2) * precision * recall / (recall + b2 * precision)


def exact_match_prefix(a: Tokens, b: Tokens) -> PrefixMatch:
    """How far two sequences agree from the start: (fraction of leading equal tokens, identical).

    The fraction is over the longer sequence, so a run cut short by EOS does not count as a
    full match.
    """
    x, y = _tokens(a), _tokens(b)
    longest = max(len(x), len(y))
    if longest == 0:
        return PrefixMatch(1.0, True)
    n = 0
    for u, v in zip(x, y):
        if u != v:
            break
        n += 1
    return PrefixMatch(n / longest, n == longest)


def _float64(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch: .double() also handles bfloat16, which numpy lacks
        return x.detach().double().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def log_softmax(logits: Any, axis: int = -1) -> np.ndarray:
    """log softmax in float64, shifted by the max so exp never overflows."""
    x = _float64(logits)
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)  # a row of all -inf stays -inf rather than nan
    shifted = x - m
    return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


def kl_divergence(logits_p: Any, logits_q: Any, axis: int = -1, reduction: str = "mean") -> Any:
    """KL(softmax(p) || softmax(q)) in nats, per distribution along ``axis``.

    ``p`` is the reference (full recompute), ``q`` the approximation (reused KV). Accepts numpy
    arrays, lists or torch tensors of any float dtype; computed in float64. ``reduction``:
    "mean" or "sum" over the remaining axes (a float), or "none" (an array).
    """
    lp, lq = log_softmax(logits_p, axis), log_softmax(logits_q, axis)
    if lp.shape != lq.shape:
        raise ValueError(f"shape mismatch: {lp.shape} vs {lq.shape}")
    p = np.exp(lp)
    # Where p is 0 the term is 0 even if log q is -inf (masked logits): 0 * inf would be nan.
    with np.errstate(invalid="ignore"):
        terms = np.where(p > 0, p * (lp - lq), 0.0)
    kl = np.maximum(np.sum(terms, axis=axis), 0.0)  # clip -1e-17 rounding below zero
    if reduction == "none":
        return kl
    if reduction == "mean":
        return float(np.mean(kl))
    if reduction == "sum":
        return float(np.sum(kl))
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', not {reduction!r}")


def top1_agreement(logits_p: Any, logits_q: Any, axis: int = -1) -> float:
    """Fraction of positions whose argmax (the greedy next token) is the same under p and q."""
    a, b = np.argmax(_float64(logits_p), axis=axis), np.argmax(_float64(logits_q), axis=axis)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    return float(np.mean(a == b))
