"""Token alignment of a new prompt against donor prompts -> ReusePlan.

Three passes, cheapest and safest first:
  1. exact prefix: the longest run matching a donor at identical positions from 0 (its KV is exact);
  2. moved spans: an m-gram hash index over each donor, matches grouped by diagonal into maximal
     runs, taken longest first (greedy string tiling). Finds reordered documents, which an LCS diff
     cannot (a diff keeps one monotone alignment, so swapped halves reuse only half the tokens);
  3. gap diff: rapidfuzz Indel opcodes (bit-parallel LCS in C++) on each uncovered gap against the
     donor range between its neighbouring spans, recovering short runs (min_run <= len < gram)
     where they sit in place, e.g. the words around an edit.
Donors are taken in priority order: the first donor gets first pick in each pass and later donors
fill what is still uncovered. A donor position may serve several new positions (a repeated
document), so only the new side is kept non-overlapping.
"""
from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence

import numpy as np

from index_service.plan import ReusePlan, ReuseSpan

_MUL = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multipliers for the rolling m-gram hash
_BASE = np.uint64(0xC2B2AE3D27D4EB4F)
_BAND = 32  # at most this many donor occurrences per repeated m-gram: bounds the pair count


def as_tokens(tokens: object, what: str = "tokens") -> np.ndarray:
    """Validate a 1-D sequence of non-negative integer token ids; return it as int64."""
    if isinstance(tokens, (str, bytes)):
        raise TypeError(f"{what} must be a sequence of int token ids, got {type(tokens).__name__}")
    if isinstance(tokens, Mapping):  # a tokenizer's BatchEncoding
        raise TypeError(f"{what} must be a sequence of int token ids, got a {type(tokens).__name__}: "
                        "pass its ['input_ids']")
    try:
        arr = np.asarray(tokens)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} must be a sequence of int token ids: {e}") from None
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise TypeError(f"{what} must be a 1-D sequence of int token ids, got dtype {arr.dtype}, shape {arr.shape}")
    arr = arr.astype(np.int64, copy=False)
    if arr.min() < 0:
        raise ValueError(f"{what} contains a negative token id")
    return arr


def align(
    new_tokens: Sequence[int] | np.ndarray,
    donors: Sequence[tuple[str, Sequence[int] | np.ndarray]],
    min_run: int = 4,
    gram: int | None = None,
    gap_diff: bool = True,
) -> ReusePlan:
    """Plan which donor token's KV each new position reuses.

    donors: (donor_id, token_ids) in priority order. Runs shorter than min_run are dropped.
    gram: m-gram length of the hash index (default max(min_run, 8)); the gap diff recovers
    in-place runs shorter than gram. Raises TypeError/ValueError on bad input.
    """
    if not isinstance(min_run, (int, np.integer)) or isinstance(min_run, bool) or min_run < 1:
        raise ValueError(f"min_run must be an int >= 1, got {min_run!r}")
    gram = max(int(min_run), 8) if gram is None else int(gram)
    if gram < min_run:
        raise ValueError(f"gram ({gram}) must be >= min_run ({min_run})")
    new = as_tokens(new_tokens, "new_tokens")
    if new.size == 0:
        raise ValueError("new_tokens is empty")
    dons = _check_donors(donors)
    n = len(new)
    covered = np.zeros(n, dtype=bool)
    spans: list[ReuseSpan] = []

    prefix_len = _take_prefix(new, dons, min_run, covered, spans)
    new_hash = _gram_hashes(new, gram)
    for donor_id, don in dons:
        if covered.all():
            break
        if len(don) >= gram:
            _take_moved(new, new_hash, donor_id, don, gram, min_run, covered, spans)
    if gap_diff:
        for donor_id, don in dons:
            if covered.all():
                break
            _take_gap_diffs(new, donor_id, don, min_run, covered, spans)

    spans = _merge(_verified(new, dict(dons), spans, min_run))
    plan = ReusePlan(n_tokens=n, spans=spans, prefix_len=prefix_len)
    plan.source = source_of(plan)
    return plan


