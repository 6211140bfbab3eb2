#!/usr/bin/env python3
"""A batched decode step's linear layers at 2..16 rows: the few-row kernel of workers/gemv.py
against cuBLAS (diagnostic: prints).

    python benchmarks/diag_gemv_rows.py [--rows 2,4,8,16] [--sweep]

For each linear of a Llama-3-8B layer and the LM head: cuBLAS alone (F.linear), the torch ops the
batched step runs (RMSNorm + linear; linear + residual add; RMSNorm + gate/up + SiLU x up), and the
kernel with that work folded in (the engine's tiling, or with ``--sweep`` the best of a sweep at
8 rows, then timed at every row count), with the weight-read floor at the measured copy bandwidth.
Timed as in ``diag_gemv.py``: CUDA graphs of 20 calls, weights cycled past the L2.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.diag_gemv import EPS, OPS, torch_ops  # noqa: E402
from benchmarks.diag_skinny_gemm import cycler, weight_copies  # noqa: E402
from benchmarks.diag_small_pass import graphed_us  # noqa: E402
from workers.gemv import GemvTiling, gemv, rows_tiling_for  # noqa: E402


def sweep() -> list[GemvTiling]:
    return [GemvTiling(*t) for t in itertools.product((16, 32, 64), (64, 128, 256), (4,), (3, 5))]


def kernel(op: str, x, w, nw, h, t: GemvTiling):
    _, _, norm, glu, res = OPS[op]
    return gemv(x, w, norm_w=nw if norm else None, eps=EPS, glu=glu, residual=h if res else None, tiling=t)


def main() -> None:
    from benchmarks.reuse_gpu_bench import hbm_bandwidth
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="2,4,8,16")
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    bw = hbm_bandwidth()
    print(f"{torch.cuda.get_device_name()}; copy bandwidth {bw / 1e12:.2f} TB/s; us per call")
    layer = {m: [0.0, 0.0, 0.0] for m in rows}  # cuBLAS alone, torch ops, kernel
    floor_layer = 0.0
    for op, (kin, rows_w, _, glu, _) in OPS.items():
        ws = weight_copies(rows_w, kin)
        nxt = cycler(ws)
        nw = 1 + 0.1 * torch.randn(kin, device="cuda", dtype=torch.bfloat16)
        floor = 2 * kin * rows_w / bw * 1e6
        n_out = rows_w // 2 if glu else rows_w
        t = rows_tiling_for(n_out, kin, glu)
        if args.sweep:
            x = torch.randn(8, kin, device="cuda", dtype=torch.bfloat16)
            h = torch.randn(8, n_out, device="cuda", dtype=torch.bfloat16)
            timed = []
            for cand in sweep():
                try:
                    timed.append((graphed_us(lambda: kernel(op, x, nxt(), nw, h, cand)), cand))
                except Exception as e:  # out of registers or shared memory for this tiling
                    print(f"  {op} {cand}: {type(e).__name__}")
            timed.sort(key=lambda p: p[0])
            print(f"{op}: best at 8 rows " + ", ".join(f"{us:.1f} {c}" for us, c in timed[:3]), flush=True)
            t = timed[0][1]
        if op != "lm_head":
            floor_layer += floor
        for m in rows:
            x = torch.randn(m, kin, device="cuda", dtype=torch.bfloat16)
            h = torch.randn(m, n_out, device="cuda", dtype=torch.bfloat16)
            want = torch_ops(op, x, ws[0], nw, h).float()
            err = ((kernel(op, x, ws[0], nw, h, t).float() - want).abs().max() / want.abs().max()).item()
            blas = graphed_us(lambda: F.linear(x, nxt()))
            ops = graphed_us(lambda: torch_ops(op, x, nxt(), nw, h))
            us = graphed_us(lambda: kernel(op, x, nxt(), nw, h, t))
            if op != "lm_head":
                for i, v in enumerate((blas, ops, us)):
                    layer[m][i] += v
            print(f"{op:8s} rows {m:2d}  cuBLAS {blas:7.1f}  with its ops {ops:7.1f}  kernel {us:7.1f} "
                  f"({floor / us:.2f} of floor {floor:.1f}) x{ops / us:.2f}  rel.err {err:.1e}  {t}", flush=True)
        del ws
        torch.cuda.empty_cache()
    print(f"\nper layer (4 linears), us; floor {floor_layer:.1f}")
    print("| rows | cuBLAS alone | cuBLAS + small ops | kernel | ops / kernel |")
    print("|---|---|---|---|---|")
    for m, (a, b, c) in layer.items():
        print(f"| {m} | {a:.1f} | {b:.1f} | {c:.1f} | {b / c:.2f}x |")


if __name__ == "__main__":
    main()
