"""Where the worker's donor fetch goes: a worker (Llama-3-8B shape, random bf16, CUDA graphs) stores
a donor, then a prefix hit on it is asked again and again; per prompt length this prints the
worker's TTFT, the engine's prefill inside it, the fetch (``fetch_s``), and the fetch taken apart
(manifest read, the tiers' ``get_many`` with its device checksums, the block checks, the join),
each stage ending in a device sync, then the top of a cProfile of the fetch.
Diagnostic (prints, no results file): ``python3 benchmarks/diag_donor_fetch.py [--lengths 1024,4096]``.
Runs on CPU too (``--device cpu --layers 4``) as a smoke test."""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from index_service.plan import ReusePlan, ReuseSpan  # noqa: E402
from transport.block import join_blocks  # noqa: E402
from transport.checksum import device_checksums, run_sums  # noqa: E402
from workers.model_loader import LLAMA3_8B, random_runner  # noqa: E402
from workers.model_spec import ModelSpec  # noqa: E402
from workers.scheduler import plan_to_wire as wire  # noqa: E402
from workers.worker_actor import Worker  # noqa: E402


def timed(device: str, fn, *a):
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn(*a)
    if device == "cuda":
        torch.cuda.synchronize()
    return out, (time.perf_counter() - t) * 1e3


def stages(w: Worker, sid: str, device: str) -> dict[str, float]:
    s = w.segments
    m, t_man = timed(device, s._manifest, sid)
    keys = s._block_keys(sid, m["n_blocks"])
    blocks, t_get = timed(device, s.store.get_many, keys)
    ids = np.frombuffer(m["token_ids"], dtype="<i4").astype(np.int32)
    ok, t_chk = timed(device, s._consistent, m, blocks, ids)
    assert ok, "the donor's blocks do not match its manifest"
    _, t_join = timed(device, join_blocks, blocks)
    _, t_all = timed(device, s.get, sid)
    ts = [b.keys for b in blocks] + [b.values for b in blocks]
    _, t_one = timed(device, lambda: torch.cat([run_sums(t) for t in ts]).cpu())  # before strided runs
    _, t_runs = timed(device, device_checksums, ts)
    return {"manifest": t_man, "get_many": t_get, "checks": t_chk, "join": t_join, "segments.get": t_all,
            "sums, per tensor": t_one, "sums, runs": t_runs}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="1024,4096")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=None)
    args = ap.parse_args()
    cfg = dict(LLAMA3_8B)
    if args.layers:
        cfg["num_layers"] = args.layers
    spec = ModelSpec(**cfg)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    r = random_runner(spec, args.device, dtype)
    w = Worker("w", {"channel": "inproc", "batching": False, "gpu_bytes": 4 << 30,
                     "kv_pool_bytes": 4 << 30, "cuda_graph_tokens": 8192 if args.device == "cuda" else 0}, runner=r)
    g = torch.Generator().manual_seed(0)
    rows = []
    for n in (int(x) for x in args.lengths.split(",")):
        sid = f"doc{n}"
        doc = torch.randint(2, spec.vocab_size, (n,), generator=g).tolist()
        w.generate({"token_ids": doc, "max_tokens": 1, "mode": "full", "segment_id": sid})
        req = {"token_ids": doc, "plan": wire(ReusePlan(n, [ReuseSpan(0, sid, 0, n)], prefix_len=n)),
               "mode": "prefix", "max_tokens": 1, "stop_ids": []}
        ev = [w.generate(dict(req))["prefill"] for _ in range(args.reps + 1)][1:]
        med = {k: statistics.median(e[k] for e in ev) * 1e3 for k in ("worker_ttft_s", "prefill_s")}
        med["fetch_s"] = statistics.median(e["fetch"]["fetch_s"] for e in ev) * 1e3
        assert all(e["reused_tokens"] >= n - 1 for e in ev), "the prefix hit reused less than the prompt"
        parts = [stages(w, sid, args.device) for _ in range(args.reps)]
        st = {k: statistics.median(p[k] for p in parts) for k in parts[0]}
        rows.append((n, med, st))
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.reps):
            w.segments.get(sid)
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(14)
        print(f"--- cProfile of {args.reps} segments.get, {n} tokens ---")
        print(buf.getvalue().split("\n", 6)[-1][:4000], flush=True)
        w.segments.evict(sid)
    cols = ("manifest", "get_many", "checks", "join", "segments.get", "sums, per tensor", "sums, runs")
    print(f"ms, medians of {args.reps}; {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}")
    print("| tokens | worker TTFT | prefill | fetch_s | " + " | ".join(cols) + " |")
    print("|---" * (4 + len(cols)) + "|")
    for n, med, st in rows:
        print(f"| {n} | {med['worker_ttft_s']:.2f} | {med['prefill_s']:.2f} | {med['fetch_s']:.2f} | "
              + " | ".join(f"{st[k]:.2f}" for k in cols)
              + " |")


if __name__ == "__main__":
    main()