def source_of(plan: ReusePlan) -> str:
    """"miss" without reuse, "prefix" when all reuse is the exact prefix, else "semantic"."""
    if not plan.spans:
        return "miss"
    return "prefix" if plan.prefix_len and plan.reused_tokens == plan.prefix_len else "semantic"


def _check_donors(donors: object) -> list[tuple[str, np.ndarray]]:
    if isinstance(donors, (str, bytes)) or not isinstance(donors, Sequence):
        raise TypeError("donors must be a sequence of (donor_id, token_ids)")
    out = []
    seen: set[str] = set()
    for i, d in enumerate(donors):
        if not isinstance(d, (tuple, list)) or len(d) != 2:
            raise TypeError(f"donors[{i}] must be a (donor_id, token_ids) pair")
        donor_id, toks = d
        if not isinstance(donor_id, str) or not donor_id:
            raise TypeError(f"donors[{i}] id must be a non-empty str, got {donor_id!r}")
        if donor_id in seen:
            raise ValueError(f"donor id {donor_id!r} appears twice")
        seen.add(donor_id)
        out.append((donor_id, as_tokens(toks, f"donor {donor_id!r} tokens")))
    return out


def _take_prefix(new, dons, min_run, covered, spans) -> int:
    """The longest exact prefix over all donors wins over priority: its KV needs no correction."""
    best, best_id = 0, None
    for donor_id, don in dons:
        k = min(len(new), len(don))
        diff = np.flatnonzero(new[:k] != don[:k])
        cp = int(diff[0]) if diff.size else k
        if cp > best:
            best, best_id = cp, donor_id
    if best < min_run:
        return 0
    covered[:best] = True
    spans.append(ReuseSpan(0, best_id, 0, best))
    return best


def _gram_hashes(x: np.ndarray, gram: int) -> np.ndarray:
    """64-bit polynomial hash of every m-gram (wrapping uint64 arithmetic); collisions are
    harmless because every span is verified token by token at the end."""
    m = len(x) - gram + 1
    if m <= 0:
        return np.zeros(0, dtype=np.uint64)
    v = x.astype(np.uint64) * _MUL + np.uint64(1)
    h = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for t in range(gram):
            h = h * _BASE + v[t:t + m]
    return h


def _take_moved(new, new_hash, donor_id, don, gram, min_run, covered, spans) -> None:
    runs = _maximal_runs(new_hash, _gram_hashes(don, gram), covered, gram)
    if runs is None:
        return
    heap = [(-length, i, j) for length, i, j in runs]
    heapq.heapify(heap)
    while heap:  # longest first; a run that overlaps taken ground re-enters as its free pieces
        neg, i, j = heapq.heappop(heap)
        length = -neg
        free = ~covered[i:i + length]
        if free.all():
            covered[i:i + length] = True
            spans.append(ReuseSpan(i, donor_id, j, length))
            continue
        for a, b in _true_runs(free, min_run):
            heapq.heappush(heap, (-(b - a), i + a, j + a))


