"""Attention of a few hundred tokens at scattered positions over a long KV slot, split over keys.

The upper layers of dhd/cacheblend run a few hundred recomputed tokens (sorted positions anywhere
in the prompt) over all n keys, masked "key position <= query position". SDPA with a dense mask
computes every key block (the mask only zeroes them), and with the query heads of a KV group
folded into rows ([Hkv, g*m, d]) a 300-token pass is ~80 query blocks on 132 SMs: measured on an
H200 at 4k keys, 0.11 ms per layer against ~0.03 ms of work. Here each program takes a block of
rows and a slice of the keys, stops at the block's largest position (causal skipping), reads K
and V once per tile (online softmax), and a second kernel merges the slices' partial results.
Programs are split over keys only as far as it takes to fill the GPU.

Positions are read from the device, so one CUDA graph serves every pass of its shape bucket.
Rows whose position is past the keys (a graph's padding rows) see every key.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    from workers.flash_tile import key_tile, merge_rows, merge_splits, out_offset
except ImportError:  # CPU-only installs: callers use SDPA with a dense mask
    triton = None

BLOCK_M = int(os.environ.get("KVCLUSTER_SUBSET_BLOCK_M", "64"))   # folded query rows per program
BLOCK_N = 64   # keys per tile
NUM_WARPS, NUM_STAGES = 4, 2
MERGE_ROWS = 16  # rows per merge program (the block merge: fewer where there are many slices)
# the merge as one block of rows per program (flash_tile.merge_rows) instead of a loop over them,
# with slices of >= MIN_KEYS_PER_SPLIT = 256 keys instead of 512 (so 4 slices at 1k keys): faster in
# all six 1k reuse cells on an H100, 0.3-6.9% (dhd r=.15 at 98%: 9.56 -> 8.90 ms), same-process A/B
# (benchmarks/results/diag/ab1k_merge_h100_2026-12-07.txt, then with 16 rows per merge program; the
# MERGE_BLOCK_ELEMS cap came next, in the A/B at 4k and the record runs); KVCLUSTER_SUBSET_MERGE_BLOCK=0 /
# KVCLUSTER_SUBSET_MIN_KEYS_PER_SPLIT=512 give the kernels before
MERGE_BLOCK = os.environ.get("KVCLUSTER_SUBSET_MERGE_BLOCK", "1") == "1"
MERGE_BLOCK_ELEMS = 32  # rows x slices per block-merge program (x head size in registers)
# one key slice (no merge) from this many row blocks on, up to ONE_SPLIT_KEYS keys; 0: off. In the
# kernel alone on an H200 one slice took 21-24 us against 25-26 with two at 1k keys and 192-256
# tokens (benchmarks/results/diag/reuse_1k_h200_2026-12-04.md); in the engine on an H100 at 1k no
# faster than two slices + merge, with 32- or 16-row blocks (diag/ab*_1k_h100_2026-12-07_*): off
ONE_SPLIT_PROGRAMS = int(os.environ.get("KVCLUSTER_SUBSET_ONE_SPLIT_PROGRAMS", "96"))
ONE_SPLIT_KEYS = int(os.environ.get("KVCLUSTER_SUBSET_ONE_SPLIT_KEYS", "0"))
# the runner asks for the output token-major ([m, H*d], what the o projection reads), written so by
# the kernels instead of a transposing copy after them (~4 us per layer at 240 tokens on an H100;
# A/B in workers/fused.py's note); KVCLUSTER_SUBSET_TOKEN_MAJOR=0 turns it off
TOKEN_MAJOR_OUT = os.environ.get("KVCLUSTER_SUBSET_TOKEN_MAJOR", "1") == "1"

MIN_KEYS_PER_SPLIT = int(os.environ.get("KVCLUSTER_SUBSET_MIN_KEYS_PER_SPLIT", "256"))
TARGET_PROGRAMS = 4 * 132  # a few waves on an H100/H200


def settings() -> dict:
    """The tiling in force (benchmarks record it beside their results)."""
    return {"block_m": BLOCK_M, "block_n": BLOCK_N, "num_stages": NUM_STAGES, "merge_rows": MERGE_ROWS,
            "merge_block": MERGE_BLOCK, "min_keys_per_split": MIN_KEYS_PER_SPLIT,
            "one_split_programs": ONE_SPLIT_PROGRAMS, "one_split_keys": ONE_SPLIT_KEYS,
            "token_major_out": TOKEN_MAJOR_OUT}


def supports(head_dim: int) -> bool:
    """Whether the kernel runs for this head size (Triton present; tl.dot wants a power of two)."""
    return triton is not None and head_dim in (16, 32, 64, 128, 256)


def strides_fit(k: torch.Tensor, v: torch.Tensor) -> bool:
    return k.stride(-1) == 1 and v.stride(-1) == 1


def split_plan(row_blocks: int, n_keys: int) -> tuple[int, int]:
    """(keys per program, programs per row block)."""
    if ONE_SPLIT_KEYS and row_blocks >= ONE_SPLIT_PROGRAMS and n_keys <= ONE_SPLIT_KEYS:
        return -(-n_keys // BLOCK_N) * BLOCK_N, 1
    want = max(1, -(-TARGET_PROGRAMS // row_blocks))
    splits = max(1, min(want, n_keys // MIN_KEYS_PER_SPLIT))
    per = -(-n_keys // splits)
    per = -(-per // BLOCK_N) * BLOCK_N
    return per, -(-n_keys // per)


def block_ends(pos: torch.Tensor, groups: int) -> torch.Tensor:
    """For each block of BLOCK_M folded rows, one past the largest position among them (int32):
    where a program stops reading keys. ``pos`` is sorted, so that is the block's last row unless
    the block wraps into the next head's rows (then pos[-1]). Built once per pass, on the device."""
    m = pos.shape[0]
    rows = groups * m
    last = torch.clamp(torch.arange(BLOCK_M - 1, rows + BLOCK_M - 1, BLOCK_M, device=pos.device), max=rows - 1)
    first = last - (last % BLOCK_M)
    wraps = first // m != last // m
    return (torch.where(wraps, pos[-1], pos[last % m]) + 1).to(torch.int32)


