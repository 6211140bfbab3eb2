"""Kernel table of one graphed batched decode step (Llama-3-8B shape, random bf16), per path: the
op-by-op step on cuBLAS (``KVCLUSTER_PAGED_GEMV_ROWS=0``) and the few-row GEMV step (16), at B rows
of N tokens: where each step's time goes, kernel by kernel (diagnostic: prints).

    python3 benchmarks/diag_paged_step_kernels.py [--batch 4] [--tokens 1024] [--top 14]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.paged_decode_gpu_bench import time_steps  # noqa: E402
import workers.paged_decode as pd  # noqa: E402
from workers.block_manager import BlockManager  # noqa: E402
from workers.model_loader import LLAMA3_8B, random_runner  # noqa: E402
from workers.model_spec import ModelSpec  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=14)
    args = ap.parse_args()
    spec = ModelSpec(**LLAMA3_8B)
    r = random_runner(spec, "cuda", torch.bfloat16)
    b, n = args.batch, args.tokens
    per_seq = n + 3 * args.steps + 8
    bm = BlockManager(r, b * (per_seq // 16 + 2) + 1, 16)
    for x in (bm.k, bm.v):
        x.normal_()
    step = pd.GraphedPagedStep(r, bm, b, per_seq)
    sids = list(range(b))
    for limit in (0, 16):
        pd.PAGED_GEMV_ROWS = limit
        step.graphs.clear()
        step.mempool = None
        for i in sids:
            bm.allocate(i, n)
        ms = time_steps(step, sids, args.steps) * 1e3
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for i in range(args.steps):
                step(sids, [5 + i] * b)
            torch.cuda.synchronize()
        evs = [e for e in prof.key_averages() if e.self_device_time_total > 0]
        evs.sort(key=lambda e: -e.self_device_time_total)
        total = sum(e.self_device_time_total for e in evs) / args.steps
        print(f"\n=== PAGED_GEMV_ROWS={limit}, B={b}, N={n}: {ms:.2f} ms a step; kernels {total / 1e3:.2f} ms a step ===")
        print(f"{'us/step':>9} {'calls/step':>10}  kernel")
        for e in evs[:args.top]:
            print(f"{e.self_device_time_total / args.steps:9.1f} {e.count / args.steps:10.1f}  {e.key[:110]}")
        for i in sids:
            bm.free(i)


if __name__ == "__main__":
    main()
