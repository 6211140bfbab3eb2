"""Tenant isolation: no reuse of another tenant's private KV, cache_salt separates caches, and TTFT
does not reveal whether another tenant sent a similar prompt.

Part A, index level, ``--index-requests`` (10,000) requests: the real ``IndexService`` (embedded
Qdrant in memory, the default "cache" search engine, a bag-of-words embedder for speed); and
``--qdrant-requests`` more through the Qdrant engine (Qdrant's own filter does the work) with
MiniLM, with three tenants sending
overlapping prompts: documents private to one tenant, documents that two tenants both send
privately, public documents (stored with scope=public by a publisher), and a cache_salt on a
quarter of the requests. Each request: lookup (tenant, salt) -> plan, then add its own segment.
Every donor of every plan is checked against the owner/scope/salt recorded when it was added.

Part B, end to end, ``--e2e-requests``: the same mix through the in-process cluster (Router,
Workers with host + Redis tiers on our own redis-server, IndexService) with the tiny model; checks
the donor ids of every result, and that a worker handed a plan naming another tenant's private
segment (a forged or stale plan) drops it.

Part C, TTFT side channel: a private prompt of tenant B, (1) after tenant A sent a similar prompt
privately, (2) with nothing similar stored; and (3) a positive control, after A sent it publicly.
A random-weight model large enough that prefill dominates TTFT (8 layers, hidden 512). Compares the
distributions (medians, Mann-Whitney U and Kolmogorov-Smirnov p-values).

    RAY_AUTH_MODE=disabled python benchmarks/isolation_tenants.py
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

from tests.reliability.harness import DOCS, QUESTIONS, LocalCluster, RedisProc, tiny_model_dir  # noqa: E402

TENANTS = ["acme", "globex", "initech"]
PRIVATE = {t: [f"{t.capitalize()} internal memo {i}: the {t} project codename is {w} and its budget is "
               f"{(i + 3) * 17} thousand; only {t} staff may read this note about {w}."
               for i, w in enumerate(["falcon", "harbor", "quartz", "meadow"])] for t in TENANTS}
SHARED_PRIVATE = ["Quarterly outlook: shipping costs rose nine percent while demand for steel fell in the north.",
                  "Draft contract clause: the supplier shall deliver within thirty days of the purchase order."]
PUBLIC = ["System: you are a helpful assistant for a logistics company. Answer briefly and cite the documents."] + \
    DOCS[:3]


def make_request(rng):
    t = TENANTS[int(rng.integers(3))]
    parts = []
    r = rng.random()
    if r < 0.4:
        parts.append(PUBLIC[0])
    pool = PRIVATE[t] + SHARED_PRIVATE + PUBLIC[1:]
    k = int(rng.integers(1, 4))
    parts += [pool[i] for i in rng.choice(len(pool), size=k, replace=False)]
    text = " ".join(parts) + " Question: " + QUESTIONS[int(rng.integers(len(QUESTIONS)))]
    salt = None if rng.random() < 0.75 else f"salt-{t}-{int(rng.integers(2))}"
    return t, text, salt


def index_level(n, engine, tok, seed, embedder):
    from index_service.service import IndexService
    ix = IndexService(qdrant_path=":memory:", engine=engine, embedder=embedder, top_k=3, min_score=0.2)
    owner: dict[str, tuple[str, str, str | None]] = {}
    fp = "fp-iso"
    rng = np.random.default_rng(seed)
    # the publisher stores the public documents
    for i, text in enumerate(PUBLIC):
        sid = f"pub{i}"
        ix.add(sid, tok(text)["input_ids"], text, "publisher", "public", fp)
        owner[sid] = ("publisher", "public", None)
    viol = {"other_tenant_private": 0, "salt_mismatch": 0}
    stats = {"requests": 0, "with_donors": 0, "donors": 0, "public_donors": 0, "own_donors": 0}
    lookup_ms = []
    for i in range(n):
        t, text, salt = make_request(rng)
        ids = tok(text)["input_ids"]
        t0 = time.perf_counter()
        plan = ix.lookup(ids, text, t, fp, salt)
        lookup_ms.append((time.perf_counter() - t0) * 1e3)
        stats["requests"] += 1
        stats["with_donors"] += bool(plan.donor_ids)
        for d in plan.donor_ids:
            o_t, o_scope, o_salt = owner[d]
            stats["donors"] += 1
            if o_scope == "public":
                stats["public_donors"] += 1
            elif o_t == t:
                stats["own_donors"] += 1
            else:
                viol["other_tenant_private"] += 1
            if o_salt != salt:
                viol["salt_mismatch"] += 1
        sid = f"s{i}"
        scope = "public" if rng.random() < 0.05 else "private"
        ix.add(sid, ids, text, t, scope, fp, salt)
        owner[sid] = (t, scope, salt)
    ix.close()
    return {"engine": engine, **stats, "violations": viol,
            "lookup_ms_p50": round(statistics.median(lookup_ms), 2),
            "lookup_ms_p99": round(float(np.percentile(lookup_ms, 99)), 2)}


def e2e(n, seed, redis_url):
    c = LocalCluster(2, tiny_model_dir(), redis_url=redis_url, channel="tcp")
    owner = {}
    viol = {"other_tenant_private": 0, "salt_mismatch": 0}
    stats = {"requests": 0, "failed": 0, "with_reuse": 0}
    rng = np.random.default_rng(seed)
    try:
        for i in range(n):
            t, text, salt = make_request(rng)
            scope = "public" if rng.random() < 0.1 else "private"
            req = c.request(text, tenant=t, scope=scope, cache_salt=salt, max_tokens=2)
            try:
                r = c.run(req)
            except Exception:  # noqa: BLE001
                stats["failed"] += 1
                continue
            stats["requests"] += 1
            donors = r["prefill"]["donor_ids"]
            stats["with_reuse"] += r["prefill"]["reused_tokens"] > 0
            for d in donors:
                o_t, o_scope, o_salt = owner[d]
                if o_scope != "public" and o_t != t:
                    viol["other_tenant_private"] += 1
                if o_salt != salt:
                    viol["salt_mismatch"] += 1
            if r["done"].get("segment_id"):
                owner[r["done"]["segment_id"]] = (t, scope, salt)
        # a forged plan: tenant globex names acme's private segment; the worker must drop it
        acme = next(s for s, (t, sc, sa) in owner.items() if t == "acme" and sc == "private" and sa is None)
        from workers.scheduler import RouterRequest, plan_to_wire
        from index_service.align import align
        w = c.workers["w0"]
        seg = w.segments.get(acme) or c.workers["w1"].segments.get(acme)
        ids = [int(x) for x in seg.token_ids]
        plan = align(ids, [(acme, ids)])
        out = w.generate({"token_ids": ids, "max_tokens": 1, "tenant": "globex", "plan": plan_to_wire(plan),
                          "donor_locations": {acme: "w1"}})
        forged = {"segment": acme, "reused_tokens": out["prefill"]["reused_tokens"],
                  "dropped": out["prefill"]["fetch"]["dropped"]}
    finally:
        c.close()
    return {**stats, "violations": viol, "forged_plan": forged}


def ttft(n, seed, redis_url):
    import torch
    from workers.model_loader import random_runner
    from workers.model_spec import ModelSpec
    spec = ModelSpec(vocab_size=49152, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64,
                     intermediate_size=1536, max_position=4096, tie_embeddings=True, eos_token_ids=(2,))
    runner = random_runner(spec, "cpu", torch.float32, seed=0)
    c = LocalCluster(1, tiny_model_dir(), runner=runner, redis_url=None)
    rng = np.random.default_rng(seed)
    out = {}
    try:
        words = sorted({w for d in DOCS + PUBLIC + SHARED_PRIVATE for w in d.replace(".", "").split()})

        def secret(i):  # unique text per trial: nothing else stored resembles it
            body = " ".join(rng.choice(words, size=110).tolist())
            return f"Confidential file {i}: {body}. Board decision {i}: proceed at {100 + i} million."

        # in every condition tenant A sends one prompt just before B's probe (same load): similar to
        # B's and private, unrelated and private, or similar and public (the positive control)
        conds = {"A_sent_similar_privately": "private", "nobody_sent_similar": "unrelated",
                 "control_A_sent_it_publicly": "public"}
        times = {k: [] for k in conds}
        reused = {k: 0 for k in conds}
        order = [k for _ in range(n) for k in conds]
        rng.shuffle(order)
        for j, cond in enumerate(order):
            text = secret(j)
            if conds[cond] == "unrelated":
                c.run(c.request(secret(10_000 + j), tenant="acme", scope="private", max_tokens=1))
            else:
                c.run(c.request(text, tenant="acme", scope=conds[cond], max_tokens=1))
            probe = text.replace("Board decision", "Board note")  # B's similar prompt, private
            req = c.request(probe, tenant="globex", max_tokens=1, write_back=False)
            t0 = time.perf_counter()
            r = c.run(req)
            times[cond].append(time.perf_counter() - t0)
            reused[cond] += r["prefill"]["reused_tokens"]
    finally:
        c.close()
    from scipy.stats import ks_2samp, mannwhitneyu
    a, b, ctl = (times[k] for k in conds)
    ms = lambda x: round(1e3 * statistics.median(x), 2)  # noqa: E731
    out = {"n_per_condition": n, "prompt_tokens_approx": len(c.tokenizer(secret(0))["input_ids"]),
           "median_ttft_ms": {k: ms(v) for k, v in times.items()},
           "p90_ttft_ms": {k: round(1e3 * float(np.percentile(v, 90)), 2) for k, v in times.items()},
           "mean_reused_tokens": {k: round(v / n, 1) for k, v in reused.items()},
           "private_vs_nothing": {"mannwhitney_p": float(mannwhitneyu(a, b).pvalue),
                                  "ks_p": float(ks_2samp(a, b).pvalue)},
           "control_public_vs_nothing": {"mannwhitney_p": float(mannwhitneyu(ctl, b).pvalue),
                                         "ks_p": float(ks_2samp(ctl, b).pvalue)}}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--index-requests", type=int, default=10000)
    ap.add_argument("--qdrant-requests", type=int, default=500)
    ap.add_argument("--e2e-requests", type=int, default=1000)
    ap.add_argument("--ttft-n", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "isolation_tenants.json"))
    args = ap.parse_args()
    from index_service.embedder import Embedder
    from workers.model_loader import load_tokenizer
    tok = load_tokenizer(str(tiny_model_dir()))
    emb = Embedder()
    res = {"benchmark": "isolation_tenants", "date": dt.datetime.now().isoformat(timespec="seconds"),
           "command": "python " + " ".join(sys.argv), "machine": f"{platform.node()}, {os.cpu_count()} CPUs (shared)"}
    t0 = time.time()
    from tests.reliability.harness import HashEmbedder
    # 10k MiniLM embeddings (x2: lookup and add) take ~30 min on this shared 2-core box; visibility
    # is decided by the filter, not by the vectors, so the long run uses the bag-of-words embedder
    res["index_cache_engine"] = index_level(args.index_requests, "cache", tok, args.seed, HashEmbedder())
    res["index_cache_engine"]["embedder"] = "HashEmbedder (bag of words, tests/reliability/harness.py)"
    print(json.dumps(res["index_cache_engine"]), flush=True)
    res["index_qdrant_engine"] = index_level(args.qdrant_requests, "qdrant", tok, args.seed + 1, emb)
    res["index_qdrant_engine"]["embedder"] = "MiniLM (all-MiniLM-L6-v2)"
    print(json.dumps(res["index_qdrant_engine"]), flush=True)
    redis = RedisProc().start()
    try:
        res["end_to_end"] = e2e(args.e2e_requests, args.seed + 2, redis.url)
        print(json.dumps(res["end_to_end"]), flush=True)
    finally:
        redis.stop()
    res["ttft"] = ttft(args.ttft_n, args.seed + 3, None)
    print(json.dumps(res["ttft"]), flush=True)
    res["elapsed_s"] = round(time.time() - t0, 1)
    v = [res[k]["violations"] for k in ("index_cache_engine", "index_qdrant_engine", "end_to_end")]
    res["pass"] = {"no_cross_tenant_private_reuse": all(x["other_tenant_private"] == 0 for x in v),
                   "salt_separates": all(x["salt_mismatch"] == 0 for x in v),
                   "forged_plan_dropped": res["end_to_end"]["forged_plan"]["reused_tokens"] == 0,
                   "ttft_indistinguishable": res["ttft"]["private_vs_nothing"]["mannwhitney_p"] > 0.01}
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res["pass"]))
    return 0 if all(res["pass"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