def _maximal_runs(new_hash, don_hash, covered, gram):
    """All maximal diagonal runs of equal m-grams between new (uncovered part) and donor:
    [(length_in_tokens, new_start, donor_start)], as plain ints."""
    if not len(new_hash) or not len(don_hash):
        return None
    # only m-grams lying wholly in uncovered new positions
    c = np.concatenate(([0], np.cumsum(covered)))
    free_i = np.flatnonzero(c[gram:] - c[:-gram] == 0)
    if not free_i.size:
        return None
    order = np.argsort(don_hash, kind="stable")  # stable: donor positions ascend within a hash
    hs = don_hash[order]
    hn = new_hash[free_i]
    lo = np.searchsorted(hs, hn, "left")
    cnt = np.searchsorted(hs, hn, "right") - lo
    hit = cnt > 0
    if not hit.any():
        return None
    free_i, lo, cnt = free_i[hit], lo[hit], cnt[hit]
    # a repeated m-gram pairs only with a band of donor occurrences near the same relative place
    take = np.minimum(cnt, _BAND)
    centre = (free_i * cnt) // max(len(new_hash), 1)
    start = lo + np.clip(centre - _BAND // 2, 0, np.maximum(cnt - _BAND, 0))
    total = int(take.sum())
    offs = np.arange(total) - np.repeat(np.cumsum(take) - take, take)
    ii = np.repeat(free_i, take)
    jj = order[np.repeat(start, take) + offs]
    # group by diagonal: on one diagonal consecutive new positions give key steps of exactly 1
    key = np.sort((jj - ii + len(new_hash)) * (len(new_hash) + gram + 1) + ii)
    brk = np.flatnonzero(np.diff(key) != 1) + 1
    first = np.concatenate(([0], brk))
    count = np.diff(np.concatenate((first, [len(key)])))
    k0 = key[first]
    i0 = k0 % (len(new_hash) + gram + 1)
    j0 = k0 // (len(new_hash) + gram + 1) - len(new_hash) + i0
    return list(zip((count + gram - 1).tolist(), i0.tolist(), j0.tolist()))


def _true_runs(mask: np.ndarray, min_len: int) -> list[tuple[int, int]]:
    """[start, end) of the runs of True in mask at least min_len long."""
    m = np.concatenate(([False], mask, [False]))
    edges = np.flatnonzero(m[1:] != m[:-1])
    starts, ends = edges[0::2], edges[1::2]
    keep = ends - starts >= min_len
    return list(zip(starts[keep].tolist(), ends[keep].tolist()))


def _take_gap_diffs(new, donor_id, don, min_run, covered, spans) -> None:
    # imported here: the plan types and this module must import where rapidfuzz is absent (the
    # GPU machines, which run benchmarks/reuse_gpu_bench.py with torch, numpy and xxhash only)
    from rapidfuzz.distance import Indel
    if not len(don):
        return
    by_end = {s.new_end: s for s in spans}
    by_start = {s.new_start: s for s in spans}
    whole = not spans
    don_list = None
    for a, b in _true_runs(~covered, min_run):
        window = _donor_window(by_end.get(a), by_start.get(b), donor_id, b - a, len(don), whole)
        if window is None or window[1] - window[0] < min_run:
            continue
        if don_list is None:
            don_list = don.tolist()
        lo, hi = window
        for op in Indel.opcodes(new[a:b].tolist(), don_list[lo:hi]):
            if op.tag == "equal" and op.src_end - op.src_start >= min_run:
                length = op.src_end - op.src_start
                covered[a + op.src_start:a + op.src_end] = True
                spans.append(ReuseSpan(a + op.src_start, donor_id, lo + op.dest_start, length))


def _donor_window(left, right, donor_id, gap, m, whole):
    """The donor range an uncovered gap most likely corresponds to, from its neighbour spans:
    between them when both come from this donor in order, else a window twice the gap wide
    next to the one that does. None when neither neighbour is from this donor."""
    lo = left.donor_start + left.length if left is not None and left.donor_id == donor_id else None
    hi = right.donor_start if right is not None and right.donor_id == donor_id else None
    if lo is not None and hi is not None and lo <= hi:
        return lo, hi
    if lo is not None:
        return lo, min(m, lo + 2 * gap)
    if hi is not None:
        return max(0, hi - 2 * gap), hi
    return (0, m) if whole else None


def _verified(new, dons, spans, min_run) -> list[ReuseSpan]:
    """Keep only token-identical pieces (>= min_run) of each span: guards against hash collisions."""
    out = []
    for s in spans:
        eq = new[s.new_start:s.new_end] == dons[s.donor_id][s.donor_start:s.donor_start + s.length]
        if eq.all():
            out.append(s)
            continue
        for a, b in _true_runs(eq, min_run):
            out.append(ReuseSpan(s.new_start + a, s.donor_id, s.donor_start + a, b - a))
    return out


def _merge(spans: list[ReuseSpan]) -> list[ReuseSpan]:
    """Join spans that continue each other in both new and donor (pieces of one trimmed run)."""
    spans = sorted(spans, key=lambda s: s.new_start)
    out: list[ReuseSpan] = []
    for s in spans:
        p = out[-1] if out else None
        if p and p.donor_id == s.donor_id and p.new_end == s.new_start and p.donor_start + p.length == s.donor_start:
            out[-1] = ReuseSpan(p.new_start, p.donor_id, p.donor_start, p.length + s.length)
        else:
            out.append(s)
    return out
