"""Output quality of KV reuse on CPU: SmolLM2-135M-Instruct (real weights), prompts from real text.

    python benchmarks/reuse_quality_bench.py                      # the full run (~30 min, 2 cores)
    python benchmarks/reuse_quality_bench.py --quick --families 1 # smoke test (< 1 min)

For each prompt family (kinds: reordered_documents, changed_instruction, inserted_sentences,
conversation, faq; see kvcluster/workloads.py) the donor is prefilled with full compute and
its KV stored as a segment. Each follow-up is aligned against the donor (index_service.align)
and generated greedily with every mode:

    full              the reference (every token computed)
    prefix            only the exact prefix reused
    naive             every matched token reused, nothing recomputed (r = 0)
    epic              naive + the first 32 tokens of every reused run recomputed
    cacheblend@0.15   top 15% of reused tokens by V deviation at layer 1
    dhd@0.15          top 15% by attention x V deviation (DHD prefill only)
    dhd@0.15+dec3     the same + 3 reused tokens recomputed per decode step (DHD decode)
    cacheblend@0.15+min16, dhd@0.15+min16
                      the same with a minimum recompute budget: at least min(16, candidates)
                      reused tokens recomputed (ReuseSettings.min_recompute; candidates are the
                      reused tokens after the exact prefix, so a long prefix leaves r * few)
    dhd@0.15,c=3      DHD with deviation and attention measured at layer 3 instead of 1
    dhd@0.15,c=3+min16  both
The baselines set min_recompute=0 explicitly, whatever ReuseSettings' default is.

Metrics per mode (means over follow-ups, and per kind): token reuse rate = cached tokens /
prompt tokens (reused and not recomputed); ROUGE-L (on token ids) and exact match of the
``--max-new`` greedy tokens against the full-compute output (exact: the whole output identical;
prefix: fraction of leading tokens identical); KL(full || mode) of the first-token distribution;
top-1 agreement of the first token; prefill FLOPs saved = 1 - flops_fraction (linear layers).

On a subset (the first ``--sweep-families`` families, round-robin over kinds) dhd (no decode
recompute) and cacheblend also run at r in {0.05, 0.15, 0.3, 0.5}, so "at equal r" comparisons
are visible. The expectation full >= dhd >= cacheblend >= naive in quality is checked on
paired per-follow-up differences (mean, bootstrap 95% CI, wins/ties/losses) and every place
where it does not hold is written to the output and to the JSON's "findings".

Writes ``--out`` (JSON: machine, exact command, date, config, per-request records, per-mode and
per-kind aggregates, sweep, findings) and a PNG next to it. Finished follow-ups are appended to
``<out>.partial.jsonl`` so an interrupted run continues with ``--resume``.
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
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# OpenMP threads that spin while waiting waste most of a shared CPU: measured on the 2-core dev
# machine at load ~20, a decode step took 2.8 s with the default policy and 0.46 s with PASSIVE
# (and CPU time per step fell from 0.25 s to 0.07 s). Must be set before torch loads libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from index_service.align import align  # noqa: E402
from kvcluster.quality import exact_match_prefix, kl_divergence, rouge_l, top1_agreement  # noqa: E402
from kvcluster.workloads import build_workload  # noqa: E402
from workers.engine import ReuseEngine, ReuseSettings  # noqa: E402
from workers.segments import InMemorySegmentStore  # noqa: E402

KINDS = ("reordered_documents", "changed_instruction", "inserted_sentences", "conversation", "faq")
RESULTS = Path(__file__).resolve().parent / "results"
MAIN_R = 0.15
MIN_BUDGET = 16  # the min_recompute of the "+min16" variants
DEEP_C = 3  # the check layer of the ",c=3" variants


def main_modes(r: float = MAIN_R) -> list[tuple[str, ReuseSettings]]:
    """(label, settings) of the modes every follow-up runs; "full" first (the reference)."""
    m, c = MIN_BUDGET, DEEP_C
    return [
        ("full", ReuseSettings(mode="full", decode_recompute=0)),
        ("prefix", ReuseSettings(mode="prefix", decode_recompute=0)),
        ("naive", ReuseSettings(mode="naive", recompute_ratio=0.0, decode_recompute=0)),
        ("epic", ReuseSettings(mode="epic", recompute_ratio=0.0, decode_recompute=0)),
        (f"cacheblend@{r:g}", ReuseSettings(mode="cacheblend", recompute_ratio=r, decode_recompute=0,
                                            min_recompute=0)),
        (f"dhd@{r:g}", ReuseSettings(mode="dhd", recompute_ratio=r, check_layer=1, decode_recompute=0,
                                     min_recompute=0)),
        (f"dhd@{r:g}+dec3", ReuseSettings(mode="dhd", recompute_ratio=r, check_layer=1, decode_recompute=3,
                                          min_recompute=0)),
        (f"cacheblend@{r:g}+min{m}", ReuseSettings(mode="cacheblend", recompute_ratio=r, decode_recompute=0,
                                                   min_recompute=m)),
        (f"dhd@{r:g}+min{m}", ReuseSettings(mode="dhd", recompute_ratio=r, check_layer=1, decode_recompute=0,
                                            min_recompute=m)),
        (f"dhd@{r:g},c={c}", ReuseSettings(mode="dhd", recompute_ratio=r, check_layer=c, decode_recompute=0,
                                           min_recompute=0)),
        (f"dhd@{r:g},c={c}+min{m}", ReuseSettings(mode="dhd", recompute_ratio=r, check_layer=c,
                                                  decode_recompute=0, min_recompute=m)),
    ]


def sweep_modes(ratios: list[float]) -> list[tuple[str, ReuseSettings]]:
    out = []
    for r in ratios:
        out.append((f"cacheblend@{r:g}", ReuseSettings(mode="cacheblend", recompute_ratio=r, decode_recompute=0,
                                                       min_recompute=0)))
        out.append((f"dhd@{r:g}", ReuseSettings(mode="dhd", recompute_ratio=r, check_layer=1, decode_recompute=0,
                                                min_recompute=0)))
    return out


# ---------------------------------------------------------------------------------------------
# Prompts


def chat_ids(tok, prompt) -> list[int]:
    """Token ids of a prompt through the chat template (text prompts become one user message)."""
    msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return list(tok(text, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------------------------------------
# Running


def run_followup(engine: ReuseEngine, tok, fam_idx: int, fu_idx: int, kind: str, donor_id: str,
                 donor_ids: list[int], ids: list[int], modes, max_new: int, bar=None) -> list[dict]:
    """Generate one follow-up with every mode in ``modes`` (the first must be "full")."""
    plan = align(ids, [(donor_id, donor_ids)], min_run=4)
    records, ref = [], None
    for label, st in modes:
        if bar is not None:
            bar.set_postfix_str(f"fam {fam_idx} {kind[:12]} {label}")
        res, _ = engine.generate(ids, plan, max_new, settings=st, keep_segment=False)
        n = res.prompt_tokens
        rec = {
            "family": fam_idx, "followup": fu_idx, "kind": kind, "mode": label, "base_mode": st.mode,
            "r": st.recompute_ratio if st.mode in ("cacheblend", "dhd") else None,
            "decode_recompute": st.decode_recompute if st.mode == "dhd" else 0,
            "min_recompute": st.min_recompute if st.mode in ("cacheblend", "dhd") else 0,
            "check_layer": (1 if st.mode == "cacheblend" else st.check_layer) if st.mode in ("cacheblend", "dhd") else None,
            "prompt_tokens": n, "donor_tokens": len(donor_ids),
            "plan_reuse_rate": plan.reuse_rate, "plan_prefix_len": plan.prefix_len,
            "reused_tokens": res.reused_tokens, "recomputed_tokens": res.recomputed_tokens,
            "cached_tokens": res.cached_tokens, "reuse_rate": res.cached_tokens / n,
            "flops_fraction": res.flops_fraction, "flops_saved": 1.0 - res.flops_fraction,
            "decode_recomputed": res.decode_recomputed,
            "ttft_s": res.ttft_s, "decode_s": res.decode_s, "finish_reason": res.finish_reason,
            "output_ids": list(res.token_ids),
        }
        if ref is None:
            if st.mode != "full":
                raise ValueError("the first mode must be full (the reference)")
            ref = (list(res.token_ids), res.first_logits)
        out, ref_logits = list(res.token_ids), ref[1]
        pm = exact_match_prefix(out, ref[0])
        rec.update({
            "rouge_l": rouge_l(out, ref[0]),
            "rouge_l_words": rouge_l(tok.decode(out), tok.decode(ref[0])),
            "exact": bool(pm.exact), "prefix_match": pm.fraction,
            "kl_first": kl_divergence(ref_logits, res.first_logits),
            "top1_first": top1_agreement(ref_logits, res.first_logits),
        })
        if st.mode == "full":
            rec["text"] = tok.decode(out)
        records.append(rec)
        if bar is not None:
            bar.update(1)
    return records


def sanity_checks(engine: ReuseEngine, ids: list[int], donor_id: str) -> dict:
    """Reusing a prompt's own KV must reproduce full compute (KL ~ 0, same first token):
    catches RoPE, placement and masking errors before the real comparison."""
    plan = align(ids, [(donor_id, ids)], min_run=4)
    full, _ = engine.generate(ids, None, 1, settings=ReuseSettings(mode="full", decode_recompute=0))
    out = {"prompt_tokens": len(ids), "plan_reuse_rate": plan.reuse_rate}
    for label, st in [("naive", ReuseSettings(mode="naive", decode_recompute=0)),
                      ("cacheblend@0.15", ReuseSettings(mode="cacheblend", decode_recompute=0, min_recompute=0)),
                      ("dhd@0.15", ReuseSettings(mode="dhd", decode_recompute=0, min_recompute=0))]:
        res, _ = engine.generate(ids, plan, 1, settings=st)
        out[label] = {"kl_first": kl_divergence(full.first_logits, res.first_logits),
                      "max_abs_logit_diff": float((full.first_logits - res.first_logits).abs().max()),
                      "same_first_token": res.token_ids[:1] == full.token_ids[:1]}
    return out


# ---------------------------------------------------------------------------------------------
# Aggregation and findings


METRICS = ("reuse_rate", "rouge_l", "rouge_l_words", "exact", "prefix_match", "kl_first", "top1_first",
           "flops_saved", "ttft_s", "decode_s", "decode_recomputed", "prompt_tokens")


def aggregate(records: list[dict]) -> dict:
    out = {"n": len(records)}
    for m in METRICS:
        vals = np.array([float(r[m]) for r in records], dtype=np.float64)
        out[m] = float(vals.mean()) if len(vals) else float("nan")
        if m in ("rouge_l", "kl_first", "prefix_match"):
            out[m + "_median"] = float(np.median(vals)) if len(vals) else float("nan")
            out[m + "_sem"] = float(vals.std(ddof=1) / np.sqrt(len(vals))) if len(vals) > 1 else 0.0
    return out


def group(records: list[dict], *keys: str) -> dict:
    g: dict = defaultdict(list)
    for r in records:
        g[tuple(r[k] for k in keys) if len(keys) > 1 else r[keys[0]]].append(r)
    return g


def paired(records: list[dict], a: str, b: str, metric: str, seed: int = 0) -> dict | None:
    """Paired difference a - b of ``metric`` over follow-ups that ran both modes."""
    by = {(r["family"], r["followup"], r["mode"]): r[metric] for r in records}
    keys = sorted({(f, u) for f, u, m in by if m == a} & {(f, u) for f, u, m in by if m == b})
    if not keys:
        return None
    d = np.array([float(by[(*k, a)]) - float(by[(*k, b)]) for k in keys])
    rng = np.random.default_rng(seed)
    boots = rng.choice(d, size=(2000, len(d)), replace=True).mean(axis=1)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    eps = 1e-12
    return {"n": len(d), "mean_a": float(np.mean([by[(*k, a)] for k in keys])),
            "mean_b": float(np.mean([by[(*k, b)] for k in keys])), "mean_diff": float(d.mean()),
            "ci95": [float(lo), float(hi)], "wins": int((d > eps).sum()), "ties": int((np.abs(d) <= eps).sum()),
            "losses": int((d < -eps).sum())}


def check_order(records: list[dict], a: str, b: str, metric: str, higher_better: bool, scope: str) -> dict | None:
    """Does ``a`` >= ``b`` in quality hold (means of paired follow-ups)? A finding either way."""
    p = paired(records, a, b, metric)
    if p is None:
        return None
    sign = 1 if higher_better else -1
    holds = sign * p["mean_diff"] >= -1e-12
    significant = (p["ci95"][0] > 0 or p["ci95"][1] < 0)
    word = "holds" if holds else "DOES NOT HOLD"
    rel = ">=" if higher_better else "<="
    txt = (f"[{scope}] {a} {rel} {b} on {metric}: {word} — {a} {p['mean_a']:.4f} vs {b} {p['mean_b']:.4f} "
           f"(diff {p['mean_diff']:+.4f}, 95% CI [{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}], "
           f"{a} better/tie/worse on {p['wins'] if higher_better else p['losses']}/{p['ties']}/"
           f"{p['losses'] if higher_better else p['wins']} of {p['n']})"
           f"{'' if significant or p['mean_diff'] == 0 else ' — difference not significant'}")
    return {"scope": scope, "a": a, "b": b, "metric": metric, "higher_is_better": higher_better,
            "holds": bool(holds), "significant": bool(significant), **p, "text": txt}


def findings(records: list[dict], main_r: float, ratios: list[float]) -> list[dict]:
    out: list[dict] = []
    metrics = (("rouge_l", True), ("kl_first", False), ("prefix_match", True))
    cb, dh = f"cacheblend@{main_r:g}", f"dhd@{main_r:g}"
    mn, deep = f"+min{MIN_BUDGET}", f",c={DEEP_C}"
    chain = [("full", dh), (dh, cb), (cb, "naive"), (f"{dh}+dec3", dh), (dh, "epic"), ("prefix", dh),
             # the variants: minimum recompute budget, deeper check layer
             (dh + mn, dh), (cb + mn, cb), (dh + mn, cb + mn), (dh + deep, dh), (dh + deep + mn, dh + mn),
             (dh + mn, "epic")]
    for a, b in chain:
        for metric, hb in metrics:
            if a.endswith("+dec3") and metric == "kl_first":
                continue  # decode recomputation cannot change the first token: identical by construction
            f = check_order(records, a, b, metric, hb, "all follow-ups")
            if f:
                out.append(f)
    # Per kind, the headline chain on ROUGE-L only (few follow-ups per kind: indicative).
    for kind, recs in sorted(group(records, "kind").items()):
        for a, b in ((dh, cb), (cb, "naive"), (f"{dh}+dec3", dh), (dh + mn, dh), (dh + deep, dh)):
            f = check_order(recs, a, b, "rouge_l", True, f"kind={kind}")
            if f:
                out.append(f)
    # At equal r (sweep subset): dhd >= cacheblend >= naive.
    sub_keys = {(r["family"], r["followup"]) for r in records if r["mode"] == f"dhd@{ratios[0]:g}"}
    sub = [r for r in records if (r["family"], r["followup"]) in sub_keys]
    for r in ratios:
        for metric, hb in metrics[:2]:
            for a, b in ((f"dhd@{r:g}", f"cacheblend@{r:g}"), (f"cacheblend@{r:g}", "naive")):
                f = check_order(sub, a, b, metric, hb, f"sweep subset, r={r:g}")
                if f:
                    out.append(f)
    # Monotone in r? (the paper notes quality is not always monotone)
    for meth in ("dhd", "cacheblend"):
        for lo, hi in zip(ratios, ratios[1:]):
            f = check_order(sub, f"{meth}@{hi:g}", f"{meth}@{lo:g}", "rouge_l", True, "sweep subset, monotone in r")
            if f:
                out.append(f)
    return out


def variant_effects(records: list[dict], main_r: float) -> list[dict]:
    """For each variant: on how many follow-ups it recomputed other tokens than its base, and the
    paired ROUGE-L / KL difference on those (elsewhere the output is the base's by construction
    for +min; a deeper check layer changes the selection everywhere)."""
    cb, dh = f"cacheblend@{main_r:g}", f"dhd@{main_r:g}"
    mn, deep = f"+min{MIN_BUDGET}", f",c={DEEP_C}"
    by = {(r["family"], r["followup"], r["mode"]): r for r in records}
    out = []
    for var, base in ((dh + mn, dh), (cb + mn, cb), (dh + deep, dh), (dh + deep + mn, dh + deep)):
        keys = sorted({(f, u) for f, u, m in by if m == var} & {(f, u) for f, u, m in by if m == base})
        if not keys:
            continue
        changed = [k for k in keys if by[(*k, var)]["recomputed_tokens"] != by[(*k, base)]["recomputed_tokens"]]
        def mean(ks, metric, mode):
            return float(np.mean([by[(*k, mode)][metric] for k in ks])) if ks else float("nan")
        out.append({"variant": var, "base": base, "n": len(keys), "n_more_recomputed": len(changed),
                    "extra_recomputed_mean": mean(keys, "recomputed_tokens", var) - mean(keys, "recomputed_tokens", base),
                    "rouge_l_changed": [mean(changed, "rouge_l", base), mean(changed, "rouge_l", var)],
                    "kl_first_changed": [mean(changed, "kl_first", base), mean(changed, "kl_first", var)],
                    "flops_saved": [mean(keys, "flops_saved", base), mean(keys, "flops_saved", var)],
                    "changed": [list(k) + [by[(*k, base)]["kind"], by[(*k, base)]["recomputed_tokens"],
                                           by[(*k, var)]["recomputed_tokens"]] for k in changed]})
    return out


def findings_text(fs: list[dict], per_mode: dict, main_r: float, effects: list[dict] | None = None) -> list[str]:
    cb, dh = f"cacheblend@{main_r:g}", f"dhd@{main_r:g}"
    mn, deep = f"+min{MIN_BUDGET}", f",c={DEEP_C}"
    chain = [m for m in ("full", f"{dh}+dec3", dh + deep + mn, dh + deep, dh + mn, dh, cb + mn, cb, "epic", "naive")
             if m in per_mode]
    lines = ["Full compute is the reference, so 'full >= x' holds by construction (ROUGE-L 1, KL 0); "
             "the orderings that can fail are dhd >= cacheblend >= naive (at equal r).",
             "Mean ROUGE-L / first-token KL at r=%g: " % main_r
             + ", ".join(f"{m} {per_mode[m]['rouge_l']:.3f} / {per_mode[m]['kl_first']:.4f}" for m in chain)]
    head = [f for f in fs if f["scope"] == "all follow-ups" and f["a"] in (dh, cb) and f["b"] in (cb, "naive")
            and f["metric"] in ("rouge_l", "kl_first")]
    ok = all(f["holds"] for f in head)
    lines.append(f"Expected order full >= {dh} >= {cb} >= naive (ROUGE-L and KL, all follow-ups): "
                 + ("holds." if ok else "DOES NOT fully hold (see below)."))
    bad = [f for f in fs if not f["holds"]]
    lines.append(f"{len(fs) - len(bad)} of {len(fs)} ordering checks hold; these do NOT:" if bad
                 else f"all {len(fs)} ordering checks hold.")
    lines += ["  " + f["text"] for f in bad]
    for e in effects or []:
        if e["variant"].endswith(mn) and e["n_more_recomputed"] == 0:
            lines.append(f"{e['variant']} vs {e['base']}: the same tokens recomputed on all {e['n']} follow-ups")
        elif e["variant"].endswith(mn):
            lines.append(f"{e['variant']} vs {e['base']}: more tokens recomputed on {e['n_more_recomputed']} of "
                         f"{e['n']} follow-ups (mean +{e['extra_recomputed_mean']:.1f} tokens, FLOPs saved "
                         f"{e['flops_saved'][0]:.3f} -> {e['flops_saved'][1]:.3f}); on those, ROUGE-L "
                         f"{e['rouge_l_changed'][0]:.3f} -> {e['rouge_l_changed'][1]:.3f}, first-token KL "
                         f"{e['kl_first_changed'][0]:.4f} -> {e['kl_first_changed'][1]:.4f}")
        else:
            lines.append(f"{e['variant']} vs {e['base']}: FLOPs saved {e['flops_saved'][0]:.3f} -> "
                         f"{e['flops_saved'][1]:.3f} (layers 0..{DEEP_C} for every token after the prefix)")
    return lines


# ---------------------------------------------------------------------------------------------
# Output


def machine_info() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers
    return {"host": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
            "cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "transformers": transformers.__version__, "torch_threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "loadavg_start": list(os.getloadavg())}


def table(rows: list[tuple[str, dict]], title: str) -> list[str]:
    hdr = (f"{'mode':<22}{'n':>4}{'reuse':>8}{'ROUGE-L':>9}{'exact':>7}{'prefix':>8}{'KL first':>10}"
           f"{'top1':>6}{'FLOPs saved':>12}{'TTFT s':>8}")
    lines = [title, hdr, "-" * len(hdr)]
    for label, a in rows:
        lines.append(f"{label:<22}{a['n']:>4}{a['reuse_rate']:>8.3f}{a['rouge_l']:>9.3f}{a['exact']:>7.2f}"
                     f"{a['prefix_match']:>8.3f}{a['kl_first']:>10.4f}{a['top1_first']:>6.2f}"
                     f"{a['flops_saved']:>12.3f}{a['ttft_s']:>8.2f}")
    return lines


def plot(path: Path, per_mode: dict, mode_order: list[str], sweep: dict, ratios: list[float]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(13, 9))
    labels = [m for m in mode_order if m in per_mode]
    x = np.arange(len(labels))
    colors = ["#555555", "#8c564b", "#d62728", "#ff7f0e", "#1f77b4", "#2ca02c", "#17becf",
              "#aec7e8", "#98df8a", "#9467bd", "#c5b0d5"][:len(labels)]
    ax[0, 0].bar(x, [per_mode[m]["rouge_l"] for m in labels], yerr=[per_mode[m]["rouge_l_sem"] for m in labels],
                 color=colors, capsize=3)
    for xi, m in zip(x, labels):
        ax[0, 0].text(xi, 0.02, f"reuse\n{per_mode[m]['reuse_rate']:.0%}", ha="center", va="bottom",
                      fontsize=8, color="white")
    ax[0, 0].set_title("ROUGE-L vs full-compute output (mean ± s.e.; bar label: token reuse)")
    ax[0, 1].bar(x, [max(per_mode[m]["kl_first"], 1e-9) for m in labels],
                 yerr=[per_mode[m]["kl_first_sem"] for m in labels], color=colors, capsize=3)
    ax[0, 1].set_yscale("log")
    ax[0, 1].set_title("KL(full || mode), first-token distribution (nats, log scale)")
    for a in (ax[0, 0], ax[0, 1]):
        a.set_xticks(x, labels, rotation=25, ha="right")
        a.grid(axis="y", alpha=0.3)
    for k, (metric, title) in enumerate((("rouge_l", "ROUGE-L vs r (sweep subset)"),
                                         ("kl_first", "first-token KL vs r (sweep subset)"))):
        a = ax[1, k]
        for meth, c in (("dhd", "#2ca02c"), ("cacheblend", "#1f77b4")):
            ys = [sweep[f"{meth}@{r:g}"][metric] for r in ratios if f"{meth}@{r:g}" in sweep]
            rs = [r for r in ratios if f"{meth}@{r:g}" in sweep]
            a.plot(rs, ys, "o-", color=c, label=meth)
        if "naive" in sweep:
            a.axhline(sweep["naive"][metric], color="#d62728", ls="--", label="naive (r=0)")
        if "epic" in sweep:
            a.axhline(sweep["epic"][metric], color="#ff7f0e", ls=":", label="epic")
        a.set_xlabel("recompute ratio r")
        a.set_title(title)
        if metric == "kl_first":
            a.set_yscale("log")
        a.grid(alpha=0.3)
        a.legend()
    fig.suptitle("KV reuse quality, SmolLM2-135M-Instruct on CPU, prompts from real text")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--families", type=int, default=None, help="prompt families (default 25; quick: 2)")
    p.add_argument("--followups", type=int, default=1, help="follow-ups per family")
    p.add_argument("--max-new", type=int, default=None, help="greedy tokens per output (default 64; quick: 16)")
    p.add_argument("--max-chars", type=int, default=None, help="prompt size in characters (default 2500; quick: 1000)")
    p.add_argument("--sweep-families", type=int, default=None, help="families in the r sweep (default 10; quick: 1)")
    p.add_argument("--ratios", default="0.05,0.15,0.3,0.5", help="r values of the sweep")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--quick", action="store_true", help="smoke test: few small families, 16 tokens")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default results/reuse_quality.json; "
                                                          "quick: results/reuse_quality_quick.json)")
    p.add_argument("--plot", type=Path, default=None, help="PNG path (default: the JSON path with .png)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--resume", action="store_true", help="skip follow-ups already in <out>.partial.jsonl")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--replot", action="store_true", help="only redraw the PNG from an existing --out JSON")
    a = p.parse_args(argv)
    q = a.quick
    a.families = a.families if a.families is not None else (2 if q else 25)
    a.max_new = a.max_new if a.max_new is not None else (16 if q else 64)
    a.max_chars = a.max_chars if a.max_chars is not None else (1000 if q else 2500)
    a.sweep_families = a.sweep_families if a.sweep_families is not None else (1 if q else 10)
    a.out = a.out or RESULTS / ("reuse_quality_quick.json" if q else "reuse_quality.json")
    a.plot = a.plot or a.out.with_suffix(".png")
    a.ratio_list = [float(x) for x in a.ratios.split(",") if x]
    a.kind_list = [k for k in a.kinds.split(",") if k]
    return a


def main(argv=None) -> dict:
    args = parse(argv)
    if args.replot:
        res = json.loads(args.out.read_text())
        ratios = res["config"]["sweep_ratios"]
        order = [m for m in main_modes(res["config"]["main_r"])]
        plot(args.plot, res["per_mode"], [lab for lab, _ in order], res["sweep"]["per_mode"], ratios)
        print(f"wrote {args.plot}")
        return res
    torch.set_num_threads(args.threads)
    from tqdm import tqdm
    from workers.model_loader import load_runner, load_tokenizer

    t_start = time.time()
    started = dt.datetime.now(dt.timezone.utc)
    info = machine_info()
    runner = load_runner(args.model, device="cpu")
    tok = load_tokenizer(args.model)
    store = InMemorySegmentStore()
    engine = ReuseEngine(runner, store)

    fams = build_workload(args.families, kinds=args.kind_list, seed=args.seed, max_chars=args.max_chars,
                          n_followups=args.followups)
    modes = main_modes(MAIN_R)
    extra = [(lab, st) for lab, st in sweep_modes(args.ratio_list) if lab not in dict(modes)]
    partial = args.out.with_name(args.out.stem + ".partial.jsonl")
    records: list[dict] = []
    done: set[tuple[int, int]] = set()
    if args.resume and partial.exists():
        for line in partial.read_text().splitlines():
            rec = json.loads(line)
            records.append(rec)
            done.add((rec["family"], rec["followup"]))
    elif partial.exists():
        partial.unlink()
    partial.parent.mkdir(parents=True, exist_ok=True)

    total = sum(len(f.followups) * (len(modes) + (len(extra) if i < args.sweep_families else 0))
                for i, f in enumerate(fams))
    total -= sum(len(modes) + (len(extra) if f < args.sweep_families else 0) for f, _ in done)
    bar = tqdm(total=total, unit="gen", disable=args.no_progress, dynamic_ncols=True)
    sanity = None
    for i, fam in enumerate(fams):
        todo = [j for j in range(len(fam.followups)) if (i, j) not in done]
        if not todo:
            continue
        donor_ids = chat_ids(tok, fam.donor)
        donor_id = f"family-{i}"
        if not todo:
            continue
        bar.set_postfix_str(f"fam {i} donor ({len(donor_ids)} tokens)")
        _, seq = engine.generate(donor_ids, None, 0, settings=ReuseSettings(mode="full", decode_recompute=0),
                                 keep_segment=True)
        store.put(engine.segment_of(seq, donor_id))
        del seq
        if sanity is None:
            bar.set_postfix_str("sanity: self-reuse")
            sanity = sanity_checks(engine, donor_ids, donor_id)
        for j in todo:
            ids = chat_ids(tok, fam.followups[j])
            ms = modes + (extra if i < args.sweep_families else [])
            recs = run_followup(engine, tok, i, j, fam.kind, donor_id, donor_ids, ids, ms, args.max_new, bar)
            for r in recs:
                r["in_sweep"] = i < args.sweep_families
            records.extend(recs)
            with partial.open("a") as f:
                for r in recs:
                    f.write(json.dumps(r) + "\n")
        store.evict(donor_id)
    bar.close()

    # ---- aggregate
    mode_order = [lab for lab, _ in modes]
    by_mode = group(records, "mode")
    per_mode = {m: aggregate(by_mode[m]) for m in mode_order if m in by_mode}
    per_kind = {k: {m: aggregate(rs) for m, rs in sorted(group(krecs, "mode").items()) if m in mode_order}
                for k, krecs in sorted(group(records, "kind").items())}
    sweep_recs = [r for r in records if r["in_sweep"]]
    sweep_labels = ["naive", "epic", "full"] + [lab for lab, _ in sweep_modes(args.ratio_list)]
    sweep = {m: aggregate(rs) for m, rs in group(sweep_recs, "mode").items() if m in sweep_labels}
    fs = findings(records, MAIN_R, args.ratio_list)
    effects = variant_effects(records, MAIN_R)
    ftext = findings_text(fs, per_mode, MAIN_R, effects)

    info["loadavg_end"] = list(os.getloadavg())
    result = {
        "benchmark": "reuse_quality",
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(x) for x in [sys.executable, *sys.argv]),
        "wall_s": time.time() - t_start,
        "machine": info,
        "config": {"model": args.model, "model_fingerprint": runner.fingerprint, "families": args.families,
                   "followups_per_family": args.followups, "kinds": args.kind_list, "seed": args.seed,
                   "max_chars": args.max_chars, "max_new_tokens": args.max_new, "decoding": "greedy",
                   "align_min_run": 4, "check_layer": 1, "main_r": MAIN_R, "min_budget": MIN_BUDGET,
                   "deep_check_layer": DEEP_C, "sweep_ratios": args.ratio_list,
                   "sweep_families": args.sweep_families, "threads": args.threads, "quick": args.quick,
                   "modes": {lab: vars(st) if hasattr(st, "__dict__") else str(st) for lab, st in modes + extra},
                   "prompt_format": "chat template with add_generation_prompt=True; text prompts as one user message",
                   "rouge_l": "on generated token ids (rouge_l_words: on whitespace words of the decoded text)",
                   "reuse_rate": "cached tokens (reused, not recomputed in prefill) / prompt tokens",
                   "flops_saved": "1 - flops_fraction (linear-layer FLOPs of prefill vs full prefill)",
                   "timing_note": "CPU timings on a shared machine: indicative only"},
        "n_followups": len({(r["family"], r["followup"]) for r in records}),
        "resumed_followups": len(done),  # taken from <out>.partial.jsonl of an earlier, interrupted run
        "per_mode": per_mode,
        "per_kind": per_kind,
        "sweep": {"followups": len({(r["family"], r["followup"]) for r in sweep_recs}), "per_mode": sweep},
        "sanity_self_reuse": sanity,
        "findings": ftext,
        "findings_detail": fs,
        "variant_effects": effects,
        "records": records,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=lambda o: o.__dict__ if hasattr(o, "__dict__") else str(o)))
    if not args.no_plot:
        plot(args.plot, per_mode, mode_order, sweep, args.ratio_list)
    partial.unlink(missing_ok=True)

    # ---- print
    lines = table([(m, per_mode[m]) for m in mode_order if m in per_mode],
                  f"\nPer mode, {result['n_followups']} follow-ups, {args.max_new} greedy tokens "
                  f"(reuse = cached/prompt tokens; exact = identical output; prefix = leading-token match)")
    for k, pm in per_kind.items():
        lines += [""] + table([(m, pm[m]) for m in mode_order if m in pm], f"kind = {k}")
    sw = [(m, sweep[m]) for m in ["naive", "epic"] + [lab for lab, _ in sweep_modes(args.ratio_list)] if m in sweep]
    lines += [""] + table(sw, f"r sweep on {result['sweep']['followups']} follow-ups")
    if sanity:
        lines += ["", "Sanity (a prompt reusing its own KV must match full compute): "
                  + json.dumps({k: v for k, v in sanity.items()})]
    lines += ["", "Findings:"] + ftext
    lines += ["Ordering checks that hold:"] + ["  " + f["text"] for f in fs if f["holds"]]
    lines += ["", f"wrote {args.out}" + ("" if args.no_plot else f" and {args.plot}"),
              f"wall time {result['wall_s'] / 60:.1f} min"]
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