def _merge_kernel(sp: int):
    """The merge kernel and its rows per program, for ``sp`` slices (padded to a power of two)."""
    if MERGE_BLOCK:
        return merge_rows, max(1, min(MERGE_ROWS, MERGE_BLOCK_ELEMS // sp))
    return merge_splits, MERGE_ROWS


def attend_subset(qf: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                  scale: float, ends: torch.Tensor | None = None, token_major: bool = False) -> torch.Tensor:
    """qf [Hkv, g*m, d] (query heads folded by KV group: row j*m + i is head j's query of token
    i) over k/v [Hkv, n, d] (cache slices, contiguous last axis), token i seeing keys <= pos[i];
    returns [Hkv, g*m, d], or with ``token_major`` [m, Hkv*g*d] (query head h*g + j of token i at
    row i, columns (h*g + j)*d...). ``ends``: ``block_ends(pos, g)``, shared by a pass's layers."""
    kv_heads, rows, d = qf.shape
    m, n = pos.shape[0], k.shape[1]
    g = rows // m
    qf = qf.contiguous()
    row_blocks = -(-rows // BLOCK_M)
    if ends is None:
        ends = block_ends(pos, g)
    per, splits = split_plan(kv_heads * row_blocks, n)
    if token_major:
        out = torch.empty(m, kv_heads * g * d, dtype=qf.dtype, device=qf.device)
        strides = (g * d, d, kv_heads * g * d)  # per KV head, head in group, token
    else:
        out = torch.empty_like(qf)
        strides = (rows * d, m * d, d)
    if splits == 1:  # one slice per row block: normalize in place of the merge kernel
        mx = l = acc = out
    else:
        mx = torch.empty(kv_heads, splits, rows, dtype=torch.float32, device=qf.device)
        l = torch.empty_like(mx)
        acc = torch.empty(kv_heads, splits, rows, d, dtype=torch.float32, device=qf.device)
    _partial[(kv_heads, row_blocks, splits)](
        qf, k, v, pos, ends, mx, l, acc, out, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        rows, m, n, per, scale, *strides, D=d, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        IEEE=qf.dtype == torch.float32, DIRECT=splits == 1, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    if splits > 1:
        sp = max(2, triton.next_power_of_2(splits))
        merge, br = _merge_kernel(sp)
        merge[(kv_heads, -(-rows // br))](mx, l, acc, out, rows, rows, splits, m, *strides, D=d, BLOCK_R=br, SP=sp,
                                          num_warps=4)
    return out


if triton is not None:
    @triton.jit
    def _partial(q_ptr, k_ptr, v_ptr, pos_ptr, ends_ptr, m_ptr, l_ptr, acc_ptr, out_ptr, stride_kh, stride_kn,
                 stride_vh, stride_vn, rows, m_tokens, n_keys, per_split, scale, s_head, s_group, s_token,
                 D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
                 DIRECT: tl.constexpr):
        h = tl.program_id(0)
        rb = tl.program_id(1)
        s = tl.program_id(2)
        splits = tl.num_programs(2)
        r = rb * BLOCK_M + tl.arange(0, BLOCK_M)
        live = r < rows
        cols = tl.arange(0, D)
        rpos = tl.load(pos_ptr + r % m_tokens, mask=live, other=-1)
        q = tl.load(q_ptr + (h * rows + r[:, None]) * D + cols[None, :], mask=live[:, None], other=0.0)
        start = s * per_split
        end = tl.minimum(tl.minimum(start + per_split, n_keys), tl.load(ends_ptr + rb))
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        for k0 in range(start, end, BLOCK_N):
            offs = k0 + tl.arange(0, BLOCK_N)
            valid = offs < end
            m_i, l_i, acc = key_tile(q, k_ptr, v_ptr, h, stride_kh, stride_kn, stride_vh, stride_vn, offs,
                                     cols, valid, valid[None, :] & (offs[None, :] <= rpos[:, None]), m_i, l_i, acc, scale, IEEE)
        if DIRECT:  # every live row has seen key 0: l_i > 0
            o = acc / tl.where(live, l_i, 1.0)[:, None]
            dst = out_ptr + out_offset(h, r, m_tokens, s_head, s_group, s_token)[:, None] + cols[None, :]
            tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=live[:, None])
        else:
            base = (h * splits + s) * rows
            tl.store(m_ptr + base + r, m_i, mask=live)
            tl.store(l_ptr + base + r, l_i, mask=live)
            tl.store(acc_ptr + (base + r[:, None]) * D + cols[None, :], acc, mask=live[:, None])
