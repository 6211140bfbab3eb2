"""One query token per sequence over its own paged KV blocks, split over the keys (Triton).

The batched decode step gathered each sequence's blocks into a padded [B, Hkv, W, d] copy per
layer and ran SDPA on it: at 8 sequences of ~1k tokens on an H100 that is ~270 MB moved per
layer, more than the layer's weights. Here each program reads its keys straight from the blocks
through the block table (key j of sequence b is slot j % block_size of block table[b, j //
block_size]), one slice of keys per program, online softmax with K and V in one pass; the
slices are merged by ``flash_tile.merge_splits``. Keys past the sequence's position are never
read, so a graph captured for a wide table costs a short sequence only its own keys.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    from workers.flash_tile import key_tile, merge_one_query, one_query_partials
except ImportError:  # CPU-only installs: callers gather the blocks and use SDPA
    triton = None

from workers.decode_attention import BLOCK_N, split_plan


def available(q: torch.Tensor) -> bool:
    return triton is not None and q.is_cuda


def paged_attend(qf: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor,
                 pos: torch.Tensor, scale: float) -> torch.Tensor:
    """qf [B, Hkv, g, d] (each sequence's query heads by KV group) over one layer's blocks k/v
    [num_blocks, Hkv, block_size, d] (contiguous), sequence b seeing keys 0..pos[b] through its
    block table row ``table[b]`` [B, width]; returns [B, Hkv * g * d] (token-major heads)."""
    B, kv_heads, g, d = qf.shape
    bs = k.shape[2]
    assert k.is_contiguous() and v.is_contiguous() and k.shape == v.shape  # v is read with k's strides
    per, splits = split_plan(table.shape[1] * bs)
    qf = qf.contiguous()
    rows = B * kv_heads
    m, l, acc = one_query_partials(rows, splits, g, d, qf.device)
    _partial[(rows, splits)](qf, k, v, table, pos, m, l, acc, k.stride(0), k.stride(1), k.stride(2),
                             table.stride(0), kv_heads, per, scale, G=g, GP=m.shape[2], D=d, BLOCK_N=BLOCK_N, BS=bs,
                             IEEE=qf.dtype == torch.float32, num_warps=4)
    out = torch.empty(B, kv_heads * g * d, dtype=qf.dtype, device=qf.device)
    merge_one_query(m, l, acc, out, g)
    return out


if triton is not None:
    @triton.jit
    def _partial(q_ptr, k_ptr, v_ptr, table_ptr, pos_ptr, m_ptr, l_ptr, acc_ptr, stride_kb, stride_kh,
                 stride_ko, stride_tb, kv_heads, per_split, scale,
                 G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                 BS: tl.constexpr, IEEE: tl.constexpr):
        bh = tl.program_id(0)  # sequence b, KV head h
        s = tl.program_id(1)
        splits = tl.num_programs(1)
        b = bh // kv_heads
        h = bh % kv_heads
        rows = tl.arange(0, GP)
        cols = tl.arange(0, D)
        q = tl.load(q_ptr + (bh * G + rows[:, None]) * D + cols[None, :], mask=rows[:, None] < G, other=0.0)
        start = s * per_split
        end = tl.minimum(start + per_split, tl.load(pos_ptr + b) + 1)
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        for k0 in range(start, end, BLOCK_N):
            offs = k0 + tl.arange(0, BLOCK_N)
            valid = offs < end
            blk = tl.load(table_ptr + b * stride_tb + offs // BS, mask=valid, other=0)
            # per-key row offsets into the blocks; key_tile adds h * stride_kh and the columns
            at = blk.to(tl.int64) * stride_kb + (offs % BS) * stride_ko
            m_i, l_i, acc = key_tile(q, k_ptr, v_ptr, h, stride_kh, 1, stride_kh, 1, at,
                                     cols, valid, valid[None, :], m_i, l_i, acc, scale, IEEE)
        base = bh * splits + s
        tl.store(m_ptr + base * GP + rows, m_i)
        tl.store(l_ptr + base * GP + rows, l_i)
        tl.store(acc_ptr + (base * GP + rows[:, None]) * D + cols[None, :], acc)
