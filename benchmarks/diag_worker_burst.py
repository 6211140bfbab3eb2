"""Bursts of 8 concurrent requests on one fresh worker, with CUDA graphs (cuda_graph_tokens 8192)
and eager (0), the batcher's lone-request graph decode on, off, on: output tokens/s, TTFT, and the
batcher's counters per burst. Diagnostic (prints, no results file); Llama-3-8B shape, random bf16:
``python3 benchmarks/diag_worker_burst.py``."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.worker_gpu_bench import burst  # noqa: E402
from workers.model_loader import LLAMA3_8B, random_runner  # noqa: E402
from workers.model_spec import ModelSpec  # noqa: E402
from workers.worker_actor import Worker  # noqa: E402


def main() -> None:
    spec = ModelSpec(**LLAMA3_8B)
    r = random_runner(spec, "cuda", torch.bfloat16)
    for graphs in (8192, 0):
        w = Worker("w", {"channel": "inproc", "batching": True, "cuda_graph_tokens": graphs,
                         "gpu_bytes": 1 << 30, "kv_pool_bytes": 4 << 30}, runner=r)
        g = torch.Generator().manual_seed(0)
        try:
            for pool_decode in (True, False, True):
                w._batcher.pool_decode = pool_decode
                b0 = dict(w._batcher.snapshot())
                res = burst(w, 8, spec.vocab_size, g)
                b1 = w._batcher.snapshot()
                counts = {k: b1[k] - b0[k] for k in ("steps", "decode_steps", "solo_steps", "migrated", "prefills")}
                print(graphs, pool_decode, {k: round(v, 3) for k, v in res.items()}, counts, b1["batch_sizes"], flush=True)
        finally:
            w.shutdown()


if __name__ == "__main__":
    main()
