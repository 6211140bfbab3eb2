"""What both split-key attention kernels share (Triton): one tile of keys, and the merge.

``key_tile``: scores of a block of query rows against BLOCK_N keys, masked by ``seen`` (row,
key), folded into the running max ``m_i``, sum ``l_i`` and output ``acc`` (online softmax; K and
V read once). Rows that have seen no key yet keep m = -inf and contribute nothing.

``merge_splits``: the partial results of the key slices ([Hkv, splits, in_rows] of m and l,
[..., D] of acc) merged into the output, BLOCK_R rows per program. Row r of KV head h (query head
r // m_tokens of the group, token r % m_tokens) goes to h * s_head + (r // m_tokens) * s_group +
(r % m_tokens) * s_token: [Hkv, out_rows, D] or, token-major, [m, H * D] (``out_offset``).
``merge_rows`` does the same with a program's rows as one block: one round of loads instead of a
chain of BLOCK_R (the loop costs ~10 us per layer at 1k keys on an H100, for ~1 MB of data).
The loop stays for one-token steps (one row per program, where the two are the same) and for the
A/B of the path before (benchmarks/variants.py); moving decode to merge_rows waits for a GPU test.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

if triton is not None:
    @triton.jit
    def key_tile(q, k_ptr, v_ptr, h, stride_kh, stride_kn, stride_vh, stride_vn, offs, cols, valid,
                 seen, m_i, l_i, acc, scale, IEEE: tl.constexpr):
        kt = tl.load(k_ptr + h * stride_kh + offs[:, None] * stride_kn + cols[None, :],
                     mask=valid[:, None], other=0.0)
        if IEEE:  # float32 runners (tests): no TF32 rounding
            sc = tl.dot(q, tl.trans(kt), input_precision="ieee") * scale
        else:
            sc = tl.dot(q, tl.trans(kt)) * scale
        sc = tl.where(seen, sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet
        p = tl.exp(sc - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        vt = tl.load(v_ptr + h * stride_vh + offs[:, None] * stride_vn + cols[None, :],
                     mask=valid[:, None], other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, vt, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
        l_i = l_i * alpha + tl.sum(p, 1)
        return m_new, l_i, acc

    @triton.jit
    def out_offset(h, r, m_tokens, s_head, s_group, s_token):
        """Where row r of KV head h starts in the output (see merge_splits)."""
        return h * s_head + (r // m_tokens) * s_group + (r % m_tokens) * s_token

    @triton.jit
    def merge_splits(m_ptr, l_ptr, acc_ptr, out_ptr, in_rows, out_rows, splits, m_tokens, s_head, s_group,
                     s_token, D: tl.constexpr, BLOCK_R: tl.constexpr, SP: tl.constexpr):
        h = tl.program_id(0)
        r0 = tl.program_id(1) * BLOCK_R
        ss = tl.arange(0, SP)
        cols = tl.arange(0, D)
        live = ss < splits
        for i in range(BLOCK_R):
            row = r0 + i
            if row < out_rows:
                idx = (h * splits + ss) * in_rows + row
                m = tl.load(m_ptr + idx, mask=live, other=float("-inf"))
                l = tl.load(l_ptr + idx, mask=live, other=0.0)
                top = tl.max(m, 0)  # split 0 holds key 0, which every row sees: finite
                w = tl.where(live & (m > float("-inf")), tl.exp(m - top), 0.0)
                acc = tl.load(acc_ptr + idx[:, None] * D + cols[None, :], mask=live[:, None], other=0.0)
                o = tl.sum(acc * w[:, None], 0) / tl.sum(w * l, 0)
                dst = out_ptr + out_offset(h, row, m_tokens, s_head, s_group, s_token) + cols
                tl.store(dst, o.to(out_ptr.dtype.element_ty))

    @triton.jit
    def merge_rows(m_ptr, l_ptr, acc_ptr, out_ptr, in_rows, out_rows, splits, m_tokens, s_head, s_group,
                   s_token, D: tl.constexpr, BLOCK_R: tl.constexpr, SP: tl.constexpr):
        h = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        ss = tl.arange(0, SP)
        cols = tl.arange(0, D)
        row_live = rows < out_rows
        live = row_live[:, None] & (ss[None, :] < splits)  # [R, SP]
        idx = (h * splits + ss[None, :]) * in_rows + rows[:, None]
        m = tl.load(m_ptr + idx, mask=live, other=float("-inf"))
        l = tl.load(l_ptr + idx, mask=live, other=0.0)
        top = tl.max(m, 1)  # split 0 holds key 0, which every live row sees: finite
        top = tl.where(row_live, top, 0.0)
        w = tl.where(live & (m > float("-inf")), tl.exp(m - top[:, None]), 0.0)
        acc = tl.load(acc_ptr + idx[:, :, None] * D + cols[None, None, :], mask=live[:, :, None], other=0.0)
        den = tl.sum(w * l, 1)
        o = tl.sum(acc * w[:, :, None], 1) / tl.where(row_live, den, 1.0)[:, None]
        dst = out_ptr + out_offset(h, rows, m_tokens, s_head, s_group, s_token)[:, None] + cols[None, :]
        tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=row_live[:, None])


def one_query_partials(rows: int, splits: int, g: int, d: int, device) -> tuple[torch.Tensor, ...]:
    """m, l [rows, splits, GP] and acc [..., d] (float32) for the split-key kernels of one query
    token, whose g query heads per KV row are padded to GP >= 16 rows (tl.dot's minimum)."""
    gp = max(16, triton.next_power_of_2(g))
    m = torch.empty(rows, splits, gp, dtype=torch.float32, device=device)
    return m, torch.empty_like(m), torch.empty(rows, splits, gp, d, dtype=torch.float32, device=device)


def merge_one_query(m: torch.Tensor, l: torch.Tensor, acc: torch.Tensor, out: torch.Tensor, g: int) -> None:
    """Merge the slices of ``one_query_partials`` into ``out``: the g heads of each of the rows
    KV rows, in order, d values each."""
    rows, splits, gp, d = acc.shape
    merge_splits[(rows, g)](m, l, acc, out, gp, g, splits, g, g * d, 0, d, D=d, BLOCK_R=1,
                            SP=max(2, triton.next_power_of_2(splits)), num_warps=4)
