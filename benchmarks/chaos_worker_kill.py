"""Chaos: worker actors killed at random points (fetch, DHD prefill, decode) while a bounded loop of
requests runs through the real Router on a local Ray cluster; every request must come back once,
whole.

Cluster: ``RayCluster`` (kvcluster/ray_client.py) with 3 worker actors of class
``tests/reliability/chaos_actor.ChaosWorker`` (the real Worker, plus self-kill at a random phase of
a random request, probability ``--kill-p``; actors restart without limit), the index actor over
embedded Qdrant (MiniLM embedder), a Redis tier on our own redis-server (own port, own prefix,
stopped at the end), TCP channel between workers. Plus ``--external-kills`` ``ray.kill`` calls
from the driver at random times; ``--redis-outage`` stops the redis-server a third of the way
through and starts it again (empty, same port) at two thirds. Model: the tiny random-weight Llama (SmolLM2 tokenizer).

Each request goes through ``Router.stream`` (the path the Serve ingress uses) with ``stop_ids=[]``,
so it must yield exactly one "prefill", exactly ``max_tokens`` "token" events, and one "done".
A request refused because no worker is up at that moment (NoWorkerError, HTTP 503 with
Retry-After) is sent again by the loop, as an HTTP client honouring Retry-After would, for up to
``--client-retry-s``; such refusals are counted separately. Lost = never completed or malformed;
duplicated = more tokens than asked, a second prefill/done, or a
segment id written twice.

    RAY_AUTH_MODE=disabled python benchmarks/chaos_worker_kill.py --requests 1000
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import datetime as dt
import json
import os
import platform
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

from tests.reliability.harness import RedisProc, prompt_of, tiny_model_dir  # noqa: E402


async def run(args) -> dict:
    import ray

    import kvcluster.ray_client as rc
    from tests.reliability.chaos_actor import ChaosWorker
    from workers.model_loader import load_tokenizer
    from workers.scheduler import NoWorkerError, RouterRequest

    model = tiny_model_dir()
    tok = load_tokenizer(str(model))
    redis = RedisProc().start()
    kill_log = Path(tempfile.mkdtemp(prefix="kvchaos-")) / "kills.log"
    env = {"PYTHONPATH": str(REPO), "KVREL_KILL_P": str(args.kill_p), "KVREL_KILL_LOG": str(kill_log),
           "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    ray.init(num_cpus=args.workers + 1, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env})
    rc.WorkerActor = ray.remote(ChaosWorker)
    rc.ACTOR_OPTIONS = dict(rc.ACTOR_OPTIONS, max_restarts=-1)
    prefix = f"kvchaos-{uuid.uuid4().hex[:8]}:"
    cfg = {"model": {"name": str(model), "max_context": 2048}, "cluster": {"num_workers": args.workers},
           "index": {"qdrant_path": ":memory:"},
           "tiers": {"redis_url": redis.url, "redis_prefix": prefix, "host_bytes": 64 << 20}}
    cluster = None
    results: dict[int, dict] = {}
    t0 = time.monotonic()
    try:
        cluster = rc.RayCluster(cfg, worker_num_cpus=1, worker_options={"channel": "tcp", "fetch_timeout_s": 3.0})
        router = cluster.router
        rng = np.random.default_rng(args.seed)
        prompts = [prompt_of(rng) for _ in range(args.requests)]
        sem = asyncio.Semaphore(args.concurrency)
        deadline = time.monotonic() + args.max_minutes * 60

        async def one(i: int) -> None:
            async with sem:
                if time.monotonic() > deadline:
                    results[i] = {"status": "not_run"}
                    return
                text = prompts[i]
                refused = 0
                give_up = time.monotonic() + args.client_retry_s
                while True:
                    req = RouterRequest(token_ids=list(tok(text)["input_ids"]), text=text, tenant="t",
                                        max_tokens=args.max_tokens, stop_ids=[], temperature=0.0)
                    ev = collections.Counter()
                    toks: list[int] = []
                    done = None
                    try:
                        async for e in router.stream(req):
                            ev[e["type"]] += 1
                            if e["type"] == "token":
                                toks.append(e["token_id"])
                            elif e["type"] == "done":
                                done = e
                        ok = (ev["prefill"] == 1 and ev["done"] == 1 and len(toks) == args.max_tokens
                              and done["token_ids"] == toks)
                        results[i] = {"status": "ok" if ok else "malformed", "events": dict(ev),
                                      "attempts": done["attempts"], "segment_id": done.get("segment_id"),
                                      "reused": (done.get("prefill") or {}).get("reused_tokens", 0),
                                      "workers": done.get("workers"), "refused_503": refused}
                    except NoWorkerError as e:
                        # what HTTP clients get as 503 + Retry-After: a client that retries does so
                        refused += 1
                        if time.monotonic() < give_up:
                            await asyncio.sleep(1.0)
                            continue
                        results[i] = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:300],
                                      "refused_503": refused}
                    except Exception as e:  # noqa: BLE001
                        results[i] = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:300],
                                      "refused_503": refused}
                    break

        async def external() -> None:
            r = random.Random(args.seed)
            for _ in range(args.external_kills):
                await asyncio.sleep(r.uniform(5, 20))
                if len(results) >= args.requests:
                    return
                w = r.choice(list(cluster.handles))
                cluster.kill_worker(w, restart=True)
                with open(kill_log, "a") as f:
                    f.write("external\n")

        redis_events: list[tuple[str, int]] = []

        async def redis_outage() -> None:
            """Stop our redis-server once a third of the requests are done, start it (empty, same
            port) at two thirds."""
            n = args.requests
            while len(results) < n // 3:
                await asyncio.sleep(0.2)
            redis.stop()
            redis_events.append(("stopped", len(results)))
            while len(results) < 2 * n // 3:
                await asyncio.sleep(0.2)
            redis.start()
            redis_events.append(("started", len(results)))

        ext = asyncio.get_running_loop().create_task(external())
        if args.redis_outage:
            asyncio.get_running_loop().create_task(redis_outage())
        await asyncio.gather(*[one(i) for i in range(args.requests)])
        ext.cancel()
        stats = cluster.router.stats()
        wstats = await cluster.worker_stats(timeout_s=10)
        from kvcluster.metrics import tier_totals
        tiers = tier_totals(wstats)
    finally:
        if cluster is not None:
            cluster.shutdown()
        ray.shutdown()
        redis.stop()
    elapsed = time.monotonic() - t0
    kills = collections.Counter(kill_log.read_text().split()) if kill_log.exists() else {}
    st = collections.Counter(r["status"] for r in results.values())
    segs = [r["segment_id"] for r in results.values() if r.get("segment_id")]
    dup_segments = len(segs) - len(set(segs))
    retried = sum(1 for r in results.values() if r.get("attempts", 1) > 1)
    return {
        "benchmark": "chaos_worker_kill", "date": dt.datetime.now().isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv), "machine": f"{platform.node()}, {os.cpu_count()} CPUs (shared)",
        "model": "tiny random Llama (4 layers, hidden 64, SmolLM2 tokenizer)", "args": vars(args),
        "elapsed_s": round(elapsed, 1), "requests": args.requests, "status": dict(st),
        "lost": st.get("failed", 0) + st.get("malformed", 0) + st.get("not_run", 0),
        "duplicated": dup_segments + sum(1 for r in results.values()
                                         if r.get("events", {}).get("prefill", 1) > 1
                                         or r.get("events", {}).get("done", 1) > 1),
        "kills": dict(kills), "kills_total": sum(kills.values()), "requests_retried": retried,
        "requests_refused_503_then_retried_by_client": sum(1 for r in results.values() if r.get("refused_503")),
        "refusals_503_total": sum(r.get("refused_503", 0) for r in results.values()),
        "requests_with_reuse": sum(1 for r in results.values() if r.get("reused", 0) > 0),
        "router": {k: v for k, v in stats.items() if k != "scheduler"},
        "errors": sorted({r["error"] for r in results.values() if r.get("error")})[:10],
        "redis_events": redis_events if args.redis_outage else None,
        "reuse_by_third": [sum(1 for i in range(k * args.requests // 3, (k + 1) * args.requests // 3)
                               if results.get(i, {}).get("reused", 0) > 0) for k in range(3)],
        "redis_tier_end": tiers.get("redis"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=6)
    ap.add_argument("--kill-p", type=float, default=0.03)
    ap.add_argument("--external-kills", type=int, default=5)
    ap.add_argument("--max-minutes", type=float, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--redis-outage", action="store_true",
                    help="stop our redis-server after 1/3 of the requests, start it again at 2/3")
    ap.add_argument("--client-retry-s", type=float, default=60.0,
                    help="a request refused with 'no worker is up' (HTTP 503) is sent again for this long")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "chaos_worker_kill.json"))
    args = ap.parse_args()
    res = asyncio.run(run(args))
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0 if res["lost"] == 0 and res["duplicated"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
