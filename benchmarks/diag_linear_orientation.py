#!/usr/bin/env python3
"""A short pass's linears asked of cuBLAS the other way round (diagnostic: prints).

    python benchmarks/diag_linear_orientation.py [--rows 80,144,176,240]

``F.linear(x, w)`` for x [m, K] and w [N, K] reaches cuBLAS as an (N x m) product; ``(w @ x.T).T``
as (m x N). Same FLOPs and bytes, but cuBLAS's heuristic picks its kernel by shape, and for 80-240
rows it splits K for the down projection (a split-K kernel plus a reduction: 58.7 us for 240 rows
against a 39 us weight read, benchmarks/results/diag/matmul_autotune_h100_2026-12-07.txt). Also
each way with ``allow_bf16_reduced_precision_reduction`` off, which changes which split-K kernels
cuBLAS may use. Each call includes the residual add (o, down) as the engine does; timed inside a
CUDA graph with several copies of each weight cycled so L2 does not hold them.

Answer on an H100 (benchmarks/results/diag/linear_orientation_h100_2026-12-07.txt): no. Flipped,
o and down are slower at every row count from 80 to 256 (down at 240 rows 62.6 -> 68.4 us),
gate/up the same, q/k/v faster only at 176 rows (25.8 -> 22.8 us); the bf16 reduction setting
changes nothing. The down projection flipped in the engine was slower too, 10.00 -> 10.23 ms for
dhd r = .15 at 90% of 1k (diag/ab1k_flipdown_h100_2026-12-07.txt): the engine keeps F.linear.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.diag_skinny_gemm import OPS, cycler, weight_copies  # noqa: E402
from benchmarks.diag_small_pass import graphed_us, row_list  # noqa: E402


@contextmanager
def reduced_precision_reduction(on: bool):
    m = torch.backends.cuda.matmul
    saved, m.allow_bf16_reduced_precision_reduction = m.allow_bf16_reduced_precision_reduction, on
    try:
        yield
    finally:
        m.allow_bf16_reduced_precision_reduction = saved


def linear(x: torch.Tensor, w: torch.Tensor, flipped: bool) -> torch.Tensor:
    return torch.mm(w, x.t()).t() if flipped else F.linear(x, w)


def main() -> None:
    from benchmarks.reuse_gpu_bench import hbm_bandwidth
    bw = hbm_bandwidth()
    print(f"{torch.cuda.get_device_name()}; copy bandwidth {bw / 1e12:.2f} TB/s; us per call (+ residual add "
          f"for o and down): F.linear / flipped / F.linear, no bf16 reduction / flipped, no bf16 reduction / floor")
    sums: dict[int, list[float]] = {}
    for op, (kin, rows_w, _, res) in OPS.items():
        ws = weight_copies(rows_w, kin)
        floor = 2 * kin * rows_w / bw * 1e6
        for m in row_list((80, 144, 176, 240, 256)):
            x = torch.randn(m, kin, device="cuda", dtype=torch.bfloat16)
            h = torch.randn(m, rows_w, device="cuda", dtype=torch.bfloat16)
            nxt = cycler(ws)
            times = []
            for reduced in (True, False):
                with reduced_precision_reduction(reduced):
                    for flipped in (False, True):
                        def call(flipped=flipped):
                            y = linear(x, nxt(), flipped)
                            return h + y if res else y
                        times.append(graphed_us(call))
            want = F.linear(x, ws[0]).float()
            err = (linear(x, ws[0], True).float() - want).abs().max().item()
            sums.setdefault(m, [0.0] * 5)
            for i, t in enumerate(times + [floor]):
                sums[m][i] += t
            print(f"{op:8s} m={m:4d}  " + " / ".join(f"{t:6.1f}" for t in times) + f" / {floor:6.1f}"
                  f"   best x{times[0] / min(times):.2f}  flipped max err {err:.1e}", flush=True)
        del ws
        torch.cuda.empty_cache()
    print("layer (4 linears):")
    for m, t in sums.items():
        print(f"  m={m:4d}  " + " / ".join(f"{v:6.1f}" for v in t))


if __name__ == "__main__":
    main()
