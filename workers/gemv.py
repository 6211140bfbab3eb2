"""One token's linear layers as Triton GEMVs with the layer's small ops folded in (CUDA only).

A one-token step of an 8B model reads ~15 GB of weights: ~5 ms on an H100. Around each layer's
four matrix-vector products sit RMSNorm, SiLU x up and two residual adds, each its own kernel
in the CUDA graph (a few microseconds apiece, for a few KB of data). Here each product takes its
neighbours with it:

- ``norm_w``: RMSNorm of the input first. Every program sums the squares of the input as it
  streams it (8-28 KB, from L2) and scales its dot products once at the end, so the norm costs no
  pass of its own;
- ``glu``: the weight is [gate; up] (2I rows); a program computes the same rows of both halves
  and writes SiLU(gate) * up [I];
- ``residual``: the result is added to it (rounded first, as ``h + F.linear(x, w)`` does);
- ``bias``: Qwen2's q/k/v bias.

A program takes BLOCK_N output rows and streams their weights along K in BLOCK_K slices,
accumulating elementwise in float32 and reducing once at the end. Products are rounded to the
weight dtype before an epilogue, as the unfused ops round them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the runner keeps its torch ops
    triton = None

ENABLED = os.environ.get("KVCLUSTER_GEMV", "1") == "1"
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class GemvTiling:
    block_n: int = 8
    block_k: int = 512
    warps: int = 4
    stages: int = 1


DEFAULT_TILING = GemvTiling()
# the best of a sweep per linear of Llama-3-8B on an H100 (benchmarks/diag_gemv.py,
# benchmarks/results/diag/gemv_h100_2026-12-07.txt); PER_SHAPE = False: DEFAULT_TILING for all
PER_SHAPE = os.environ.get("KVCLUSTER_GEMV_PER_SHAPE", "1") == "1"


def tiling_for(n_out: int, k: int, glu: bool) -> GemvTiling:
    """More programs for small matrices, longer K slices for long rows."""
    if not PER_SHAPE:
        return DEFAULT_TILING
    if glu:  # two weight rows per output: 16 outputs already read 32 rows
        return GemvTiling(16, 256, 4, 1)
    if n_out * k <= 4096 * 4096:
        return GemvTiling(4, 512, 8, 3)
    if k >= 8192:
        return GemvTiling(8, 1024, 4, 3)
    if n_out >= 65536:  # an LM head
        return GemvTiling(8, 1024, 4, 1)
    return GemvTiling(8, 512, 4, 3)


MAX_ROWS = 16  # the few-row kernel's limit: one tensor-core tile of rows (tl.dot's minimum M)
ROWS_ENABLED = os.environ.get("KVCLUSTER_GEMV_ROWS", "1") == "1"


def rows_tiling_for(n_out: int, k: int, glu: bool) -> GemvTiling:
    """The few-row kernel's tiling: the best at 8 rows of a sweep on an H100 over block_n 16/32/64,
    block_k 64/128/256, stages 3/5 (``benchmarks/diag_gemv_rows.py --sweep``,
    benchmarks/results/diag/gemv_rows_h100_2026-12-07.txt, which also times it at 2, 4 and 16 rows).
    Against cuBLAS with the ops it folds in: o, gate/up and down 1.05-1.29x faster; q/k/v (0.90x)
    and the LM head (0.89x) slower."""
    if glu:  # gate/up [2 x 14336, 4096]
        return GemvTiling(64, 128, 4, 3)
    if n_out >= 65536:  # an LM head
        return GemvTiling(64, 64, 4, 3)
    if k >= 8192:  # down [4096, 14336]
        return GemvTiling(32, 256, 4, 5)
    if n_out > k:  # q/k/v [6144, 4096]
        return GemvTiling(64, 256, 4, 3)
    return GemvTiling(32, 256, 4, 5)  # o [4096, 4096]


def supports(x: torch.Tensor, w: torch.Tensor, max_rows: int = 1) -> bool:
    """Whether the kernel runs for x [M, K] against w [N, K] (contiguous rows), M <= ``max_rows``
    (the few-row kernel takes 2..MAX_ROWS)."""
    return (triton is not None and (x.is_cuda or _INTERPRET) and x.dim() == 2
            and 1 <= x.shape[0] <= min(max_rows, MAX_ROWS) and (x.shape[0] == 1 or ROWS_ENABLED)
            and x.shape[1] == w.shape[1] and w.stride(1) == 1 and x.dtype == w.dtype)


def gemv(x: torch.Tensor, w: torch.Tensor, norm_w: torch.Tensor | None = None, eps: float = 1e-6,
         glu: bool = False, residual: torch.Tensor | None = None, bias: torch.Tensor | None = None,
         tiling: GemvTiling | None = None) -> torch.Tensor:
    """x [M, K] @ w[N, K]^T -> [M, N] (or [M, N/2] with ``glu``), with the options above; M = 1
    by the GEMV kernel, 2..MAX_ROWS by the few-row kernel (one tensor-core tile of rows: the
    weights are read once for all of them)."""
    m, k = x.shape
    n_out = w.shape[0] // 2 if glu else w.shape[0]
    if not 1 <= m <= MAX_ROWS:
        raise ValueError(f"gemv: {m} rows; the kernels take 1..{MAX_ROWS}")
    if glu and w.shape[0] % 2:
        raise ValueError(f"gemv: a [gate; up] weight needs an even row count, got {w.shape[0]}")
    if residual is not None and residual.shape != (m, n_out):
        raise ValueError(f"gemv: residual {tuple(residual.shape)} does not fit output [{m}, {n_out}]")
    if bias is not None and bias.shape != (w.shape[0],):
        raise ValueError(f"gemv: bias {tuple(bias.shape)} does not fit {w.shape[0]} rows")
    if norm_w is not None and norm_w.shape != (k,):
        raise ValueError(f"gemv: norm weight {tuple(norm_w.shape)} does not fit K = {k}")
    x = x.contiguous()
    out = torch.empty(m, n_out, dtype=x.dtype, device=x.device)
    if m > 1:
        return _rows(x, w, norm_w, eps, glu, residual, bias, out, tiling or rows_tiling_for(n_out, k, glu))
    t = tiling or tiling_for(n_out, k, glu)
    grid = (triton.cdiv(n_out, t.block_n),)
    _gemv[grid](x, norm_w if norm_w is not None else x, w, bias if bias is not None else x,
                residual.contiguous() if residual is not None else x, out, k, n_out, w.stride(0), eps,
                NORM=norm_w is not None, GLU=glu, RESIDUAL=residual is not None, BIAS=bias is not None,
                EVEN_K=k % t.block_k == 0, BLOCK_N=t.block_n, BLOCK_K=t.block_k, num_warps=t.warps,
                num_stages=t.stages)
    return out


def _rows(x, w, norm_w, eps, glu, residual, bias, out, t: GemvTiling) -> torch.Tensor:
    m, k = x.shape
    n_out = out.shape[1]
    grid = (triton.cdiv(n_out, t.block_n),)
    _gemv_rows[grid](x, norm_w if norm_w is not None else x, w, bias if bias is not None else x,
                     residual.contiguous() if residual is not None else x, out, m, k, n_out, w.stride(0), eps,
                     NORM=norm_w is not None, GLU=glu, RESIDUAL=residual is not None, BIAS=bias is not None,
                     EVEN_K=k % t.block_k == 0, IEEE=x.dtype == torch.float32, BLOCK_M=MAX_ROWS,
                     BLOCK_N=t.block_n, BLOCK_K=t.block_k, num_warps=t.warps, num_stages=t.stages)
    return out


if triton is not None:
    @triton.jit
    def _round(y, like):
        return y.to(like.dtype.element_ty).to(tl.float32)

    @triton.jit
    def _gemv(x, nw, w, b, res, out, K, N_OUT, stride_w, eps,
              NORM: tl.constexpr, GLU: tl.constexpr, RESIDUAL: tl.constexpr, BIAS: tl.constexpr,
              EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        live = rows < N_OUT
        rows64 = rows.to(tl.int64)
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        acc_up = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        sq = tl.zeros([BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            if EVEN_K:
                xk = tl.load(x + ks).to(tl.float32)
            else:
                xk = tl.load(x + ks, mask=ks < K, other=0.0).to(tl.float32)
            if NORM:
                sq += xk * xk
                xk = xk * tl.load(nw + ks, mask=ks < K, other=0.0).to(tl.float32)
            if EVEN_K:
                wmask = live[:, None]
            else:
                wmask = live[:, None] & (ks[None, :] < K)
            wt = tl.load(w + rows64[:, None] * stride_w + ks[None, :], mask=wmask, other=0.0)
            acc += wt.to(tl.float32) * xk[None, :]
            if GLU:
                wu = tl.load(w + (rows64 + N_OUT)[:, None] * stride_w + ks[None, :], mask=wmask, other=0.0)
                acc_up += wu.to(tl.float32) * xk[None, :]
        y = tl.sum(acc, 1)
        if NORM:
            rstd = 1.0 / tl.sqrt(tl.sum(sq, 0) / K + eps)
            y = y * rstd
        if BIAS:
            y += tl.load(b + rows, mask=live, other=0.0).to(tl.float32)
        y = _round(y, out)
        if GLU:
            up = tl.sum(acc_up, 1)
            if NORM:
                up = up * rstd
            if BIAS:
                up += tl.load(b + N_OUT + rows, mask=live, other=0.0).to(tl.float32)
            up = _round(up, out)
            y = _round(y / (1.0 + tl.exp(-y)), out) * up  # SiLU rounded, then the product, as eager
        if RESIDUAL:
            y = _round(y, out) + tl.load(res + rows, mask=live, other=0.0).to(tl.float32)
        tl.store(out + rows, y.to(out.dtype.element_ty), mask=live)

    @triton.jit
    def _dot_t(a, wt, acc, IEEE: tl.constexpr):
        """acc + a @ wt^T (float32 operands exactly, as F.linear in float32)."""
        if IEEE:
            return tl.dot(a, tl.trans(wt), acc, input_precision="ieee")
        return tl.dot(a, tl.trans(wt), acc)

    @triton.jit
    def _gemv_rows(x, nw, w, b, res, out, M, K, N_OUT, stride_w, eps,
                   NORM: tl.constexpr, GLU: tl.constexpr, RESIDUAL: tl.constexpr, BIAS: tl.constexpr,
                   EVEN_K: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):
        """BLOCK_N output features for all M (<= BLOCK_M) rows: each weight slice is read once and
        multiplied by the rows' slice on the tensor cores; norm, bias, SiLU x up and residual as
        in ``_gemv``. The norm's weight is applied to x before the product (rounded to x's dtype,
        the operand type), its 1/rms after."""
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        live = cols < N_OUT
        cols64 = cols.to(tl.int64)
        ms = tl.arange(0, BLOCK_M)
        mlive = ms < M
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        sq = tl.zeros([BLOCK_M], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            if EVEN_K:
                xmask = mlive[:, None]
                wmask = live[:, None]
            else:
                xmask = mlive[:, None] & (ks[None, :] < K)
                wmask = live[:, None] & (ks[None, :] < K)
            xk = tl.load(x + ms[:, None] * K + ks[None, :], mask=xmask, other=0.0)
            if NORM:
                xf = xk.to(tl.float32)
                sq += tl.sum(xf * xf, 1)
                xk = (xf * tl.load(nw + ks, mask=ks < K, other=0.0).to(tl.float32)[None, :]).to(xk.dtype)
            wt = tl.load(w + cols64[:, None] * stride_w + ks[None, :], mask=wmask, other=0.0)
            acc = _dot_t(xk, wt, acc, IEEE)
            if GLU:
                wu = tl.load(w + (cols64 + N_OUT)[:, None] * stride_w + ks[None, :], mask=wmask, other=0.0)
                acc_up = _dot_t(xk, wu, acc_up, IEEE)
        y = acc
        if NORM:
            rstd = 1.0 / tl.sqrt(sq / K + eps)
            y = y * rstd[:, None]
        if BIAS:
            y += tl.load(b + cols, mask=live, other=0.0).to(tl.float32)[None, :]
        y = _round(y, out)
        if GLU:
            up = acc_up
            if NORM:
                up = up * rstd[:, None]
            if BIAS:
                up += tl.load(b + N_OUT + cols, mask=live, other=0.0).to(tl.float32)[None, :]
            up = _round(up, out)
            y = _round(y / (1.0 + tl.exp(-y)), out) * up
        at = ms[:, None] * N_OUT + cols[None, :]
        both = mlive[:, None] & live[None, :]
        if RESIDUAL:
            y = _round(y, out) + tl.load(res + at, mask=both, other=0.0).to(tl.float32)
        tl.store(out + at, y.to(out.dtype.element_ty), mask=both)
