"""Does a worker reuse a segment it stored? One in-process Worker on this machine's device (tiny
random model): a donor request writes a segment, then an exact-prefix request names it in its plan;
prints the prefill event (reused tokens, fetch, fallback) per tier setting. Diagnostic, no results
file: ``python3 benchmarks/diag_worker_reuse.py [--dtype bfloat16]``."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from index_service.plan import ReusePlan, ReuseSpan  # noqa: E402
from workers.model_loader import random_runner, pick_device  # noqa: E402
from workers.model_spec import ModelSpec  # noqa: E402
from workers.scheduler import plan_to_wire  # noqa: E402
from workers.worker_actor import Worker  # noqa: E402

SPEC = ModelSpec(vocab_size=1000, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=2,
                 head_dim=32, intermediate_size=512, max_position=4096)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--n", type=int, default=300)
    a = ap.parse_args()
    logging.basicConfig(level=logging.DEBUG, format="%(name)s %(levelname)s %(message)s")
    for noisy in ("torch", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    dev = pick_device("auto")
    r = random_runner(SPEC, str(dev), getattr(torch, a.dtype), seed=3, std=0.1)
    doc = torch.randint(2, SPEC.vocab_size, (a.n,), generator=torch.Generator().manual_seed(1)).tolist()
    plan = ReusePlan(a.n, [ReuseSpan(0, "doc", 0, a.n)], prefix_len=a.n)
    wire = plan_to_wire(plan)
    for opts in ({"gpu_bytes": 64 << 20}, {"gpu_bytes": 0}, {"gpu_bytes": 64 << 20, "cuda_graph_tokens": 0},
                 {"gpu_bytes": 64 << 20, "batching": False}):
        w = Worker("w", dict(opts, channel="inproc", host_bytes=64 << 20), runner=r)
        try:
            w.generate({"token_ids": doc, "max_tokens": 2, "mode": "full", "segment_id": "doc"})
            seg = w.segments.get("doc")
            print(opts, "stored segment:", None if seg is None else (tuple(seg.keys.shape), seg.keys.dtype,
                  str(seg.keys.device)), "tiers:", {t: getattr(w.tiers, t).used_bytes for t in ("gpu", "host")
                  if getattr(w.tiers, t, None) is not None}, "bad:", w.segments.bad_segments)
            out = w.generate({"token_ids": doc, "max_tokens": 2, "mode": "prefix", "plan": wire})
            p = out["prefill"]
            print(opts, "reused", p["reused_tokens"], "fallback", p["fallback"], "fetch", p["fetch"], flush=True)
        finally:
            w.shutdown()


if __name__ == "__main__":
    main()
