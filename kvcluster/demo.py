"""``kvcluster demo``: real prompts through ``submit()``, three ways side by side.

The same request stream (prompt families from real text: reordered documents, a changed
instruction, inserted sentences, a conversation, an FAQ, and unrelated prompts that resemble
nothing) runs through three embedded clusters that share one loaded model:

  semantic  the configured reuse (DHD by default): exact prefix + semantic donors, aligned
  prefix    exact prefix caching alone (hash-chained blocks, as vLLM), no semantic search
  full      full compute, the reference for ROUGE-L and TTFT

and the demo prints the token hit rate of semantic + prefix reuse against prefix caching alone,
ROUGE-L of each against full compute, and TTFT against full compute; it saves a JSON and a PNG.
Each cluster has a fresh embedded Qdrant in a temporary folder, so runs are repeatable.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kvcluster.config import KVClusterConfig
from kvcluster.workloads import KINDS, build_workload, request_stream

log = logging.getLogger(__name__)

DEFAULT_OUT = "benchmarks/results/demo"
MODES = ("semantic", "prefix", "full")
BLOCK_TOKENS = 16
LABELS = {"semantic": "semantic + prefix reuse", "prefix": "exact prefix caching alone", "full": "full compute"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--families", type=int, default=8, help="prompt families (default 8)")
    p.add_argument("--followups", type=int, default=1, help="follow-up prompts per family (default 1)")
    p.add_argument("--max-tokens", type=int, default=24, help="tokens generated per request (default 24)")
    p.add_argument("--max-chars", type=int, default=3000, help="approximate prompt size in characters")
    p.add_argument("--kinds", default=",".join(KINDS), help="comma-separated family kinds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=DEFAULT_OUT, help=f"folder for demo.json and demo.png (default {DEFAULT_OUT})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_from_args(args, config: KVClusterConfig) -> int:
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    report = run_workload(config, families=args.families, followups=args.followups, max_tokens=args.max_tokens,
                          max_chars=args.max_chars, kinds=kinds, seed=args.seed, progress=not args.no_progress)
    report["command"] = "kvcluster demo " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["demo"] else "kvcluster demo"
    print_report(report)
    paths = save_report(report, Path(args.out), "demo")
    print(f"saved {', '.join(str(p) for p in paths)}")
    return 0


# ---- running -----------------------------------------------------------------------------------
def _mode_config(base: KVClusterConfig, mode: str, qdrant_path: str) -> KVClusterConfig:
    data = base.model_dump()
    data["index"].update(qdrant_url=None, qdrant_path=qdrant_path)
    data["cluster"]["address"] = None
    # vLLM's default block size, for both: the finer the blocks, the more exact prefix caching
    # finds, so the baseline is as strong as it gets, and semantic + prefix differs from it only
    # by the semantic search
    data["index"]["block_tokens"] = min(data["index"]["block_tokens"], BLOCK_TOKENS)
    if mode == "prefix":
        data["reuse"]["mode"] = "prefix"
    elif mode == "full":
        data["reuse"]["mode"] = "full"
    elif data["reuse"]["mode"] in ("full", "prefix"):
        data["reuse"]["mode"] = "dhd"
    return KVClusterConfig.model_validate(data)


def run_workload(config: KVClusterConfig | None = None, families: int = 8, followups: int = 1,
                 max_tokens: int = 24, max_chars: int = 3000, kinds=KINDS, seed: int = 0,
                 progress: bool = True) -> dict[str, Any]:
    """Runs the stream through the three clusters; returns the report (records + summary)."""
    from index_service.embedder import Embedder
    from kvcluster.client import EmbeddedClient
    from kvcluster.embedded import EmbeddedCluster
    from kvcluster.quality import rouge_l
    from workers.model_loader import load_runner, load_tokenizer

    base = config or KVClusterConfig()
    fams = build_workload(families, kinds=kinds, seed=seed, max_chars=max_chars, n_followups=followups)
    stream = request_stream(fams, seed=seed)
    t_load = time.perf_counter()
    m = base.model
    runner = load_runner(m.name, m.gguf_file, m.dtype, m.device)
    tokenizer = load_tokenizer(m.name, m.gguf_file)
    embedder = Embedder()
    embedder.warmup()
    load_s = time.perf_counter() - t_load

    with tempfile.TemporaryDirectory(prefix="kvcluster-demo-") as tmp:
        clusters = {mode: EmbeddedCluster(_mode_config(base, mode, os.path.join(tmp, mode)),
                                          runner=runner, tokenizer=tokenizer, embedder=embedder)
                    for mode in MODES}
        clients = {mode: EmbeddedClient(cluster=c) for mode, c in clusters.items()}
        # one warm-up request (not recorded, no write-back) so the first timing is not a cold start
        clients["full"].submit("Say hello.", max_tokens=2)
        records = []
        t_run = time.perf_counter()
        bar = _Bar(len(stream) * len(MODES), enabled=progress)
        try:
            for req in stream:
                rec: dict[str, Any] = {"family": req.family, "position": req.position, "kind": req.kind}
                for mode in ("full", "prefix", "semantic"):
                    bar.describe(f"{req.kind} #{req.family}.{req.position} [{mode}]")
                    r = clients[mode].submit(req.prompt, max_tokens=max_tokens)
                    rec[mode] = {"source": r.source, "prompt_tokens": r.prompt_tokens,
                                 "reused_tokens": r.reused_tokens, "cached_tokens": r.cached_tokens,
                                 "recomputed_tokens": r.recomputed_tokens, "ttft_s": r.ttft_s,
                                 "lookup_s": r.lookup_s, "prefill_s": r.prefill_s, "decode_s": r.decode_s,
                                 "flops_fraction": r.flops_fraction, "fallback": r.fallback,
                                 "donors": len(r.donor_ids), "text": r.text}
                    bar.advance()
                rec["prompt_tokens"] = rec["full"]["prompt_tokens"]
                for mode in ("semantic", "prefix"):
                    rec[mode]["rouge_l"] = rouge_l(rec[mode]["text"], rec["full"]["text"])
                records.append(rec)
        finally:
            bar.close()
            for c in clients.values():
                c.close()
        run_s = time.perf_counter() - t_run

    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "model": runner.name, "fingerprint": runner.fingerprint,
        "reuse": clusters["semantic"].config.reuse.model_dump(),
        "index": {k: v for k, v in clusters["semantic"].config.index.model_dump().items() if k != "qdrant_path"},
        "prefix_block_tokens": clusters["prefix"].config.index.block_tokens,  # = index.block_tokens
        "workload": {"families": families, "followups": followups, "max_chars": max_chars, "kinds": list(kinds),
                     "seed": seed, "requests": len(stream), "max_tokens": max_tokens},
        "load_s": load_s, "run_s": run_s,
        "summary": summarize(records),
        "records": records,
    }


class _Bar:
    """A rich progress bar (plain lines when stderr is not a terminal)."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total, self.done, self._p = total, 0, None
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)
            self._p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                               TimeElapsedColumn(), TimeRemainingColumn(), transient=False)
            self._p.start()
            self._task = self._p.add_task("starting", total=total)
        self._t0 = time.perf_counter()

    def describe(self, text: str) -> None:
        if self._p is not None:
            self._p.update(self._task, description=text)
        self._desc = text

    def advance(self) -> None:
        self.done += 1
        if self._p is not None:
            self._p.advance(self._task)
        elif self.enabled:
            print(f"[{self.done}/{self.total} {time.perf_counter() - self._t0:6.0f}s] {self._desc}",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._p is not None:
            self._p.stop()


# ---- numbers -------------------------------------------------------------------------------------
def _rate(recs, mode: str, key: str = "reused_tokens") -> float:
    total = sum(r["prompt_tokens"] for r in recs)
    return sum(r[mode][key] for r in recs) / total if total else 0.0


def _mean(xs) -> float | None:
    xs = list(xs)
    return statistics.fmean(xs) if xs else None


def _ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


def _block(recs) -> dict[str, Any]:
    out: dict[str, Any] = {"requests": len(recs), "prompt_tokens": sum(r["prompt_tokens"] for r in recs)}
    for mode in ("semantic", "prefix"):
        out[f"hit_rate_{mode}"] = _rate(recs, mode)
        out[f"cached_rate_{mode}"] = _rate(recs, mode, "cached_tokens")
        out[f"rouge_l_{mode}"] = _mean(r[mode]["rouge_l"] for r in recs)
    out["hit_rate_ratio"] = _ratio(out["hit_rate_semantic"], out["hit_rate_prefix"])
    if out["hit_rate_ratio"] is None and out["hit_rate_semantic"] > 0:
        out["hit_rate_ratio"] = math.inf  # prefix caching found nothing at all
    for mode in ("semantic", "prefix"):
        out[f"flops_fraction_{mode}"] = _mean(r[mode]["flops_fraction"] for r in recs)
    for mode in MODES:
        out[f"ttft_s_{mode}"] = _mean(r[mode]["ttft_s"] for r in recs)
        out[f"prefill_s_{mode}"] = _mean(r[mode]["prefill_s"] for r in recs)
    out["lookup_s_semantic"] = _mean(r["semantic"]["lookup_s"] for r in recs)
    out["ttft_ratio_semantic_vs_full"] = _ratio(out["ttft_s_semantic"], out["ttft_s_full"])
    out["ttft_ratio_prefix_vs_full"] = _ratio(out["ttft_s_prefix"], out["ttft_s_full"])
    out["sources_semantic"] = {s: sum(r["semantic"]["source"] == s for r in recs) for s in ("prefix", "semantic", "miss")}
    return out


def summarize(records: list[dict]) -> dict[str, Any]:
    """All requests; follow-ups only (donors are misses in every mode); and per kind (follow-ups)."""
    follow = [r for r in records if r["position"] > 0]
    kinds = list(dict.fromkeys(r["kind"] for r in records))
    return {"all": _block(records), "followups": _block(follow),
            "by_kind": {k: _block([r for r in follow if r["kind"] == k]) for k in kinds}}


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine()}
    try:
        import torch
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:  # pragma: no cover
        pass
    info["env"] = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY") if k in os.environ}
    try:
        info["loadavg_at_end"] = os.getloadavg()
    except OSError:  # pragma: no cover
        pass
    return info


