"""What a caller of the worker gets on one GPU: ``Worker.generate`` in process, Llama-3-8B shape,
random bf16 weights, with the engine's static KV pool and CUDA graphs (``cuda_graph_tokens`` 8192,
the default) and without them (0, the engine eager), each with and without continuous batching.

    python benchmarks/worker_gpu_bench.py --out benchmarks/results/worker_gpu.json

Per prompt length, one request at a time: TTFT at the worker (validation, plan, donor fetch from
the worker's tiers, prefill) of a full prefill, an exact-prefix hit on a donor segment the worker
stored, and dhd (r = 0.15) with 90% of the prompt reused; time per output token of the full
request's 32 tokens. Then K concurrent requests (1k-token prompts, 64 new tokens each): output
tokens/s over the burst, the worker's first burst and then the same again (the table: the second). Needs torch, numpy, xxhash, msgpack (no Ray/Redis/Qdrant).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.reuse_gpu_bench import changed_plan, hbm_bandwidth, weight_read_bytes  # noqa: E402
from index_service.plan import ReusePlan, ReuseSpan  # noqa: E402
from workers.model_loader import LLAMA3_8B, random_runner  # noqa: E402
from workers.model_spec import ModelSpec  # noqa: E402
from workers.scheduler import plan_to_wire as wire  # noqa: E402
from workers.worker_actor import Worker  # noqa: E402

CONFIGS = {"graphs, unbatched": (8192, False), "eager, unbatched": (0, False),
           "graphs, batched": (8192, True), "eager, batched": (0, True)}


def one_request_cases(w: Worker, n: int, vocab: int, reps: int, gen: torch.Generator) -> dict:
    doc = torch.randint(2, vocab, (n,), generator=gen).tolist()
    other = torch.randint(2, vocab, (n,), generator=gen).tolist()
    w.generate({"token_ids": doc, "max_tokens": 1, "mode": "full", "segment_id": f"doc{n}"})
    plan, changed = changed_plan(n, 0.90, f"doc{n}")
    edited = [(t + 1) % vocab if c else t for t, c in zip(doc, changed)]
    exact = ReusePlan(n, [ReuseSpan(0, f"doc{n}", 0, n)], prefix_len=n)
    cases = {  # in this order each rep, so no case finds its own prompt's KV left in the pool
        "dhd_r0.15@90%": {"token_ids": edited, "plan": wire(plan), "mode": "dhd", "max_tokens": 1},
        "full": {"token_ids": other, "mode": "full", "max_tokens": 33},
        "prefix_hit": {"token_ids": doc, "plan": wire(exact), "mode": "prefix", "max_tokens": 1},
    }
    out: dict[str, list] = {k: [] for k in cases}
    for rep in range(reps + 1):  # the first round warms up (graph captures, compiles)
        for name, req in cases.items():
            res = w.generate(dict(req, stop_ids=[]))
            if rep:
                out[name].append(res)
    row = {}
    for name, results in out.items():
        pre = [r["prefill"] for r in results]
        row[name] = {"ttft_ms": statistics.median(p["worker_ttft_s"] for p in pre) * 1e3,
                     "prefill_ms": statistics.median(p["prefill_s"] for p in pre) * 1e3,
                     "reused": pre[0]["reused_tokens"], "recomputed": pre[0]["recomputed_tokens"]}
        if name == "full":
            row[name]["tpot_ms"] = statistics.median(r["done"]["decode_s"] / 32 for r in results) * 1e3
    w.segments.evict(f"doc{n}")
    return row


def burst(w: Worker, k: int, vocab: int, gen: torch.Generator, n: int = 1024, new: int = 64) -> dict:
    reqs = [{"token_ids": torch.randint(2, vocab, (n,), generator=gen).tolist(), "max_tokens": new,
             "mode": "full", "stop_ids": []} for _ in range(k)]
    got: list = [None] * k
    go = threading.Barrier(k + 1)

    def call(i):
        go.wait()
        got[i] = w.generate(reqs[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(k)]
    for t in threads:
        t.start()
    go.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    span = time.perf_counter() - t0
    ttfts = sorted(g["prefill"]["worker_ttft_s"] for g in got)
    return {"k": k, "tokens_per_s": sum(len(g["token_ids"]) for g in got) / span, "makespan_s": span,
            "ttft_p50_ms": ttfts[len(ttfts) // 2] * 1e3, "ttft_max_ms": ttfts[-1] * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="1024,4096")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--burst", default="8", help="concurrent requests per burst (comma-separated)")
    ap.add_argument("--layers", type=int, default=None, help="override layer count (smoke runs)")
    ap.add_argument("--out", default="benchmarks/results/worker_gpu.json")
    args = ap.parse_args()
    cfg = dict(LLAMA3_8B)
    if args.layers:
        cfg["num_layers"] = args.layers
    spec = ModelSpec(**cfg)
    bw = hbm_bandwidth()
    runner = random_runner(spec, "cuda", torch.bfloat16)  # shared: the workers run one at a time
    s = spec  # a one-token step reads every layer's weights and the LM head once
    weight_bytes = weight_read_bytes(s)
    results = {}
    for name, (graph_tokens, batching) in CONFIGS.items():
        w = Worker(name.replace(", ", "-"), {"channel": "inproc", "batching": batching, "cuda_graph_tokens": graph_tokens,
                                             "gpu_bytes": 4 << 30, "kv_pool_bytes": 4 << 30,
                                             "reuse": {"recompute_ratio": 0.15, "decode_recompute": 0}}, runner=runner)
        gen = torch.Generator().manual_seed(0)
        try:
            res = {str(n): one_request_cases(w, n, spec.vocab_size, args.reps, gen) for n in map(int, args.lengths.split(","))}
            # the first burst of a worker can be slower (graphs for new batch/width buckets are
            # captured inside it; a cold process also compiles): reported, then again, warm
            res["bursts"] = [dict(burst(w, int(k), spec.vocab_size, gen), round=i)
                             for k in args.burst.split(",") for i in ("first", "warm")]
        finally:
            w.shutdown()
        results[name] = res
        print(name, json.dumps(res), flush=True)
    out = {"benchmark": "worker_gpu", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
           "device": torch.cuda.get_device_name(), "host": platform.node(), "torch": torch.__version__,
           "model": {**cfg, "dtype": "bfloat16", "weights": "random"}, "hbm_copy_bandwidth_tbps": bw / 1e12,
           "weight_read_ms": weight_bytes / bw * 1e3, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"\n{out['device']}, weights read once: {out['weight_read_ms']:.2f} ms at {bw / 1e12:.2f} TB/s")
    lengths = args.lengths.split(",")
    print(f"{'config':20s} " + " ".join(f"{n + ' ' + c:>18s}" for n in lengths for c in ("full", "prefix", "dhd90"))
          + f" {'TPOT':>6s} {'burst tok/s':>12s}")
    for name, res in results.items():
        cells = [res[n][c]["ttft_ms"] for n in lengths for c in ("full", "prefix_hit", "dhd_r0.15@90%")]
        print(f"{name:20s} " + " ".join(f"{x:18.1f}" for x in cells)
              + f" {res[lengths[0]]['full']['tpot_ms']:6.2f} {res['bursts'][-1]['tokens_per_s']:12.0f}")


if __name__ == "__main__":
    main()
