"""Token hit rate: semantic + prefix reuse (KVShare DHD) vs exact prefix caching alone.

Runs the demo workload (prompt families from real text, interleaved; see kvcluster.workloads)
through ``submit()`` on three embedded clusters sharing one SmolLM2: the configured reuse (DHD),
exact prefix caching alone (hash-chained blocks, no semantic search; engine mode "prefix"), and
full compute (the ROUGE-L and TTFT reference). Goal: at least 2x prefix caching's token hit rate,
with ROUGE-L vs full compute reported beside it.

    python benchmarks/hit_rate_bench.py [--families 12] [--followups 1] [--max-tokens 24]

Writes benchmarks/results/hit_rate.json (machine, command, date, per-request records) and
hit_rate.png (``--stem`` renames them, e.g. for another ``--config``). Token hit rate = prompt tokens whose KV came from the cache / prompt tokens
(DHD then recomputes ``recompute_ratio`` of the reused ones; both counts are in the JSON).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # no spinning OpenMP threads on a shared CPU

from kvcluster.config import load_config  # noqa: E402
from kvcluster.demo import add_arguments, print_report, run_workload, save_report  # noqa: E402

GOAL = 2.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    ap.set_defaults(families=12, out=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--config", default=None, help="kvcluster YAML config (reuse mode, ratio, ...)")
    ap.add_argument("--stem", default="hit_rate", help="output file names: STEM.json, STEM.png")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    report = run_workload(load_config(args.config), families=args.families, followups=args.followups,
                          max_tokens=args.max_tokens, max_chars=args.max_chars, kinds=kinds, seed=args.seed,
                          progress=not args.no_progress)
    report["command"] = "python benchmarks/hit_rate_bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
    f = report["summary"]["followups"]
    a = report["summary"]["all"]
    report["goal"] = {
        "target": f"token hit rate of semantic + prefix reuse >= {GOAL}x exact prefix caching alone",
        "ratio_all_requests": a["hit_rate_ratio"], "ratio_followups": f["hit_rate_ratio"],
        "met": bool(a["hit_rate_ratio"] is not None and a["hit_rate_ratio"] >= GOAL),
        "rouge_l_vs_full_semantic": f["rouge_l_semantic"], "rouge_l_vs_full_prefix": f["rouge_l_prefix"],
    }
    print_report(report)
    g = report["goal"]
    ratio = "inf" if g["ratio_all_requests"] is None else f"{g['ratio_all_requests']:.2f}x"
    print(f"goal (>= {GOAL}x prefix caching's hit rate): {ratio} -> {'MET' if g['met'] else 'NOT MET'}; "
          f"ROUGE-L vs full: semantic {f['rouge_l_semantic']:.3f}, prefix {f['rouge_l_prefix']:.3f}")
    paths = save_report(report, Path(args.out), args.stem)
    print("saved", ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
