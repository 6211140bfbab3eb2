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

from workers import swiglu
from workers.rope import apply_rope

ENABLED = os.environ.get("KVCLUSTER_FUSE", "1") == "1"
# the layer's last residual add inside the down projection (cuBLAS's beta = 1 epilogue) instead of
# a kernel of its own after it; on an H100 at 1k within the 1% spread of the plain add
# (benchmarks/results/diag/ab*_1k_h100_2026-12-07_*): off
ADDMM_RESIDUAL = os.environ.get("KVCLUSTER_ADDMM_RESIDUAL", "0") == "1"
# SiLU x up by workers/swiglu.py's kernel between two compiled halves, and the attention input norm
# compiled with the q/k/v projection where the q/k/v kernel takes the rest (else eager F.rms_norm:
# 6.4 us against inductor's 3.9 at 240 tokens on an H100). With the subset kernel's token-major
# output, dhd r=.15 at 90% reused, 1k tokens, 10.46 -> 9.88 ms on an H100, same-process A/B
# (benchmarks/results/diag/ab90_1k_h100_2026-12-07b_*); KVCLUSTER_SILU_KERNEL=0 /
# KVCLUSTER_COMPILED_QKV_NORM=0 turn them off
SILU_KERNEL = os.environ.get("KVCLUSTER_SILU_KERNEL", "1") == "1"
COMPILED_QKV_NORM = os.environ.get("KVCLUSTER_COMPILED_QKV_NORM", "1") == "1"


def _pre_attn(h: torch.Tensor, norm_w: torch.Tensor, w_qkv: torch.Tensor, b_qkv: torch.Tensor | None,
              cos: torch.Tensor, sin: torch.Tensor, eps: float, heads: int, kv_heads: int, d: int):
    x = norm_linear(h, norm_w, w_qkv, b_qkv, eps)
    m = h.shape[0]
    qk = apply_rope(x[:, :(heads + kv_heads) * d].view(m, heads + kv_heads, d).transpose(0, 1), cos, sin)
    v = x[:, (heads + kv_heads) * d:].view(m, kv_heads, d).transpose(0, 1)
    return qk[:heads], qk[heads:], v


def _post_attn(h: torch.Tensor, attn: torch.Tensor, w_o: torch.Tensor, norm_w: torch.Tensor,
               w_gate_up: torch.Tensor, w_down: torch.Tensor, eps: float) -> torch.Tensor:
    h, gate_up = _post_attn_up(h, attn, w_o, norm_w, w_gate_up, eps)
    gate, up = gate_up.chunk(2, dim=-1)
    return _down_residual(h, F.silu(gate) * up, w_down)


def _post_attn_up(h: torch.Tensor, attn: torch.Tensor, w_o: torch.Tensor, norm_w: torch.Tensor,
                  w_gate_up: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    h = h + F.linear(attn, w_o)
    return h, F.linear(F.rms_norm(h, (h.shape[-1],), norm_w, eps), w_gate_up)


def post_attn(h: torch.Tensor, attn: torch.Tensor, w_o: torch.Tensor, norm_w: torch.Tensor,
              w_gate_up: torch.Tensor, w_down: torch.Tensor, eps: float) -> torch.Tensor:
    """The layer after attention: o projection, residual, norm, SwiGLU MLP, residual (compiled)."""
    if not (SILU_KERNEL and swiglu.supports(h)):
        return compiled("post")(h, attn, w_o, norm_w, w_gate_up, w_down, eps)
    h, gate_up = compiled("post_up")(h, attn, w_o, norm_w, w_gate_up, eps)
    return _down_residual(h, swiglu.silu_mul(gate_up), w_down)


def _down_residual(h: torch.Tensor, act: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    return torch.addmm(h, act, w_down.t()) if ADDMM_RESIDUAL else h + F.linear(act, w_down)


def norm_linear(h: torch.Tensor, norm_w: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                eps: float) -> torch.Tensor:
    return F.linear(F.rms_norm(h, (h.shape[-1],), norm_w, eps), w, b)


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
        fns = {"pre": _pre_attn, "post": _post_attn, "post_up": _post_attn_up, "norm_linear": norm_linear,
               "one": attend_one}
        fn = _compiled[name] = torch.compile(fns[name], dynamic=True, fullgraph=True)
    return fn
