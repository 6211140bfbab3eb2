"""Which reused tokens do DHD and CacheBlend pick for recomputation? (SmolLM2-135M on CPU)

    python benchmarks/dhd_selection_bench.py          # ~1-2 min on 2 cores

Same prompts as benchmarks/reuse_quality_bench.py (25 families, one follow-up each, chat
template, align min_run 4). For every follow-up, prefill only (no decoding) with cacheblend,
dhd at check layer 1 and dhd at check layer 3, all at r = .15 and no minimum budget, and
record the candidate tokens (reused, after the exact prefix) and the recomputed ones. Reports the
share of punctuation / whitespace-only tokens among candidates and among each mode's picks, and
the most frequently picked token strings: tests the suspicion that at check layer 1 the attention
of the few must-compute queries makes DHD favour punctuation (attention-sink-like tokens).

Writes results/dhd_selection.json (machine, command, date).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import string
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import workers.engine as E  # noqa: E402
from index_service.align import align  # noqa: E402
from kvcluster.workloads import build_workload  # noqa: E402
from reuse_quality_bench import KINDS, chat_ids  # noqa: E402
from workers.segments import InMemorySegmentStore  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


class Capture:
    """Wraps the engine's selection functions and _checked to see candidates and picks."""

    def __init__(self) -> None:
        self.cand = None
        self.sel = None
        sd, sc, ck = E.select_dhd_tokens, E.select_cacheblend_tokens, E.ReuseEngine._checked

        def dhd(*a, **k):
            self.sel = sd(*a, **k)
            return self.sel

        def cb(*a, **k):
            self.sel = sc(*a, **k)
            return self.sel

        def checked(eng, seq, ids, reused, st, prefix, *a, **k):
            self.cand = reused[reused >= prefix]
            return ck(eng, seq, ids, reused, st, prefix, *a, **k)

        E.select_dhd_tokens, E.select_cacheblend_tokens, E.ReuseEngine._checked = dhd, cb, checked


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--families", type=int, default=25)
    p.add_argument("--max-chars", type=int, default=2500)
    p.add_argument("--r", type=float, default=0.15)
    p.add_argument("--deep-c", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS / "dhd_selection.json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from workers.model_loader import load_runner, load_tokenizer

    t0, started = time.time(), dt.datetime.now(dt.timezone.utc)
    cap = Capture()
    runner, tok = load_runner("smollm2-135m", device="cpu"), load_tokenizer("smollm2-135m")
    store = InMemorySegmentStore()
    eng = E.ReuseEngine(runner, store)
    modes = {"cacheblend@%g" % a.r: E.ReuseSettings(mode="cacheblend", recompute_ratio=a.r, decode_recompute=0,
                                                    min_recompute=0),
             "dhd@%g" % a.r: E.ReuseSettings(mode="dhd", recompute_ratio=a.r, check_layer=1, decode_recompute=0,
                                             min_recompute=0),
             "dhd@%g,c=%d" % (a.r, a.deep_c): E.ReuseSettings(mode="dhd", recompute_ratio=a.r, check_layer=a.deep_c,
                                                              decode_recompute=0, min_recompute=0)}

    def is_punct(t: int) -> bool:
        s = tok.decode([t]).strip()
        return s == "" or all(ch in string.punctuation for ch in s)

    fams = build_workload(a.families, kinds=list(KINDS), seed=0, max_chars=a.max_chars, n_followups=1)
    cand_n = cand_p = 0
    picked = {m: {"n": 0, "punct": 0, "tokens": Counter()} for m in modes}
    per_kind: dict = {}
    for i, fam in enumerate(fams):
        donor = chat_ids(tok, fam.donor)
        seq, _ = eng.prefill(donor, None, E.ReuseSettings(mode="full"), keep_segment=True)
        store.put(eng.segment_of(seq, "d"))
        ids = chat_ids(tok, fam.followups[0])
        plan = align(ids, [("d", donor)], min_run=4)
        for m, st in modes.items():
            cap.cand = cap.sel = None
            eng.prefill(ids, plan, st, keep_segment=False)
            if cap.cand is None:
                continue
            pos = cap.cand[cap.sel.cpu().numpy()]
            if m.startswith("dhd") and "," not in m:
                cand_n += len(cap.cand)
                cand_p += sum(is_punct(ids[q]) for q in cap.cand)
            pk = picked[m]
            pk["n"] += len(pos)
            np_ = sum(is_punct(ids[q]) for q in pos)
            pk["punct"] += np_
            pk["tokens"].update(repr(tok.decode([ids[q]])) for q in pos)
            k = per_kind.setdefault(fam.kind, {}).setdefault(m, [0, 0])
            k[0] += np_
            k[1] += len(pos)
        store.evict("d")
    out = {
        "benchmark": "dhd_selection", "date": started.isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(x) for x in [sys.executable, *sys.argv]),
        "wall_s": time.time() - t0,
        "machine": {"host": platform.node(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "threads": a.threads},
        "config": {"families": a.families, "max_chars": a.max_chars, "r": a.r, "deep_check_layer": a.deep_c,
                   "punctuation": "token text, stripped, empty or all string.punctuation"},
        "candidates": {"n": cand_n, "punct_share": cand_p / max(cand_n, 1)},
        "picked": {m: {"n": v["n"], "punct_share": v["punct"] / max(v["n"], 1),
                       "top_tokens": v["tokens"].most_common(12)} for m, v in picked.items()},
        "punct_share_per_kind": {k: {m: v[0] / max(v[1], 1) for m, v in d.items()} for k, d in per_kind.items()},
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1))
    print(f"candidates: {cand_n} tokens, punctuation/whitespace {out['candidates']['punct_share']:.3f}")
    for m, v in out["picked"].items():
        print(f"{m:<16} picked {v['n']:>5}, punctuation/whitespace {v['punct_share']:.3f}; top: "
              + ", ".join(f"{t} {c}" for t, c in v["top_tokens"][:8]))
    print(f"wrote {a.out} ({out['wall_s']:.0f} s)")
    return out


if __name__ == "__main__":
    main()
