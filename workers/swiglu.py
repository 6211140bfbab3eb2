"""SiLU(gate) * up over the gate/up projection's output [m, 2I], one Triton kernel.

Inside the compiled layer (workers/fused.py) inductor's kernel for this had run at ~1.4 TB/s on an
H100 (14.6 us for 240 tokens of an 8B model, ~20 MB moved: benchmarks/results/diag/
profile_dhd90_1k_h100_2026-12-07.txt); with dynamic shapes it splits a flat index by div/mod per
element. Here a program takes one row and BLOCK columns, so loads are contiguous and vectorized.
SiLU is computed in float32 and rounded to the input dtype before the product, as eager
``F.silu(gate) * up`` does.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the compiled torch ops serve
    triton = None

BLOCK = 1024


def supports(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda and x.dim() == 2 and x.shape[1] % 2 == 0


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [m, 2I] (gate columns, then up) -> SiLU(gate) * up [m, I]."""
    m, two_i = gate_up.shape
    inter = two_i // 2
    gate_up = gate_up.contiguous()
    out = torch.empty(m, inter, dtype=gate_up.dtype, device=gate_up.device)
    if m:
        _silu_mul[(m, triton.cdiv(inter, BLOCK))](gate_up, out, inter, BLOCK=BLOCK, num_warps=4)
    return out


if triton is not None:
    @triton.jit
    def _silu_mul(x, out, inter, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        live = cols < inter
        gate = tl.load(x + row * 2 * inter + cols, mask=live, other=0.0)
        up = tl.load(x + row * 2 * inter + inter + cols, mask=live, other=0.0)
        g = gate.to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
        tl.store(out + row * inter + cols, (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype), mask=live)
