#!/usr/bin/env python3
"""Where one prefill with reuse spends its GPU time (diagnostic: prints, writes no results file).

    python benchmarks/diag_reuse_profile.py --mode dhd --tokens 8192      # dhd r=.05, 98% reused
    python benchmarks/diag_reuse_profile.py --mode prefix --tokens 8192   # pooled prefix hit

Llama-3-8B shape, random bf16 weights, one GPU. Prints the median wall time of the prefill, the
host time before the one-token graph's launch (prefix mode), and the CUDA kernels sorted by time
(torch.profiler) over three prefills. The README's kernel breakdowns come from this script.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.reuse_gpu_bench import changed_plan  # noqa: E402
from index_service.plan import ReusePlan, ReuseSpan  # noqa: E402
from workers.engine import ReuseEngine, ReuseSettings  # noqa: E402
from workers.model_loader import LLAMA3_8B, random_runner  # noqa: E402
from workers.model_spec import ModelSpec  # noqa: E402
from workers.segments import InMemorySegmentStore  # noqa: E402


def setup(n: int, mode: str):
    spec = ModelSpec(**LLAMA3_8B)
    store = InMemorySegmentStore(max_bytes=64 << 30)
    eng = ReuseEngine(random_runner(spec, "cuda", torch.bfloat16), store, static_tokens=n + 64)
    ids = torch.randint(0, spec.vocab_size, (n,)).tolist()
    seq, _ = eng.prefill(ids, None, ReuseSettings(mode="full"), keep_segment=True)
    store.put(eng.segment_of(seq, "d"))
    if mode == "prefix":
        eng.pool_reuse = True
        return eng, ids, ReusePlan(n, [ReuseSpan(0, "d", 0, n)], prefix_len=n), ReuseSettings(mode="prefix")
    eng.pool_reuse = False
    plan, changed = changed_plan(n, 0.98, "d")
    new = list(ids)
    for p in np.nonzero(changed)[0]:
        new[p] = (ids[p] + 1) % spec.vocab_size
    return eng, new, plan, ReuseSettings(mode="dhd", recompute_ratio=0.05, decode_recompute=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--mode", choices=("dhd", "prefix"), default="dhd")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--rows", type=int, default=20, help="kernel table rows")
    a = ap.parse_args()
    eng, ids, plan, st = setup(a.tokens, a.mode)
    run = lambda: eng.prefill(ids, plan, st, keep_segment=False)  # noqa: E731
    for _ in range(3):
        run()
    launch = []
    if a.mode == "prefix":  # host time from the call to the graph's launch
        graph, real = eng._graph, eng._graph.__call__
        class Timed:  # noqa: E306
            def __call__(self, token, position):
                launch.append(time.perf_counter())
                return real(token, position)
        eng._graph = Timed()
    walls, starts = [], []
    for _ in range(10):
        torch.cuda.synchronize()
        starts.append(time.perf_counter())
        run()
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - starts[-1])
    line = f"{a.mode} n={a.tokens}: prefill {statistics.median(walls) * 1e3:.2f} ms"
    if launch:
        eng._graph = graph
        line += f", host work before the graph launch {statistics.median(l - s for l, s in zip(launch, starts)) * 1e3:.2f} ms"
    print(line)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            run()
        torch.cuda.synchronize()
    print("kernels over 3 prefills:")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=a.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
