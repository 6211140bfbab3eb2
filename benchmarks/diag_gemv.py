#!/usr/bin/env python3
"""One token's linear layers: the GEMV kernel of workers/gemv.py against cuBLAS (diagnostic: prints).

    python benchmarks/diag_gemv.py [--quick]

For each linear of a Llama-3-8B layer and the LM head, at one row: cuBLAS alone (F.linear), the
ops the one-token graph ran before the kernel (RMSNorm + linear; linear + residual add; RMSNorm +
gate/up + SiLU x up), and the kernel with the same work folded in, over a sweep of tilings; the
best tiling, its error against the torch ops, and the weight-read floor at the measured copy
bandwidth. Each call is timed inside a CUDA graph of 20 calls (no launch cost), with several
copies of each weight cycled so the 50 MB L2 does not hold the next call's weights. Last, a
layer's sum (four linears + their small ops) both ways.
"""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.diag_skinny_gemm import cycler, weight_copies  # noqa: E402
from benchmarks.diag_small_pass import graphed_us  # noqa: E402
from workers.gemv import GemvTiling, gemv  # noqa: E402
from workers.swiglu import silu_mul  # noqa: E402

HIDDEN, INTER, QKV, VOCAB = 4096, 14336, 6144, 128256
EPS = 1e-5
# op: (in features, weight rows, norm prologue, SiLU x up epilogue, residual epilogue)
OPS = {"qkv": (HIDDEN, QKV, True, False, False), "o": (HIDDEN, HIDDEN, False, False, True),
       "gate_up": (HIDDEN, 2 * INTER, True, True, False), "down": (INTER, HIDDEN, False, False, True),
       "lm_head": (HIDDEN, VOCAB, True, False, False)}


def tilings(quick: bool) -> list[GemvTiling]:
    grid = itertools.product((4, 8, 16), (256, 512, 1024), (4, 8), (1, 3))
    out = [GemvTiling(*g) for g in grid if g[0] * g[1] <= 8192]
    return out[::2] if quick else out


def torch_ops(op: str, x, w, nw, h):
    _, _, norm, glu, res = OPS[op]
    if norm:
        x = F.rms_norm(x, (x.shape[-1],), nw, EPS)
    y = F.linear(x, w)
    if glu:
        y = silu_mul(y)
    return h + y if res else y


def kernel(op: str, x, w, nw, h, t: GemvTiling):
    _, _, norm, glu, res = OPS[op]
    return gemv(x, w, norm_w=nw if norm else None, eps=EPS, glu=glu, residual=h if res else None, tiling=t)


def main() -> None:
    from benchmarks.reuse_gpu_bench import hbm_bandwidth
    quick = "--quick" in sys.argv
    bw = hbm_bandwidth()
    print(f"{torch.cuda.get_device_name()}; copy bandwidth {bw / 1e12:.2f} TB/s; us per call, one row")
    layer = [0.0, 0.0, 0.0, 0.0]  # cuBLAS alone, torch ops, kernel, floor
    for op, (kin, rows_w, _, glu, _) in OPS.items():
        ws = weight_copies(rows_w, kin)
        nxt = cycler(ws)
        x = torch.randn(1, kin, device="cuda", dtype=torch.bfloat16)
        nw = 1 + 0.1 * torch.randn(kin, device="cuda", dtype=torch.bfloat16)
        h = torch.randn(1, rows_w // 2 if glu else rows_w, device="cuda", dtype=torch.bfloat16)
        floor = 2 * kin * rows_w / bw * 1e6
        blas_us = graphed_us(lambda: F.linear(x, nxt()))
        ops_us = graphed_us(lambda: torch_ops(op, x, nxt(), nw, h))
        want = torch_ops(op, x, ws[0], nw, h).float()
        best = (float("inf"), None, 0.0)
        for t in tilings(quick):
            try:
                got = kernel(op, x, ws[0], nw, h, t).float()
                us = graphed_us(lambda: kernel(op, x, nxt(), nw, h, t))
            except Exception as e:  # out of registers or shared memory for this tiling
                print(f"  {op} {t}: {type(e).__name__}")
                continue
            err = ((got - want).abs().max() / want.abs().max()).item()
            if us < best[0]:
                best = (us, t, err)
        us, t, err = best
        if op != "lm_head":
            for i, v in enumerate((blas_us, ops_us, us, floor)):
                layer[i] += v
        tb = lambda v: 2 * kin * rows_w / v / 1e6  # noqa: E731
        print(f"{op:8s} cuBLAS {blas_us:7.1f} ({tb(blas_us):.2f} TB/s)  with its ops {ops_us:7.1f}  kernel "
              f"{us:7.1f} ({tb(us):.2f} TB/s, {floor / us:.2f} of floor) x{ops_us / us:.2f}  rel.err {err:.1e}  "
              f"floor {floor:6.1f}  {t}", flush=True)
        del ws
        torch.cuda.empty_cache()
    a, b, c, f = layer
    print(f"layer: cuBLAS alone {a:.1f}, cuBLAS + small ops {b:.1f}, kernel {c:.1f} ({b / c:.2f}x), floor {f:.1f} us")


if __name__ == "__main__":
    main()
