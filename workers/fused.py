"""The pointwise parts of a layer compiled into few kernels (CUDA only).

A layer of an 8B model is ~25 kernels; around the big matmuls most are tiny (norms, RoPE's five
passes, SiLU x up, residual adds, softmax's casts). In a one-token step they are ~1/4 of the time:
each costs a launch (or a graph node) for almost no work. torch.compile fuses them, leaving the
matmuls to cuBLAS. Shapes are dynamic in the token count, so one compiled graph serves every pass
(one-token steps get their own, since size 1 is specialized).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from workers.rope import apply_rope

ENABLED = os.environ.get("KVCLUSTER_FUSE", "1") == "1"
# the layer's last residual add inside the down projection (cuBLAS's beta = 1 epilogue) instead of
# a kernel of its own after it; on an H100 at 1k within the 1% spread of the plain add
# (benchmarks/results/diag/ab*_1k_h100_2026-12-07_*): off
ADDMM_RESIDUAL = os.environ.get("KVCLUSTER_ADDMM_RESIDUAL", "0") == "1"


def _pre_attn(h: torch.Tensor, norm_w: torch.Tensor, w_qkv: torch.Tensor, b_qkv: torch.Tensor | None,
              cos: torch.Tensor, sin: torch.Tensor, eps: float, heads: int, kv_heads: int, d: int):
    x = F.linear(F.rms_norm(h, (h.shape[-1],), norm_w, eps), w_qkv, b_qkv)
    m = h.shape[0]
    qk = apply_rope(x[:, :(heads + kv_heads) * d].view(m, heads + kv_heads, d).transpose(0, 1), cos, sin)
    v = x[:, (heads + kv_heads) * d:].view(m, kv_heads, d).transpose(0, 1)
    return qk[:heads], qk[heads:], v


def _post_attn(h: torch.Tensor, attn: torch.Tensor, w_o: torch.Tensor, norm_w: torch.Tensor,
               w_gate_up: torch.Tensor, w_down: torch.Tensor, eps: float) -> torch.Tensor:
    h = h + F.linear(attn, w_o)
    gate, up = F.linear(F.rms_norm(h, (h.shape[-1],), norm_w, eps), w_gate_up).chunk(2, dim=-1)
    if ADDMM_RESIDUAL:
        return torch.addmm(h, F.silu(gate) * up, w_down.t())
    return h + F.linear(F.silu(gate) * up, w_down)


def attend_one(qf: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
               scale: float) -> torch.Tensor:
    """One query per KV group row over all keys, by batched matmuls (the one-token graph step)."""
    scores = torch.matmul(qf * scale, k.transpose(1, 2)).float()
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)


_compiled: dict[str, object] = {}


def compiled(name: str):
    fn = _compiled.get(name)
    if fn is None:
        fn = _compiled[name] = torch.compile({"pre": _pre_attn, "post": _post_attn, "one": attend_one}[name],
                                             dynamic=True, fullgraph=True)
    return fn
