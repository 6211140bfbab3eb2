"""Soak: bounded memory under sustained load on a local Ray cluster.

What runs: ``KVClusterServer`` (the Serve ingress class, driven in-process through its ``submit``
method, no HTTP) -> ``RayCluster`` (2 worker actors + the index actor over embedded Qdrant in
memory, MiniLM embedder) with a real Redis tier on our own redis-server (``--maxmemory`` with LRU
eviction, own port, killed at the end). The model is the tiny random-weight Llama of
``tests/reliability/harness.py`` (SmolLM2 tokenizer), so requests cost milliseconds; quality is not
measured. Requests come from a fixed pool of prompts (3-4 of 8 documents in random order + one of
6 questions, 3 tenants, some public), ``--concurrency`` in flight, for ``--minutes``.

Sampled every ``--sample-s``: each worker's host-tier bytes against its budget, Redis
``used_memory`` against ``maxmemory``, RSS of the driver, of each worker actor and of the index
actor. Pass: every tier <= budget * 1.05 at every sample; every process's RSS at the end within
+5% of its RSS at the end of warm-up (``--warmup-min``), taking the median of the last/first 5
samples to ignore one-off spikes.

    RAY_AUTH_MODE=disabled nohup python benchmarks/soak_memory.py --minutes 22 > /tmp/soak.log 2>&1 &
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.reliability.harness import DOCS, QUESTIONS, RedisProc, tiny_model_dir  # noqa: E402


def prompt_pool(n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    rng = np.random.default_rng(seed)
    tenants = ["acme", "globex", "initech"]
    out = []
    for i in range(n):
        k = int(rng.integers(3, 5))
        idx = rng.choice(len(DOCS), size=k, replace=False)
        text = " ".join(DOCS[j] for j in idx) + "\nQuestion: " + QUESTIONS[rng.integers(len(QUESTIONS))]
        share = "public" if rng.random() < 0.2 else "private"
        out.append((text, tenants[i % 3], share))
    return out


def rss(pid: int | None) -> int | None:
    try:
        return psutil.Process(pid).memory_info().rss if pid else None
    except psutil.Error:
        return None


async def main_async(args) -> dict:
    import ray

    from kvcluster.serve_app import KVClusterServer

    model = tiny_model_dir()
    redis = RedisProc(maxmemory=args.redis_bytes).start()
    prefix = f"kvsoak-{uuid.uuid4().hex[:8]}:"
    cfg = {"model": {"name": str(model), "max_context": 2048},
           "cluster": {"num_workers": args.workers},
           "serve": {"max_tokens_limit": 64, "max_queue": 64},
           "index": {"qdrant_path": ":memory:"},
           "tiers": {"redis_url": redis.url, "redis_prefix": prefix, "redis_ttl_s": 3600,
                     "host_bytes": args.host_bytes}}
    ray.init(num_cpus=args.workers + 1, include_dashboard=False, log_to_driver=False)
    server = None
    samples: list[dict] = []
    counts = {"ok": 0, "failed": 0, "reused": 0}
    errors: list[str] = []
    try:
        server = KVClusterServer(cfg, {"worker_num_cpus": 1})
        cl = server.cluster
        wpids = {w: i["pid"] for w, i in cl.infos.items()}
        ipid = ray.get(cl.index_actor.__ray_call__.remote(lambda self: os.getpid()))
        pool = prompt_pool(args.pool)
        t_end = time.monotonic() + args.minutes * 60
        t0 = time.monotonic()

        async def client(c: int) -> None:
            r = np.random.default_rng(100 + c)
            while time.monotonic() < t_end:
                text, tenant, share = pool[int(r.integers(len(pool)))]
                try:
                    res = await server.submit({"prompt": text, "max_tokens": args.max_tokens, "tenant": tenant,
                                               "share": share, "temperature": 0.0})
                    counts["ok"] += 1
                    counts["reused"] += res["reused_tokens"] > 0
                except Exception as e:  # noqa: BLE001
                    counts["failed"] += 1
                    if len(errors) < 20:
                        errors.append(f"{type(e).__name__}: {e}")

        async def sampler() -> None:
            while time.monotonic() < t_end:
                stats = await cl.worker_stats(timeout_s=10)
                n_ix = await cl.index_actor.__ray_call__.remote(lambda self: len(self))
                mem = redis.info("memory")
                samples.append({
                    "t_s": round(time.monotonic() - t0, 1), "requests": counts["ok"], "failed": counts["failed"],
                    "host_bytes": {w: s["tier_used_bytes"].get("host", 0) for w, s in stats.items()},
                    "host_evictions": {w: s["tiers"].get("host", {}).get("evictions", 0) for w, s in stats.items()},
                    "redis_used_memory": mem["used_memory"], "redis_dataset_bytes": mem.get("used_memory_dataset"),
                    "redis_evicted_keys": redis.info("stats")["evicted_keys"],
                    "rss": {"driver": rss(os.getpid()), "index": rss(ipid), **{w: rss(p) for w, p in wpids.items()}},
                    "index_segments": n_ix,
                })
                print(json.dumps(samples[-1]), flush=True)
                await asyncio.sleep(args.sample_s)

        await asyncio.gather(sampler(), *[client(c) for c in range(args.concurrency)])
    finally:
        if server is not None:
            server.cluster.shutdown()
        ray.shutdown()
        redis.stop()

    # ---- verdict ----
    host_budget, redis_budget = args.host_bytes, args.redis_bytes
    host_max = max(max(s["host_bytes"].values(), default=0) for s in samples)
    redis_max = max(s["redis_used_memory"] for s in samples)
    warm = [s for s in samples if s["t_s"] >= args.warmup_min * 60]
    procs = sorted(samples[-1]["rss"])
    growth = {}
    for p in procs:
        first = [s["rss"][p] for s in warm[:5] if s["rss"].get(p)]
        last = [s["rss"][p] for s in warm[-5:] if s["rss"].get(p)]
        if first and last:
            a, b = statistics.median(first), statistics.median(last)
            growth[p] = {"after_warmup_mib": round(a / 2**20, 1), "end_mib": round(b / 2**20, 1),
                         "growth_pct": round(100 * (b - a) / a, 2)}
    duration = samples[-1]["t_s"] if samples else 0
    return {
        "benchmark": "soak_memory", "date": dt.datetime.now().isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv), "machine": f"{platform.node()} {psutil.cpu_count()} CPUs, "
        f"{round(psutil.virtual_memory().total / 2**30)} GiB (shared)",
        "model": "tiny random Llama (4 layers, hidden 64, SmolLM2 tokenizer)", "args": vars(args),
        "duration_s": duration, "requests_ok": counts["ok"], "requests_failed": counts["failed"],
        "requests_with_reuse": counts["reused"], "errors": errors,
        "index_segments": {"after_warmup": warm[0]["index_segments"] if warm else None,
                           "end": samples[-1]["index_segments"] if samples else None},
        "host_tier": {"budget_bytes": host_budget, "max_used_bytes": host_max,
                      "max_over_budget": round(host_max / host_budget, 4),
                      "evictions_end": samples[-1]["host_evictions"]},
        "redis": {"maxmemory": redis_budget, "max_used_memory": redis_max,
                  "max_over_budget": round(redis_max / redis_budget, 4),
                  "evicted_keys_end": samples[-1]["redis_evicted_keys"]},
        "rss": growth,
        "pass": {"tiers_within_5pct": host_max <= 1.05 * host_budget and redis_max <= 1.05 * redis_budget,
                 "rss_growth_within_5pct": all(g["growth_pct"] <= 5.0 for g in growth.values()),
                 "no_failed_requests": counts["failed"] == 0},
        "samples": samples,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=22.0)
    ap.add_argument("--warmup-min", type=float, default=5.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--pool", type=int, default=400)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--host-bytes", type=int, default=4 << 20)
    ap.add_argument("--redis-bytes", type=int, default=24 << 20)
    ap.add_argument("--sample-s", type=float, default=15.0)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "soak_memory.json"))
    args = ap.parse_args()
    res = asyncio.run(main_async(args))
    Path(args.out).write_text(json.dumps(res, indent=1))
    summary = {k: v for k, v in res.items() if k != "samples"}
    print(json.dumps(summary, indent=1))
    return 0 if all(res["pass"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
