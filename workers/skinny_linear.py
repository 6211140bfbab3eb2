"""Linear layers over few rows (<= 256 tokens) that read each weight once, in Triton.

A short upper pass (1k prompt, 90-98% reused: 80-240 rows) is bound by reading the weights, 436 MB
a layer of an 8B model. cuBLAS tiles the rows by 64-128, so past 128 rows each weight tile is
read by two programs (L2 catches some of it): on an H100 one layer's four linears take 164 us at
80 rows and 201 us at 240 against 144 us of weight read (benchmarks/results/diag/
matmul_autotune_h100_2026-12-07.txt). Here one program takes every row (``BLOCK_M`` >= rows) and
a slice of output columns, so the weights stream once; the rows, ~1-2 MB, come from L2.

Two epilogues save a kernel each: ``swiglu`` (the gate/up projection writes SiLU(gate) * up, so
the [m, 2I] product never goes to memory) and ``residual`` (the split-K reduction adds it).
Narrow outputs (o, down: 4096 columns) split K over programs to fill the GPU; their float32
partial sums go to a workspace that one small kernel sums, in a fixed order (deterministic).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: F.linear serves
    triton = None

MIN_ROWS, MAX_ROWS = 64, 256  # measured from 80 rows; one-token and small-batch steps keep cuBLAS
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # CPU tests run the kernels in Triton's interpreter


@dataclass(frozen=True)
class Tiling:
    block_n: int = 128  # output columns per program (gate and up each, under swiglu)
    block_k: int = 64
    split_k: int = 1  # programs along K; > 1 sums float32 partials in a second kernel
    warps: int = 8
    stages: int = 3


# per linear of a layer, the tiling measured fastest on an H100 for 80-240 rows of an 8B model
# (benchmarks/diag_skinny_gemm.py)
TILINGS = {"qkv": Tiling(block_n=64, split_k=2), "o": Tiling(block_n=64, split_k=4),
           "gate_up": Tiling(block_n=64, warps=8), "down": Tiling(block_n=64, split_k=4)}


def supports(x: torch.Tensor, w: torch.Tensor, t: Tiling, swiglu: bool = False) -> bool:
    return (triton is not None and (x.is_cuda or _INTERPRET) and x.dtype == w.dtype and x.dim() == 2
            and x.shape[1] == w.shape[1] and fits(x.shape[0], w, t, swiglu))


def fits(m: int, w: torch.Tensor, t: Tiling, swiglu: bool = False) -> bool:
    """Whether ``m`` rows against weight ``w`` [N, K] suit the kernel with tiling ``t``."""
    n = w.shape[0] // 2 if swiglu else w.shape[0]
    return (MIN_ROWS <= m <= MAX_ROWS and n % t.block_n == 0 and w.shape[1] % (t.block_k * t.split_k) == 0
            and not (swiglu and t.split_k > 1) and w.is_contiguous())


def block_m(m: int) -> int:
    return max(16, triton.next_power_of_2(m))


def linear(x: torch.Tensor, w: torch.Tensor, t: Tiling = Tiling(), swiglu: bool = False,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """x [m, K] @ w[N, K]^T; ``swiglu``: w is [gate; up] (2I rows) and the result SiLU(gate) * up
    [m, I]; ``residual`` [m, N] is added (only with split_k > 1, where the reduction does it)."""
    if not supports(x, w, t, swiglu):
        raise ValueError(f"skinny linear: unsupported shapes {tuple(x.shape)} x {tuple(w.shape)} for {t}")
    x = x.contiguous()
    m, k = x.shape
    n = w.shape[0] // 2 if swiglu else w.shape[0]
    bm = block_m(m)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # float32 tests: no TF32 rounding
    grid = (n // t.block_n, t.split_k)
    if t.split_k == 1:
        if residual is not None:
            raise ValueError("skinny linear: a residual needs split_k > 1")
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
        _linear[grid](x, w, out, m, n, k, k // t.split_k, BLOCK_M=bm, BLOCK_N=t.block_n, BLOCK_K=t.block_k,
                      SWIGLU=swiglu, PARTIAL=False, PRECISION=precision, num_warps=t.warps, num_stages=t.stages)
        return out
    part = torch.empty(t.split_k, m, n, dtype=torch.float32, device=x.device)
    _linear[grid](x, w, part, m, n, k, k // t.split_k, BLOCK_M=bm, BLOCK_N=t.block_n, BLOCK_K=t.block_k,
                  SWIGLU=False, PARTIAL=True, PRECISION=precision, num_warps=t.warps, num_stages=t.stages)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    res = residual if residual is not None else out
    _sum_splits[(m, triton.cdiv(n, SUM_BLOCK))](part, res, out, m, n, SPLITS=t.split_k,
                                                  RESIDUAL=residual is not None, BLOCK=SUM_BLOCK, num_warps=4)
    return out


SUM_BLOCK = 1024

if triton is not None:
    @triton.jit
    def _linear(x, w, out, m, n, k, k_slice, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, SWIGLU: tl.constexpr, PARTIAL: tl.constexpr, PRECISION: tl.constexpr):
        col0 = tl.program_id(0) * BLOCK_N
        split = tl.program_id(1)
        rows = tl.arange(0, BLOCK_M)
        cols = col0 + tl.arange(0, BLOCK_N)
        ks = split * k_slice + tl.arange(0, BLOCK_K)
        live = rows[:, None] < m
        x_ptr = x + rows[:, None].to(tl.int64) * k + ks[None, :]
        w_ptr = w + cols[:, None].to(tl.int64) * k + ks[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if SWIGLU:
            u_ptr = w_ptr + n.to(tl.int64) * k  # the up rows follow the gate rows
            acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for _ in range(0, k_slice, BLOCK_K):
            a = tl.load(x_ptr, mask=live, other=0.0)
            acc = tl.dot(a, tl.trans(tl.load(w_ptr)), acc, input_precision=PRECISION)
            if SWIGLU:
                acc_up = tl.dot(a, tl.trans(tl.load(u_ptr)), acc_up, input_precision=PRECISION)
                u_ptr += BLOCK_K
            x_ptr += BLOCK_K
            w_ptr += BLOCK_K
        dst = rows[:, None].to(tl.int64) * n + cols[None, :]
        if PARTIAL:
            tl.store(out + split.to(tl.int64) * m * n + dst, acc, mask=live)
        elif SWIGLU:
            # rounded as eager F.silu(gate) * up rounds: gate, up, SiLU(gate) each to the dtype
            g = acc.to(out.dtype.element_ty).to(tl.float32)
            act = (g / (1.0 + tl.exp(-g))).to(out.dtype.element_ty).to(tl.float32)
            up = acc_up.to(out.dtype.element_ty).to(tl.float32)
            tl.store(out + dst, (act * up).to(out.dtype.element_ty), mask=live)
        else:
            tl.store(out + dst, acc.to(out.dtype.element_ty), mask=live)

    @triton.jit
    def _sum_splits(part, res, out, m, n, SPLITS: tl.constexpr, RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        live = cols < n
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in tl.static_range(SPLITS):
            acc += tl.load(part + (s * m + row) * n + cols, mask=live, other=0.0)
        if RESIDUAL:
            # the residual add rounds the product first, as h + F.linear(...) does
            acc = acc.to(out.dtype.element_ty).to(tl.float32)
            acc += tl.load(res + row * n + cols, mask=live, other=0.0).to(tl.float32)
        tl.store(out + row * n + cols, acc.to(out.dtype.element_ty), mask=live)
