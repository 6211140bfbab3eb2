"""The continuous batcher's decode step on one GPU: B sequences of N tokens each, one new token
each per step, over paged KV blocks (16 tokens per block). Llama-3-8B shape, random bf16 weights.

    python benchmarks/paged_decode_gpu_bench.py --out benchmarks/results/paged_decode_gpu.json

Per (B, N), ms per step, median of ``--steps`` steps after two warm-up steps, for:
- eager, gather: the step launched op by op, each layer gathering the blocks into a padded copy
  for SDPA (the path before the kernel; ``KVCLUSTER_PAGED_KERNEL=0``);
- eager, kernel: op by op, attention read straight from the blocks (workers/paged_attention.py);
- graph, gather / graph, kernel: the same replayed as a CUDA graph (``GraphedPagedStep``), the
  linears on cuBLAS at every row count (``KVCLUSTER_PAGED_GEMV_ROWS=0``);
- graph, kernel + GEMV: in the graph, up to 16 rows, the linears as GEMV kernels with the norm,
  SiLU x up and residual folded in, K/V written by the q/k/v kernel (``KVCLUSTER_PAGED_GEMV_ROWS=16``,
  the default).
Against the limit: the weights (and LM head) read once plus every sequence's K/V read once, over
the device-to-device copy bandwidth measured in the same run. Output tokens/s = B / step time.
Needs torch and triton only.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.reuse_gpu_bench import hbm_bandwidth, weight_read_bytes  # noqa: E402
import workers.paged_decode as pd  # noqa: E402
from workers.block_manager import BlockManager  # noqa: E402
from workers.model_loader import LLAMA3_8B, random_runner  # noqa: E402
from workers.model_spec import ModelSpec  # noqa: E402

PATHS = {"eager, gather": (False, False, False), "eager, kernel": (False, True, False),
         "graph, gather": (True, False, False), "graph, kernel": (True, True, False),
         "graph, kernel + GEMV": (True, True, True)}


def time_steps(step, sids: list[int], steps: int) -> float:
    times = []
    for i in range(steps + 2):
        torch.cuda.synchronize()
        t = time.perf_counter()
        logits = step(sids, [3 + i] * len(sids))
        logits.argmax(-1).tolist()  # the batcher reads the tokens back every step
        if i >= 2:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,4,8,16")
    ap.add_argument("--lengths", default="1024,4096")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--layers", type=int, default=None, help="override layer count (smoke runs)")
    ap.add_argument("--out", default="benchmarks/results/paged_decode_gpu.json")
    args = ap.parse_args()
    cfg = dict(LLAMA3_8B)
    if args.layers:
        cfg["num_layers"] = args.layers
    spec = ModelSpec(**cfg)
    bw = hbm_bandwidth()
    r = random_runner(spec, "cuda", torch.bfloat16)
    batches, lengths = [int(x) for x in args.batches.split(",")], [int(x) for x in args.lengths.split(",")]
    per_seq = max(lengths) + args.steps + 8
    bm = BlockManager(r, max(batches) * (per_seq // 16 + 2) + 1, 16)
    for x in (bm.k, bm.v):
        x.normal_()  # real-looking KV, not zeros
    graphed = pd.GraphedPagedStep(r, bm, max(batches), per_seq)
    s = spec
    weight_bytes = weight_read_bytes(s)
    kv_per_token = 2 * s.num_layers * s.kv_size * 2
    rows, defaults = [], pd.PAGED_GEMV_ROWS
    for n in lengths:
        for b in batches:
            row = {"batch": b, "tokens": n, "limit_ms": (weight_bytes + b * (n + args.steps) * kv_per_token) / bw * 1e3}
            for name, (graph, kernel, gemv) in PATHS.items():
                pd.PAGED_KERNEL, pd.PAGED_GEMV_ROWS = kernel, 16 if gemv else 0
                graphed.graphs.clear()  # the switch is read at capture; a fresh pool for the new graphs
                graphed.mempool = None
                sids = list(range(b))
                for i in sids:
                    bm.allocate(i, n)
                step = graphed if graph else (lambda ids, toks: pd.paged_decode_step(r, bm, ids, toks))
                row[name] = time_steps(step, sids, args.steps) * 1e3
                for i in sids:
                    bm.free(i)
            rows.append(row)
            print(json.dumps(row), flush=True)
    pd.PAGED_KERNEL, pd.PAGED_GEMV_ROWS = True, defaults
    out = {"benchmark": "paged_decode_gpu", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
           "device": torch.cuda.get_device_name(), "host": platform.node(), "torch": torch.__version__,
           "model": {**cfg, "dtype": "bfloat16", "weights": "random"}, "block_size": 16,
           "hbm_copy_bandwidth_tbps": bw / 1e12, "weight_read_ms": weight_bytes / bw * 1e3, "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"\n{out['device']}, {bw / 1e12:.2f} TB/s; ms per decode step (fraction of the limit); tok/s of the last path")
    print(f"{'B':>3s} {'tokens':>6s} {'limit':>6s} " + " ".join(f"{p:>20s}" for p in PATHS) + f" {'tok/s':>7s}")
    last = list(PATHS)[-1]
    for row in rows:
        cells = " ".join(f"{row[p]:8.2f} ({row['limit_ms'] / row[p]:4.2f})     " for p in PATHS)
        print(f"{row['batch']:3d} {row['tokens']:6d} {row['limit_ms']:6.2f} {cells} {row['batch'] / row[last] * 1e3:7.0f}")


if __name__ == "__main__":
    main()
