"""What follows a layer's q/k/v projection, in one kernel: RoPE on q and k, K and V written into
the cache at their positions, the pre-RoPE keys into the stored segment's copy, q out contiguous.

In a graphed pass of a few hundred tokens these were separate kernels for ~1 MB of data:
inductor's fused RoPE (~7 us on an H200 at 128 rows) and one index_put scatter each for K and V
(~3.6 us each), plus one more for the pre-RoPE keys when the segment is kept
(benchmarks/results/diag/reuse_1k_h200_2026-12-04.md). Here one program moves BLOCK_T tokens of
one head: a query head, a key head or a value head of the projection's output.

q comes out as [H, m, d] contiguous, which is also the [Hkv, g*m, d] layout of query heads folded
by KV group that the masked attention kernels take. Rotation is computed in float32 and rounded
once, as inductor's fused RoPE does.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the runner keeps its torch ops
    triton = None

BLOCK_T = 32  # tokens per program


def supports(head_dim: int) -> bool:
    """Whether the kernel runs for this head size (Triton present; tl.arange wants a power of two)."""
    return triton is not None and head_dim in (16, 32, 64, 128, 256)


def write_qkv(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
              cache_k: torch.Tensor, cache_v: torch.Tensor, heads: int, kv_heads: int,
              k_pre_out: torch.Tensor | None = None) -> torch.Tensor:
    """x [m, (heads + 2 kv_heads) * d], the projection's output (q heads, then k, then v);
    cos/sin [m, d]; pos [m]; cache_k/cache_v [kv_heads, capacity, d] (one layer's slot, last axis
    contiguous), written at ``pos``; ``k_pre_out`` likewise, gets the keys before RoPE. Returns
    the rotated queries [heads, m, d]."""
    m = x.shape[0]
    d = cache_k.shape[-1]
    # the kernel trusts these shapes: a wrong one reads or writes out of bounds instead of raising
    if x.shape[1] != (heads + 2 * kv_heads) * d or cos.shape != (m, d) or sin.shape != (m, d) \
            or pos.shape != (m,) or cache_v.shape != cache_k.shape or cache_k.shape[0] != kv_heads:
        raise ValueError(f"write_qkv: x {tuple(x.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)}, "
                         f"pos {tuple(pos.shape)}, cache_k {tuple(cache_k.shape)}, cache_v {tuple(cache_v.shape)} "
                         f"do not fit {heads} query and {kv_heads} KV heads")
    if k_pre_out is not None and (k_pre_out.shape[0], k_pre_out.shape[-1]) != (kv_heads, d):
        raise ValueError(f"write_qkv: k_pre_out {tuple(k_pre_out.shape)} does not fit {kv_heads} KV heads of {d}")
    x = x.contiguous()
    q = torch.empty(heads, m, d, dtype=x.dtype, device=x.device)
    kp = k_pre_out if k_pre_out is not None else cache_k  # unused unless HAS_KPRE
    grid = (triton.cdiv(m, BLOCK_T), heads + 2 * kv_heads)
    _qkv_kernel[grid](x, cos.contiguous(), sin.contiguous(), pos.contiguous(), q, cache_k, cache_v, kp, m,
                      x.stride(0), cache_k.stride(0), cache_k.stride(1), cache_v.stride(0), cache_v.stride(1),
                      kp.stride(0), kp.stride(1), H=heads, HKV=kv_heads, HALF=d // 2, BLOCK=BLOCK_T,
                      HAS_KPRE=k_pre_out is not None)
    return q


if triton is not None:
    @triton.jit
    def rope_halves(x1, x2, cos, sin, t, rows, HALF: tl.constexpr):
        """(first, second) half of x rotated by the cos/sin rows t ([BLOCK, 2*HALF] tables),
        Hugging Face's rotate-half layout, in float32."""
        d = tl.arange(0, HALF)[None, :]
        cs = t.to(tl.int64)[:, None] * (2 * HALF) + d
        c1 = tl.load(cos + cs, mask=rows, other=0.0).to(tl.float32)
        c2 = tl.load(cos + cs + HALF, mask=rows, other=0.0).to(tl.float32)
        s1 = tl.load(sin + cs, mask=rows, other=0.0).to(tl.float32)
        s2 = tl.load(sin + cs + HALF, mask=rows, other=0.0).to(tl.float32)
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        return f1 * c1 - f2 * s1, f2 * c2 + f1 * s2

    @triton.jit
    def _qkv_kernel(x, cos, sin, pos, q, ck, cv, kp, m, sx, ck0, ck1, cv0, cv1, kp0, kp1,
                    H: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr,
                    HAS_KPRE: tl.constexpr):
        head = tl.program_id(1)
        t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        live = t < m
        rows = live[:, None]
        d = tl.arange(0, HALF)[None, :]
        src = x + t.to(tl.int64)[:, None] * sx + head * (2 * HALF) + d
        x1 = tl.load(src, mask=rows, other=0.0)
        x2 = tl.load(src + HALF, mask=rows, other=0.0)
        p = tl.load(pos + t, mask=live, other=0).to(tl.int64)[:, None]
        if head < H + HKV:
            r1, r2 = rope_halves(x1, x2, cos, sin, t, rows, HALF)
            if head < H:
                dst = q + (head * m + t.to(tl.int64)[:, None]) * (2 * HALF) + d
            else:
                dst = ck + (head - H) * ck0 + p * ck1 + d
                if HAS_KPRE:
                    pre = kp + (head - H) * kp0 + p * kp1 + d
                    tl.store(pre, x1, mask=rows)
                    tl.store(pre + HALF, x2, mask=rows)
            tl.store(dst, r1.to(x1.dtype), mask=rows)
            tl.store(dst + HALF, r2.to(x1.dtype), mask=rows)
        else:
            dst = cv + (head - H - HKV) * cv0 + p * cv1 + d
            tl.store(dst, x1, mask=rows)
            tl.store(dst + HALF, x2, mask=rows)
