"""Bursts of 8 concurrent requests on one fresh worker, with CUDA graphs (cuda_graph_tokens 8192)
and eager (0), the batcher's lone-request graph decode on, off, on: output tokens/s, TTFT, and the
batcher's counters per burst. Diagnostic (prints, no results file); Llama-3-8B shape, random bf16:
``python3 benchmarks/diag_worker_burst.py [--order 0,8192] [--log]``; ``--log`` prints each CUDA
graph capture and, after each burst, the seconds torch.compile spent so far."""
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


def compile_seconds() -> float:
    try:
        from torch._dynamo.utils import compile_times
        per = compile_times(repr="csv")[1]
        return round(sum(float(x) for x in per if x), 2)  # a few torch versions: per-function totals
    except Exception:  # noqa: BLE001 - diagnostic only
        return float("nan")


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
        try:
            for pool_decode in (True, False, True):
                w._batcher.pool_decode = pool_decode
                b0 = dict(w._batcher.snapshot())
                res = burst(w, 8, spec.vocab_size, g)
                b1 = w._batcher.snapshot()
                counts = {k: b1[k] - b0[k] for k in ("steps", "decode_steps", "solo_steps", "migrated", "prefills")}
                print(graphs, pool_decode, {k: round(v, 3) for k, v in res.items()}, counts, b1["batch_sizes"],
                      "compile_s", compile_seconds() if args.log else "-", flush=True)
        finally:
            w.shutdown()


if __name__ == "__main__":
    main()
