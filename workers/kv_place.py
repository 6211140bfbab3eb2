"""Donor KV into a sequence's cache in one pass: gather donor rows, rotate keys to their new
positions, scatter into the cache (and the pre-RoPE copy kept for the stored segment).

Placing a whole 8k-token prompt moves ~1 GiB of KV for an 8B model. Done with torch ops that is
a gather, a rotation that reads and writes the keys again, and a copy into the cache: ~4 ms on an
H100. One Triton kernel reads each donor row once and writes it once (the bandwidth limit,
~0.7 ms). Without Triton (CPU), the same result comes from torch ops.
"""
from __future__ import annotations

import torch

from workers.rope import apply_rope

try:
    import triton
    import triton.language as tl

    from workers.qkv_write import rope_halves
except ImportError:  # CPU-only installs: the torch path below
    triton = None

BLOCK_T = 32  # tokens per program; a program moves BLOCK_T rows of one (layer, head)


def place_kv(cache_k: torch.Tensor, cache_v: torch.Tensor, src_k: torch.Tensor, src_v: torch.Tensor,
             src_idx: torch.Tensor, dst_idx: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             k_pre_out: torch.Tensor | None = None) -> None:
    """cache_k[:, :, dst_idx] = rope(src_k[:, :, src_idx], cos, sin); same rows of V copied; the
    unrotated keys to ``k_pre_out[:, :, dst_idx]`` when given. K/V are [layers, heads, tokens, d]
    (any strides with a contiguous last axis); cos/sin [len(dst_idx), d] for the new positions."""
    n = dst_idx.numel()
    if n == 0:
        return
    if triton is not None and cache_k.is_cuda and src_k.is_cuda and _fits(cache_k, src_k, cache_v, src_v, k_pre_out):
        _place_triton(cache_k, cache_v, src_k, src_v, src_idx, dst_idx, cos, sin, k_pre_out)
        return
    k_pre = src_k[:, :, src_idx].to(cache_k.device, non_blocking=True)
    cache_k[:, :, dst_idx] = apply_rope(k_pre, cos, sin)
    cache_v[:, :, dst_idx] = src_v[:, :, src_idx].to(cache_v.device, non_blocking=True)
    if k_pre_out is not None:
        k_pre_out[:, :, dst_idx] = k_pre


def _fits(*ts: torch.Tensor | None) -> bool:
    return all(t is None or (t.stride(-1) == 1 and t.dim() == 4) for t in ts)


if triton is not None:
    @triton.jit
    def _place_kernel(src_k, src_v, dst_k, dst_v, kpre, src_idx, dst_idx, cos, sin, n,
                      sk0, sk1, sk2, sv0, sv1, sv2, dk0, dk1, dk2, dv0, dv1, dv2, kp0, kp1, kp2,
                      H: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr, HAS_KPRE: tl.constexpr):
        lh = tl.program_id(1).to(tl.int64)
        layer, head = lh // H, lh % H
        t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        live = t < n
        si = tl.load(src_idx + t, mask=live, other=0).to(tl.int64)
        di = tl.load(dst_idx + t, mask=live, other=0).to(tl.int64)
        d = tl.arange(0, HALF)[None, :]
        rows = live[:, None]
        ks = src_k + layer * sk0 + head * sk1 + si[:, None] * sk2 + d
        x1 = tl.load(ks, mask=rows, other=0.0)
        x2 = tl.load(ks + HALF, mask=rows, other=0.0)
        r1, r2 = rope_halves(x1, x2, cos, sin, t, rows, HALF)
        kd = dst_k + layer * dk0 + head * dk1 + di[:, None] * dk2 + d
        tl.store(kd, r1.to(x1.dtype), mask=rows)
        tl.store(kd + HALF, r2.to(x1.dtype), mask=rows)
        if HAS_KPRE:
            kp = kpre + layer * kp0 + head * kp1 + di[:, None] * kp2 + d
            tl.store(kp, x1, mask=rows)
            tl.store(kp + HALF, x2, mask=rows)
        vs = src_v + layer * sv0 + head * sv1 + si[:, None] * sv2 + d
        vd = dst_v + layer * dv0 + head * dv1 + di[:, None] * dv2 + d
        tl.store(vd, tl.load(vs, mask=rows, other=0.0), mask=rows)
        tl.store(vd + HALF, tl.load(vs + HALF, mask=rows, other=0.0), mask=rows)


def _place_triton(cache_k, cache_v, src_k, src_v, src_idx, dst_idx, cos, sin, k_pre_out) -> None:
    layers, heads, _, d = cache_k.shape
    n = dst_idx.numel()
    cos, sin = cos.contiguous(), sin.contiguous()
    kp = k_pre_out if k_pre_out is not None else cache_k  # unused unless HAS_KPRE
    grid = (triton.cdiv(n, BLOCK_T), layers * heads)
    _place_kernel[grid](src_k, src_v, cache_k, cache_v, kp, src_idx.contiguous(), dst_idx.contiguous(),
                        cos, sin, n, *src_k.stride()[:3], *src_v.stride()[:3], *cache_k.stride()[:3],
                        *cache_v.stride()[:3], *kp.stride()[:3], H=heads, HALF=d // 2, BLOCK=BLOCK_T,
                        HAS_KPRE=k_pre_out is not None)
