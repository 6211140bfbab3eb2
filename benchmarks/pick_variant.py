#!/usr/bin/env python3
"""Print the number of the fastest kernel option over one or more A/B files written by
``diag_reuse_profile.py --ab --ab-json`` (0, the defaults, unless another is faster in every
file and by ``--margin`` on average: one same-process run's spread is about 1%).

    python3 benchmarks/pick_variant.py gpu_check_out/ab_dhd.json gpu_check_out/ab_cacheblend.json
"""
from __future__ import annotations

import argparse
import json
import sys


def pick(runs: list[dict], margin: float) -> tuple[int, float]:
    """(variant number, its mean time over the default's) among variants timed in every run."""
    common = set.intersection(*(set(r["variants"]) for r in runs))
    if "0" not in common:
        return 0, 1.0
    best, best_ratio = 0, 1.0
    for v in sorted(common - {"0"}, key=int):
        ratios = [r["variants"][v]["ms"] / r["variants"]["0"]["ms"] for r in runs]
        mean = sum(ratios) / len(ratios)
        if max(ratios) < 1.0 and mean < 1.0 - margin and mean < best_ratio:
            best, best_ratio = int(v), mean
    return best, best_ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--margin", type=float, default=0.02)
    a = ap.parse_args()
    runs = []
    for f in a.files:
        try:
            runs.append(json.loads(open(f).read()))
        except (OSError, ValueError) as e:
            print(f"pick_variant: skipping {f}: {e}", file=sys.stderr)
    best, ratio = pick(runs, a.margin) if runs else (0, 1.0)
    print(f"pick_variant: {best} ({ratio:.3f} of the default's time)", file=sys.stderr)
    print(best)


if __name__ == "__main__":
    main()
