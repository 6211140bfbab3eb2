"""Bursts of 8 concurrent requests on one fresh worker, with CUDA graphs (cuda_graph_tokens 8192)
and eager (0), the batcher's lone-request graph decode on, off, on: output tokens/s, TTFT, and the
batcher's counters per burst. Diagnostic (prints, no results file); Llama-3-8B shape, random bf16:
``python3 benchmarks/diag_worker_burst.py [--order 0,8192] [--log]``; ``--log`` prints each CUDA
graph capture and the time of the first batcher steps and prefills of each burst."""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.worker_gpu_bench import burst  # noqa: E402
from workers.model_loader import LLAMA3_8B, random_runner  # noqa: E402
from workers.model_spec import ModelSpec  # noqa: E402
from workers.worker_actor import Worker  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--order", default="8192,0", help="cuda_graph_tokens of the workers, in order")
    ap.add_argument("--log", action="store_true")
    args = ap.parse_args()
    if args.log:
        logging.basicConfig(level=logging.INFO, format="%(relativeCreated)8.0f ms %(name)s: %(message)s")
        logging.getLogger("workers.cuda_graph").setLevel(logging.DEBUG)
    spec = ModelSpec(**LLAMA3_8B)
    r = random_runner(spec, "cuda", torch.bfloat16)
    for graphs in (int(x) for x in args.order.split(",")):
        t0 = time.perf_counter()
        w = Worker("w", {"channel": "inproc", "batching": True, "cuda_graph_tokens": graphs,
                         "gpu_bytes": 1 << 30, "kv_pool_bytes": 4 << 30}, runner=r)
        print(f"worker with cuda_graph_tokens={graphs} up in {time.perf_counter() - t0:.2f} s", flush=True)
        g = torch.Generator().manual_seed(0)
        steps: list[str] = []
        if args.log:  # time each batcher step and each prefill inside it
            b, eng = w._batcher, w.engine
            real_step, real_prefill = b.step, eng.prefill

            def timed_prefill(*a, **k):
                t = time.perf_counter()
                out = real_prefill(*a, **k)
                steps.append(f"p{(time.perf_counter() - t) * 1e3:.0f}")
                return out

            def timed_step():
                t = time.perf_counter()
                out = real_step()
                steps.append(f"S{(time.perf_counter() - t) * 1e3:.0f}")
                return out
            b.step, eng.prefill = timed_step, timed_prefill
        try:
            for pool_decode in (True, False, True):
                w._batcher.pool_decode = pool_decode
                steps.clear()
                b0 = dict(w._batcher.snapshot())
                res = burst(w, 8, spec.vocab_size, g)
                b1 = w._batcher.snapshot()
                counts = {k: b1[k] - b0[k] for k in ("steps", "decode_steps", "solo_steps", "migrated", "prefills")}
                print(graphs, pool_decode, {k: round(v, 3) for k, v in res.items()}, counts, b1["batch_sizes"],
                      flush=True)
                if args.log:
                    print("  first steps, ms (p: a prefill inside the step S that follows):", " ".join(steps[:24]))
        finally:
            w.shutdown()


if __name__ == "__main__":
    main()
