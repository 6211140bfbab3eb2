"""KVSharer quality on real weights (SmolLM2-135M, 30 layers, CPU): perplexity on held-out
Wikipedia paragraphs at R = 0, 12.5, 25, 37.5% for the three pair orders, and search time.

    python benchmarks/kvsharer_quality_bench.py --out benchmarks/results/kvsharer_quality.json

One greedy search per (order, T) at the largest R; the maps for smaller R are its prefixes (the
walk is deterministic and stops at round(R x L) accepted pairs, so a search at a smaller R would
stop earlier on the same path; tests/workers/test_kvsharer.py checks that). The search time for a
smaller R is the time at which its last pair was accepted. Calibration: the 30 x 64-token
Wikipedia calibration set; evaluation: ``heldout_paragraphs`` (disjoint from calibration), each
cut to --max-tokens, scored on tokens 1..n-1.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kvcluster.workloads import calibration_paragraphs, heldout_paragraphs  # noqa: E402
from workers.kvsharer import (ORDERS, Strategy, calibration_digest, calibration_token_ids,  # noqa: E402
                              perplexity, search_strategy, shared_copy, target_shared)
from workers.model_loader import load_runner, load_tokenizer  # noqa: E402

RATIOS = (0.125, 0.25, 0.375)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--paragraphs", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--threshold", type=float, default=0.5, help="T for all three orders")
    ap.add_argument("--extra-thresholds", type=float, nargs="*", default=[],
                    help="more T values, run for the dissimilar and similar orders")
    ap.add_argument("--orders", nargs="*", default=list(ORDERS))
    ap.add_argument("--extra-orders", nargs="*", default=["dissimilar"],
                    help="orders run at the --extra-thresholds")
    ap.add_argument("--ratios", type=float, nargs="*", default=list(RATIOS))
    ap.add_argument("--max-trials", type=int, default=None, help="per search (default: no limit)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a busy shared CPU more threads run slower)")
    ap.add_argument("--merge", action="store_true",
                    help="add these runs to the runs already in --out (same model, calibration, held-out set)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random order")
    ap.add_argument("--out", default="benchmarks/results/kvsharer_quality.json")
    ap.add_argument("--strategy-out", default="benchmarks/results/kvsharer_smollm2_r25.json",
                    help="write the R = 25%% dissimilar-first strategy here ('' to skip)")
    ap.add_argument("--plot-only", action="store_true",
                    help="recompute goals, redraw the plot and table from the runs in --out")
    args = ap.parse_args(argv)
    if args.plot_only:
        out = json.loads(Path(args.out).read_text())
        derive(out)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
        plot(out, Path(args.out).with_suffix(".png"))
        print_table(out)
        return 0
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    ratios = sorted(args.ratios)
    t_start = time.perf_counter()

    runner, tok = load_runner(args.model), load_tokenizer(args.model)
    L = runner.spec.num_layers
    cal = calibration_token_ids(tok, calibration_paragraphs(30), 64)
    held = [tok(t)["input_ids"][:args.max_tokens] for t in heldout_paragraphs(args.paragraphs)]

    seen: dict[tuple, dict] = {}

    def ppl(kv_source) -> dict:
        if tuple(kv_source) in seen:  # a search that stopped short gives one map for several R
            return dict(seen[tuple(kv_source)], eval_s=0.0)
        t = time.perf_counter()
        r = shared_copy(runner, kv_source)
        p = perplexity(r, held)
        p["eval_s"] = round(time.perf_counter() - t, 2)
        seen[tuple(kv_source)] = p
        return p

    base = ppl(list(range(L)))
    print(f"R = 0: perplexity {base['perplexity']:.3f} over {base['tokens']} tokens "
          f"({base['eval_s']:.0f} s)", flush=True)
    runs = []
    plan = [(o, args.threshold) for o in args.orders]
    plan += [(o, t) for t in args.extra_thresholds for o in args.extra_orders]
    for order, T in plan:
        s = search_strategy(runner, cal, max(ratios), T, order, seed=args.seed, model_name=args.model,
                            calibration_source="wikipedia:calibration_paragraphs(30)", progress=True,
                            max_trials=args.max_trials)
        acc_times = [t["elapsed_s"] for t in s.trials if t["accepted"]]
        for R in ratios:
            c = target_shared(R, L)
            got = min(c, len(s.accepted))
            kv_source = s.map_after(got)
            p = ppl(kv_source)
            row = {"order": order, "threshold": T, "ratio": R, "target_shared": c, "shared": got,
                   "search_trials_total": len(s.trials), "max_trials": args.max_trials,
                   "kv_layers": L - got, "kv_source": kv_source,
                   "final_cosine": s.accepted[got - 1]["cosine"] if got else 1.0,
                   "search_s": round(acc_times[got - 1] if got else 0.0, 2),
                   "trials": sum(1 for t in s.trials if t["elapsed_s"] <= (acc_times[got - 1] if got else 0)),
                   "perplexity": p["perplexity"], "vs_r0": p["perplexity"] / base["perplexity"] - 1,
                   "eval_s": p["eval_s"]}
            runs.append(row)
            print(f"{order:10s} T={T:<5} R={R:.3f} shared {got:2d}/{c:2d} cos {row['final_cosine']:.3f} "
                  f"ppl {row['perplexity']:8.3f} ({row['vs_r0']:+.1%}) search {row['search_s']:.0f} s",
                  flush=True)
            if R == 0.25 and order == "dissimilar" and T == args.threshold and args.strategy_out:
                Strategy(**{**s.to_dict(), "kv_source": kv_source, "ratio": R,
                            "accepted": s.accepted[:got], "trials": s.trials[:row["trials"]],
                            "final_cosine": row["final_cosine"], "search_seconds": row["search_s"],
                            "shared_fingerprint": shared_copy(runner, kv_source).fingerprint}
                         ).save(args.strategy_out)

    prev_cmds = []
    if args.merge and Path(args.out).is_file():
        old = json.loads(Path(args.out).read_text())
        if old.get("model_fingerprint") != runner.fingerprint or old.get("heldout", {}).get("paragraphs") != len(held):
            raise SystemExit("--merge: the existing results are for another model or held-out set")
        key = lambda r: (r["order"], r["threshold"], r["ratio"])  # noqa: E731
        mine = {key(r) for r in runs}
        runs = [r for r in old["runs"] if key(r) not in mine] + runs
        prev_cmds = old.get("commands", [old.get("command")])

    cmd = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0]] + list(argv or sys.argv[1:]))
    out = {
        "benchmark": "kvsharer_quality",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": cmd, "commands": prev_cmds + [cmd],
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "load_avg_at_end": os.getloadavg()},
        "model": args.model, "model_fingerprint": runner.fingerprint, "num_layers": L,
        "calibration": {"samples": len(cal), "tokens": len(cal[0]),
                        "digest": calibration_digest(cal)},
        "heldout": {"paragraphs": len(held), "max_tokens": args.max_tokens, "scored_tokens": base["tokens"]},
        "r0": base, "runs": runs,
        "wall_s": round(time.perf_counter() - t_start, 1), "threshold": args.threshold,
    }
    derive(out)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    plot(out, Path(args.out).with_suffix(".png"))
    print_table(out)
    return 0


def derive(out: dict) -> None:
    """Goals (at the headline T) and the best T per order at R = 25%, counting only runs that
    reached their target number of shared layers."""
    runs, T0 = out["runs"], out.get("threshold", 0.5)

    def pick(order, R, T=T0):
        return next((r for r in runs if r["order"] == order and r["ratio"] == R and r["threshold"] == T), None)

    d25, s25 = pick("dissimilar", 0.25), pick("similar", 0.25)
    out["goals"] = {
        "threshold": T0,
        "r25_dissimilar_ppl_within_10pct": d25 is not None and d25["vs_r0"] <= 0.10,
        "r25_dissimilar_better_than_similar": (d25 is not None and s25 is not None
                                               and d25["perplexity"] < s25["perplexity"]),
    }
    best = {}
    for order in ORDERS:
        rows = [r for r in runs if r["order"] == order and r["ratio"] == 0.25 and r["shared"] == r["target_shared"]]
        if rows:
            b = min(rows, key=lambda r: r["perplexity"])
            best[order] = {"threshold": b["threshold"], "perplexity": b["perplexity"], "vs_r0": b["vs_r0"]}
    short = sorted({(r["order"], r["threshold"]) for r in runs if r["shared"] < r["target_shared"]})
    out["best_threshold_at_r25"] = best  # among runs that shared all 8 layers
    out["fell_short"] = [{"order": o, "threshold": t,
                          "shared": max(r["shared"] for r in runs if (r["order"], r["threshold"]) == (o, t)),
                          "trials": max(r.get("search_trials_total") or 0 for r in runs
                                        if (r["order"], r["threshold"]) == (o, t))} for o, t in short]


def print_table(out: dict) -> None:
    base = out["r0"]["perplexity"]
    print(f"\nperplexity on {out['heldout']['paragraphs']} held-out paragraphs "
          f"({out['heldout']['scored_tokens']} tokens); R = 0: {base:.3f}")
    Ts = sorted({r["threshold"] for r in out["runs"]})
    ratios = sorted({r["ratio"] for r in out["runs"]})
    for T in Ts:
        print(f"T = {T}")
        print(f"{'order':12s}" + "".join(f"{'R=' + format(R * 100, 'g') + '%':>22s}" for R in ratios))
        for order in ORDERS:
            rows = {r["ratio"]: r for r in out["runs"] if r["order"] == order and r["threshold"] == T}
            if rows:
                print(f"{order:12s}" + "".join(
                    f"{rows[R]['perplexity']:10.3f} ({rows[R]['vs_r0']:+6.1%}) {rows[R]['search_s']:3.0f}s"
                    + ("" if rows[R]["shared"] == rows[R]["target_shared"] else f" [{rows[R]['shared']} layers]")
                    if R in rows else f"{'-':>22s}" for R in ratios))
    print("goals:", out["goals"])
    for f in out.get("fell_short", []):
        print(f"{f['order']} at T = {f['threshold']}: only {f['shared']} layers stayed above T in {f['trials']} trials")


def plot(out: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    base = out["r0"]["perplexity"]
    colors = {"dissimilar": "tab:blue", "similar": "tab:red", "random": "tab:gray"}
    Ts = sorted({r["threshold"] for r in out["runs"]})
    styles = ["-", "--", ":", "-."]
    for ti, T in enumerate(Ts):
        for order in ORDERS:
            rows = sorted((r for r in out["runs"] if r["order"] == order and r["threshold"] == T),
                          key=lambda r: r["ratio"])
            if rows:
                name = "random order" if order == "random" else f"{order}-first"
                pts = sorted({(0, base)} | {(r["shared"], r["perplexity"]) for r in rows})
                ax.plot([p[0] for p in pts], [p[1] for p in pts], styles[ti % 4], marker="o",
                        color=colors[order], label=f"{name}, T={T}")
    ax.axhline(base * 1.1, color="k", lw=0.8, ls=":", label="R=0 + 10%")
    L = out["num_layers"]
    ticks = sorted({0} | {r["target_shared"] for r in out["runs"]})
    ax.set_xticks(ticks, [f"{t}\n({t / L:.0%})" for t in ticks])
    ax.set_xlabel(f"layers sharing another layer's KV (of {L}); a search that fell short stops early")
    ax.set_ylabel("perplexity (held-out Wikipedia)")
    ax.set_yscale("log")
    ax.set_title(f"KVSharer on {out['model']} ({out['num_layers']} layers)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