# ---- output --------------------------------------------------------------------------------------
def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _f(x, fmt="{:.3f}") -> str:
    if x is None:
        return "-"
    return "inf" if math.isinf(x) else fmt.format(x)


def print_report(report: dict[str, Any], file=None) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(file=file or sys.stdout, width=150)
    s = report["summary"]
    w = report["workload"]
    t = Table(title=f"kvcluster demo: {w['requests']} requests ({w['families']} families x "
                    f"{1 + w['followups']}), {w['max_tokens']} tokens each, reuse mode {report['reuse']['mode']}")
    for col in ("", "requests", "hit rate\nsem+prefix", "hit rate\nprefix only", "ratio", "ROUGE-L\nsem",
                "ROUGE-L\nprefix", "prefill FLOPs\nsem / full", "TTFT / full\nsem", "TTFT / full\nprefix"):
        t.add_column(col, justify="right" if col else "left", no_wrap=not col)

    def row(name, b, style=None):
        t.add_row(name, str(b["requests"]), _pct(b["hit_rate_semantic"]), _pct(b["hit_rate_prefix"]),
                  _f(b["hit_rate_ratio"], "{:.2f}x"), _f(b["rouge_l_semantic"]), _f(b["rouge_l_prefix"]),
                  _f(b["flops_fraction_semantic"], "{:.2f}"), _f(b["ttft_ratio_semantic_vs_full"], "{:.2f}"),
                  _f(b["ttft_ratio_prefix_vs_full"], "{:.2f}"), style=style)

    row("all requests", s["all"], "bold")
    row("follow-ups", s["followups"], "bold")
    for k, b in s["by_kind"].items():
        row(f"  {k}", b)
    con.print(t)
    f = s["followups"]
    con.print(f"follow-ups: mean TTFT full {_f(f['ttft_s_full'])} s, prefix {_f(f['ttft_s_prefix'])} s, "
              f"semantic {_f(f['ttft_s_semantic'])} s (of which lookup {_f(f['lookup_s_semantic'])} s); "
              f"semantic sources {f['sources_semantic']}")
    con.print(f"hit rate = prompt tokens whose KV came from the cache (DHD recomputes "
              f"{report['reuse']['recompute_ratio']:.0%} of them) / prompt tokens; "
              f"kept as-is: semantic {_pct(f['cached_rate_semantic'])}, prefix {_pct(f['cached_rate_prefix'])} "
              f"of follow-up tokens. Model load {report['load_s']:.0f} s, run {report['run_s']:.0f} s.")


