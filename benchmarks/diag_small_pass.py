#!/usr/bin/env python3
"""The pieces of a short upper pass, timed alone (diagnostic: prints, writes no results file).

    python benchmarks/diag_small_pass.py [--only-subset] [--rows 64,128]
    python benchmarks/diag_small_pass.py --autotune [--rows 144,176,240]

Llama-3-8B shapes, bf16, one GPU. (1) Each linear layer of a layer (q/k/v, o, gate/up, down)
for token counts 16..256: time, weight-read bandwidth and TFLOP/s, to choose the token buckets of
graphed passes. (2) The split-key subset kernel at 1k and 4k keys with the number of key splits
forced, and with the merge kernel skipped where there is one split. (3) With --autotune: each
linear layer by cuBLAS against inductor's max-autotune choice (Triton templates and cuBLAS) for
the same static shape, and against the weight-read time at the measured copy bandwidth.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers import subset_attention  # noqa: E402


def graphed_us(fn, reps: int = 20) -> float:
    """Time of ``fn`` replayed as a CUDA graph of ``reps`` calls (no launch cost), per call."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (5 * reps)


SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 2 * 14336), "down": (14336, 4096)}


def weights() -> dict[str, torch.Tensor]:
    return {k: torch.randn(n, kin, device="cuda", dtype=torch.bfloat16) * 0.02 for k, (kin, n) in SHAPES.items()}


def row_list(default: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(x) for x in sys.argv[sys.argv.index("--rows") + 1].split(",")) if "--rows" in sys.argv else default


def autotuned() -> None:
    """cuBLAS vs inductor's max-autotune pick, per linear layer and row count."""
    import time

    from benchmarks.reuse_gpu_bench import hbm_bandwidth  # the bandwidth the benchmark's roofline uses
    ws, bw = weights(), hbm_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s; us per call: cuBLAS / max-autotune / weight read at that bandwidth")
    for m in row_list((144, 176, 240)):
        cells, layer = [], {"cublas": 0.0, "autotune": 0.0, "read": 0.0}
        for k, (kin, n) in SHAPES.items():
            x = torch.randn(m, kin, device="cuda", dtype=torch.bfloat16)
            w = ws[k]
            t0 = time.perf_counter()
            fn = torch.compile(lambda a, b: F.linear(a, b), mode="max-autotune-no-cudagraphs", dynamic=False)
            fn(x, w)
            tune_s = time.perf_counter() - t0
            got = {"cublas": graphed_us(lambda: F.linear(x, w)), "autotune": graphed_us(lambda: fn(x, w)),
                   "read": 2 * kin * n / bw * 1e6}
            for key, us in got.items():
                layer[key] += us
            cells.append(f"{k} {got['cublas']:6.1f} / {got['autotune']:6.1f} / {got['read']:6.1f} ({tune_s:.0f} s)")
            torch._dynamo.reset()
        print(f"  m={m:4d}  " + "  ".join(cells) +
              f"  layer {layer['cublas']:6.1f} / {layer['autotune']:6.1f} / {layer['read']:6.1f}", flush=True)


def linears() -> None:
    shapes, ws = SHAPES, weights()
    print("linear layers: us per call (weight-read TB/s)")
    print(f"{'tokens':>6} " + " ".join(f"{k:>16}" for k in shapes) + f" {'layer sum':>10}")
    rows = row_list((16, 32, 48, 64, 67, 80, 96, 112, 128, 144, 160, 165, 176, 192, 224, 233, 256))
    for m in rows:
        cells, total = [], 0.0
        for k, (kin, n) in shapes.items():
            x = torch.randn(m, kin, device="cuda", dtype=torch.bfloat16)
            us = graphed_us(lambda: F.linear(x, ws[k]))
            total += us
            cells.append(f"{us:8.1f} ({2 * kin * n / us / 1e6:4.2f})")
        print(f"{m:>6} " + " ".join(f"{c:>16}" for c in cells) + f" {total:>10.1f}")


# (keys per tile, warps, pipeline stages): the kernel's default first
TILINGS = ((64, 4, 2), (64, 4, 3), (64, 4, 4), (128, 4, 2), (128, 8, 2), (128, 8, 3), (32, 4, 3))


def subset_kernel() -> None:
    print("subset kernel (Hkv 8, g 4, d 128): us per call by key splits; default tiling, then the best "
          "(keys per tile, warps, stages)")
    for n in (1024, 4096):
        for m in (67, 128, 192, 256):
            k = torch.randn(8, n, 128, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)
            q = torch.randn(8, 4 * m, 128, device="cuda", dtype=torch.bfloat16)
            pos = torch.sort(torch.randperm(n, device="cuda")[:m]).values
            ends = subset_attention.block_ends(pos, 4)
            cells = []
            saved = (subset_attention.TARGET_PROGRAMS, subset_attention.MIN_KEYS_PER_SPLIT)
            for label, target, min_keys in (("default", *saved), ("1 split", 1, 1 << 30),
                                            ("2", 1 << 20, n // 2), ("4", 1 << 20, n // 4)):
                subset_attention.TARGET_PROGRAMS, subset_attention.MIN_KEYS_PER_SPLIT = target, max(64, min_keys)
                best = None
                for bn, warps, stages in TILINGS:
                    subset_attention.BLOCK_N, subset_attention.NUM_WARPS, subset_attention.NUM_STAGES = bn, warps, stages
                    us = graphed_us(lambda: subset_attention.attend_subset(q, k, v, pos, 0.088, ends))
                    if (bn, warps, stages) == TILINGS[0]:
                        cells.append(f"{label} {us:5.1f}")
                    if best is None or us < best[0]:
                        best = (us, bn, warps, stages)
                cells.append(f"best {best[0]:5.1f} {best[1:]}")
            subset_attention.TARGET_PROGRAMS, subset_attention.MIN_KEYS_PER_SPLIT = saved
            subset_attention.BLOCK_N, subset_attention.NUM_WARPS, subset_attention.NUM_STAGES = TILINGS[0]
            print(f"  n={n:5d} m={m:4d}  " + "  ".join(cells))


if __name__ == "__main__":
    print(torch.cuda.get_device_name())
    if "--autotune" in sys.argv:
        autotuned()
        sys.exit(0)
    if "--only-subset" not in sys.argv:
        linears()
    subset_kernel()
