"""TTFT vs offered load on one GPU (engine only, no Ray): KVShare's TTFT-vs-QPS curve.

    python benchmarks/qps_gpu_bench.py --out benchmarks/results/qps_gpu.json

A Llama-3-8B-shaped model with random bf16 weights serves a Poisson stream of requests in
arrival order, one prefill at a time (a single FCFS server, as one GPU worker without batching).
Requests come in families as in the real workloads: a donor prompt, then follow-ups that reuse
90% of it in another arrangement (moved chunks, a changed question). TTFT = queueing + prefill.
Modes: full, prefix (exact prefix caching only), cacheblend and dhd (r = 0.15). Needs only torch,
numpy, xxhash, rapidfuzz (for the alignment).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from index_service.align import align  # noqa: E402
from workers.engine import ReuseEngine, ReuseSettings  # noqa: E402
from workers.model_loader import LLAMA3_8B, random_runner  # noqa: E402
from workers.model_spec import ModelSpec  # noqa: E402
from workers.segments import InMemorySegmentStore  # noqa: E402

MODES = {"full": ReuseSettings(mode="full"),
         "prefix": ReuseSettings(mode="prefix"),
         "cacheblend": ReuseSettings(mode="cacheblend", recompute_ratio=0.15, decode_recompute=0),
         "dhd": ReuseSettings(mode="dhd", recompute_ratio=0.15, decode_recompute=0)}


def make_requests(n_families: int, followups: int, tokens: int, vocab: int, seed: int) -> list[list[int]]:
    """Donor then follow-ups: the donor's chunks shuffled, a new question appended."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_families):
        chunks = [rng.integers(0, vocab, tokens // 8).tolist() for _ in range(8)]
        out.append([t for c in chunks for t in c] + rng.integers(0, vocab, 32).tolist())
        for _ in range(followups):
            order = rng.permutation(8)
            body = [t for i in order for t in chunks[i]]
            keep = int(len(body) * 0.9)
            out.append(body[:keep] + rng.integers(0, vocab, len(body) - keep + 32).tolist())
    return out


def serve(engine: ReuseEngine, reqs: list[list[int]], arrivals: np.ndarray, st: ReuseSettings,
          prefix: bool) -> dict:
    engine.store = InMemorySegmentStore(max_bytes=200 << 30)
    donors: list[tuple[str, list[int]]] = []
    ttft, busy_until, t0 = [], 0.0, time.perf_counter()
    for i, (ids, at) in enumerate(zip(reqs, arrivals)):
        now = time.perf_counter() - t0
        if now < at:
            time.sleep(at - now)
        start = time.perf_counter() - t0
        plan = None
        if st.mode != "full" and donors:
            plan = align(ids, donors[-4:][::-1])
            if prefix and plan.prefix_len == 0:
                plan = None
        seq, _ = engine.prefill(ids, plan, st, keep_segment=True)
        torch.cuda.synchronize()
        done = time.perf_counter() - t0
        ttft.append(done - at)
        engine.store.put(engine.segment_of(seq, f"r{i}"))
        donors.append((f"r{i}", ids))
        busy_until = done
        del seq, start
    ttft_a = np.array(ttft)
    return {"ttft_p50_ms": float(np.percentile(ttft_a, 50) * 1e3), "ttft_p99_ms": float(np.percentile(ttft_a, 99) * 1e3),
            "ttft_mean_ms": float(ttft_a.mean() * 1e3), "duration_s": busy_until, "requests": len(reqs)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--qps", default="1,2,4,6,8")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--families", type=int, default=8)
    ap.add_argument("--followups", type=int, default=4)
    ap.add_argument("--out", default="benchmarks/results/qps_gpu.json")
    args = ap.parse_args()
    spec = ModelSpec(**LLAMA3_8B)
    engine = ReuseEngine(random_runner(spec, "cuda", torch.bfloat16), InMemorySegmentStore())
    reqs = make_requests(args.families, args.followups, args.tokens, spec.vocab_size, seed=0)
    for st in MODES.values():  # warm-up of every path (kernels, compiled pieces)
        serve(engine, reqs[:3], np.zeros(3), st, st.mode == "prefix")
    rows = []
    for qps in [float(q) for q in args.qps.split(",")]:
        arrivals = np.cumsum(np.random.default_rng(1).exponential(1 / qps, len(reqs)))
        for name, st in MODES.items():
            r = serve(engine, reqs, arrivals, st, name == "prefix")
            rows.append({"qps": qps, "mode": name, **r})
            print(f"qps {qps:>4} {name:<10} p50 {r['ttft_p50_ms']:8.1f} ms  p99 {r['ttft_p99_ms']:8.1f} ms", flush=True)
    result = {"benchmark": "qps_gpu", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
              "device": torch.cuda.get_device_name(), "host": platform.node(),
              "model": {**LLAMA3_8B, "dtype": "bfloat16", "weights": "random"},
              "workload": {"tokens": args.tokens, "families": args.families, "followups": args.followups,
                           "reuse": "follow-ups: donor's 8 chunks shuffled, 90% kept, new tail"},
              "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\n{result['device']}: TTFT p50 / p99 (ms) per offered QPS")
    print(f"{'qps':>5} " + " ".join(f"{m:>20}" for m in MODES))
    for qps in sorted({r["qps"] for r in rows}):
        cells = [next(r for r in rows if r["qps"] == qps and r["mode"] == m) for m in MODES]
        print(f"{qps:>5} " + " ".join(f"{c['ttft_p50_ms']:>9.0f} / {c['ttft_p99_ms']:>8.0f}" for c in cells))


if __name__ == "__main__":
    main()