def save_report(report: dict[str, Any], out: Path, stem: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    jp = out / f"{stem}.json"
    jp.write_text(json.dumps(_jsonable(report), indent=2, allow_nan=False) + "\n")
    paths = [jp]
    try:
        paths.append(plot_report(report, out / f"{stem}.png"))
    except Exception as e:  # noqa: BLE001 - the numbers matter more than the picture
        log.warning("plot failed: %s", e)
    return paths


def _jsonable(x):
    """Non-finite floats as strings ("inf"): strict JSON has no Infinity."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def plot_report(report: dict[str, Any], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    s = report["summary"]
    names = ["all follow-ups", *s["by_kind"]]
    blocks = [s["followups"], *s["by_kind"].values()]
    x = np.arange(len(names))
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    ax = axes[0]
    ax.bar(x - 0.2, [100 * b["hit_rate_semantic"] for b in blocks], 0.4, label=LABELS["semantic"])
    ax.bar(x + 0.2, [100 * b["hit_rate_prefix"] for b in blocks], 0.4, label=LABELS["prefix"])
    ax.set_ylabel("token hit rate (%)")
    ax.set_title("prompt tokens served from the KV cache")
    ax = axes[1]
    ax.bar(x - 0.2, [b["rouge_l_semantic"] or 0 for b in blocks], 0.4, label=LABELS["semantic"])
    ax.bar(x + 0.2, [b["rouge_l_prefix"] or 0 for b in blocks], 0.4, label=LABELS["prefix"])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("ROUGE-L vs full compute")
    ax.set_title("output quality")
    ax = axes[2]
    for i, mode in enumerate(MODES):
        ax.bar(x + (i - 1) * 0.27, [b[f"ttft_s_{mode}"] or 0 for b in blocks], 0.27, label=LABELS[mode])
    ax.set_ylabel("mean TTFT (s)")
    ax.set_title("time to first token")
    for ax in axes:
        ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
        ax.legend(fontsize=7)
    w = report["workload"]
    fig.suptitle(f"{report['model']}, reuse {report['reuse']['mode']}: {w['requests']} requests, "
                 f"{w['families']} families, {report['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
