"""Alignment latency and reuse on ~4k-token prompts built from real Wikipedia text.

python3 benchmarks/index_align_bench.py  ->  benchmarks/results/index_align.json
Compares align() with a plain diff (rapidfuzz Indel opcodes), which misses moved spans.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from rapidfuzz.distance import Indel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from index_bench_common import RESULTS, machine, tokenizer, wiki_paragraphs  # noqa: E402

from index_service.align import align  # noqa: E402

TARGET = 4096


def docs_of(tok, paras, start) -> list[list[int]]:
    """Consecutive paragraphs, tokenized, until ~4k tokens."""
    docs, total, i = [], 0, start
    while total < TARGET:
        ids = tok(paras[i], add_special_tokens=False)["input_ids"]
        docs.append(ids)
        total += len(ids)
        i += 1
    return docs


def scenarios(tok, paras, rng):
    docs = docs_of(tok, paras, 100)
    donor = sum(docs, [])
    half = len(donor) // 2
    perm = rng.permutation(len(docs))
    edited = list(donor)
    for p in rng.choice(len(edited), size=len(edited) // 20, replace=False):  # 5% of tokens replaced
        edited[p] = int(rng.integers(1000, 30000))
    question = tok("Question: which of the documents above mentions a war, and when?", add_special_tokens=False)["input_ids"]
    other = sum(docs_of(tok, paras, 5000), [])
    thirds = [sum(docs[i::3], []) for i in range(3)]
    yield "identical", donor, [("d", donor)]
    yield "halves swapped", donor[half:] + donor[:half], [("d", donor)]
    yield "documents shuffled", sum((docs[i] for i in perm), []), [("d", donor)]
    yield "5% tokens replaced", edited, [("d", donor)]
    yield "shuffled + question", sum((docs[i] for i in perm), []) + question, [("d", donor)]
    yield "unrelated donor", other, [("d", donor)]
    yield "3 donors (thirds)", sum((docs[i] for i in perm), []), [(f"d{i}", t) for i, t in enumerate(thirds)]
    yield "3 donors, 2 unrelated", sum((docs[i] for i in perm), []), [("u1", other), ("u2", other[::-1]), ("d", donor)]


def diff_reuse(new, donor, min_run=4) -> int:
    return sum(o.src_end - o.src_start for o in Indel.opcodes(new, donor)
               if o.tag == "equal" and o.src_end - o.src_start >= min_run)


def timed(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return float(np.percentile(ts, 50)), float(np.percentile(ts, 99))


def main() -> None:
    rng = np.random.default_rng(0)
    tok, paras = tokenizer(), wiki_paragraphs()
    rows = []
    for name, new, donors in scenarios(tok, paras, rng):
        plan = align(new, donors)
        p50, p99 = timed(lambda: align(new, donors), 200)
        d50, _ = timed(lambda: diff_reuse(new, donors[-1][1]), 20)
        rows.append({
            "scenario": name, "new_tokens": len(new), "donor_tokens": [len(d) for _, d in donors],
            "align_p50_ms": round(p50, 3), "align_p99_ms": round(p99, 3),
            "reuse_rate": round(plan.reuse_rate, 4), "spans": len(plan.spans), "prefix_len": plan.prefix_len,
            "plain_diff_reuse_rate": round(diff_reuse(new, donors[-1][1]) / len(new), 4),
            "plain_diff_p50_ms": round(d50, 3),
        })
        print(f"{name:24s} n={len(new):5d} align p50 {p50:6.2f} ms p99 {p99:6.2f} ms reuse {plan.reuse_rate:.3f} "
              f"({len(plan.spans)} spans) | plain diff reuse {rows[-1]['plain_diff_reuse_rate']:.3f} in {d50:.2f} ms")
    out = {"machine": machine(), "tokenizer": "all-MiniLM-L6-v2 WordPiece", "min_run": 4, "gram": 8, "results": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "index_align.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
