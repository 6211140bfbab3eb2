"""KVSharer on one GPU: KV bytes per token, the largest batch that fits a KV budget, decode
tokens/s at that batch and 4k-token prefill time, without and with layer sharing, in one run.

    python benchmarks/kvsharer_gpu_bench.py --out benchmarks/results/kvsharer_gpu.json
    python benchmarks/kvsharer_gpu_bench.py --tiny --out /tmp/kvsharer_gpu_tiny.json   # CPU check

Model: Llama-3-8B shape with random bf16 weights (timing does not depend on weight values).
Sharing map: fixed at 25%, every layer l with l % 4 == 3 uses layer l - 1's KV (8 of 32 layers;
a searched map performs the same: only the number of stored layers matters for speed).
Max batch = floor(KV budget / (KV bytes per token x context)); the default budget, 24 GiB, is a
multiple of both per-sequence sizes so the batch ratio is exactly 4/3 (with 20 GiB flooring
gives 40 -> 53, +32.5%); smaller budgets (12, 6 GiB) show how the decode gain depends on the
share of weight reads in a step. Decode: a static batch (workers/batch_decode.py), every sequence at
context - steps tokens already cached (the cache holds zeros: kernels do not care), greedy
next tokens, ``--steps`` timed steps after warm-up; the cache is allocated at full size first so
"fits" is checked for real. Needs only torch, numpy and xxhash.

What to expect (the bandwidth model printed beside the measurements): a shared layer still reads
the KV it attends over, so at equal batch a decode step reads nearly the same bytes (only the
dropped K/V projection weights are saved); the gain comes from the larger batch amortizing the
weight reads: speedup = (4/3) (W + K) / (W + 4K/3), W = weight bytes, K = the budget's KV bytes.
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from workers.batch_decode import (BatchKV, GraphedBatchStep, batch_decode_step, batch_prefill,  # noqa: E402
                                  kv_bytes_per_token)
from workers.model_loader import LLAMA3_8B, random_runner  # noqa: E402
from workers.model_spec import ModelSpec  # noqa: E402

GIB = 1 << 30
TINY = dict(vocab_size=1024, hidden_size=128, num_layers=8, num_heads=4, num_kv_heads=2, head_dim=32,
            intermediate_size=256, max_position=4096)


def gib(nbytes: int) -> str:
    return f"{nbytes / GIB:g} GiB"


def fixed_map(num_layers: int) -> list[int]:
    """25%: layer l with l % 4 == 3 uses layer l - 1's KV."""
    return [l - 1 if l % 4 == 3 else l for l in range(num_layers)]


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def time_prefill(runner, n: int, reps: int) -> dict:
    """One prompt of n tokens through all layers (last-token logits), median of reps."""
    dev = runner.device
    ids = torch.randint(0, runner.spec.vocab_size, (1, n), device=dev)
    times = []
    for i in range(reps + 1):
        sync(dev)
        t = time.perf_counter()
        cache, logits = batch_prefill(runner, ids)
        logits.argmax(-1)
        sync(dev)
        if i:  # first run is warm-up
            times.append(time.perf_counter() - t)
        del cache, logits
    free(dev)
    return {"tokens": n, "median_ms": statistics.median(times) * 1e3, "runs_ms": [t * 1e3 for t in times]}


def time_decode(runner, batch: int, context: int, steps: int, warmup: int, graph: bool,
                graph_attn: str = "auto") -> dict:
    """Decode ``steps`` tokens per sequence at ``batch`` with the cache filled to about
    ``context``; tokens/s over the batch. ``graph``: the static-shape step replayed as a CUDA
    graph (captured during warm-up; run eagerly where CUDA is absent); else the eager step."""
    dev = runner.device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    cache = BatchKV.empty(runner, batch, context)  # the whole budgeted cache, allocated up front
    cache.length = context - steps - warmup
    tok = torch.randint(0, runner.spec.vocab_size, (batch,), device=dev)
    step = GraphedBatchStep(runner, cache, attn=graph_attn) if graph else (lambda t: batch_decode_step(runner, cache, t))
    for _ in range(warmup):
        tok = step(tok).argmax(-1)
    sync(dev)
    t = time.perf_counter()
    for _ in range(steps):
        tok = step(tok).argmax(-1)
    sync(dev)
    dt_s = time.perf_counter() - t
    out = {"batch": batch, "context": context, "steps": steps, "cache_gib": cache.nbytes / GIB,
           "ms_per_step": dt_s / steps * 1e3, "tokens_per_s": batch * steps / dt_s}
    if graph:
        out["captured"] = step.graph is not None
        if step.graph_error:
            out["graph_error"] = step.graph_error
    if dev.type == "cuda":
        out["peak_allocated_gib"] = torch.cuda.max_memory_allocated(dev) / GIB
    del cache, tok, step
    free(dev)
    return out


def check_graph(runner, graph_attn: str, batch: int = 4, prompt: int = 64, steps: int = 4) -> dict:
    """The graphed step against the eager step on the same inputs: logits and greedy tokens."""
    dev = runner.device
    ids = torch.randint(0, runner.spec.vocab_size, (batch, prompt), device=dev)
    c1, logits = batch_prefill(runner, ids, steps)
    c2 = c1.clone()
    step = GraphedBatchStep(runner, c2, attn=graph_attn)
    tok, diff, same = logits.argmax(-1), 0.0, 0
    for _ in range(steps):
        a, b = batch_decode_step(runner, c1, tok), step(tok)
        diff = max(diff, float((a.float() - b.float()).abs().max()))
        same += int((a.argmax(-1) == b.argmax(-1)).sum())
        tok = a.argmax(-1)
    out = {"captured": step.graph is not None, "max_abs_logit_diff": diff,
           "argmax_agreement": same / (batch * steps), "logit_scale": float(logits.float().abs().max())}
    if step.graph_error:
        out["graph_error"] = step.graph_error
    del c1, c2, step
    free(dev)
    return out


def measure(runner, label: str, budgets: list[int], context: int, steps: int, warmup: int,
            prefill_reps: int, extra_batches: list[int], modes: list[str], graph_attn: str = "auto") -> dict:
    """Prefill once; decode (each mode) at the max batch of every budget, plus ``extra_batches``."""
    bpt = kv_bytes_per_token(runner)
    max_batch = {gib(b): b // (bpt * context) for b in budgets}
    if min(max_batch.values()) < 1:
        raise SystemExit(f"{label}: a KV budget holds no sequence of {context} tokens")
    res = {"label": label, "kv_layers": len(runner.kv_layers), "kv_bytes_per_token": bpt,
           "max_batch": max_batch}
    print(f"[{label}] {bpt} B/token, max batch by KV budget {max_batch}", flush=True)
    if "graph" in modes:
        res["graph_check"] = check_graph(runner, graph_attn)
        print(f"[{label}] graphed step vs eager: {res['graph_check']}", flush=True)
    res["prefill"] = time_prefill(runner, context, prefill_reps)
    print(f"[{label}] prefill {context} tokens: {res['prefill']['median_ms']:.1f} ms", flush=True)
    for mode in modes:
        key = "decode" if mode == "eager" else "decode_graph"
        res[key] = {}
        for b in dict.fromkeys(list(max_batch.values()) + extra_batches):
            d = time_decode(runner, b, context, steps, warmup, graph=mode == "graph", graph_attn=graph_attn)
            res[key][str(b)] = d
            note = "" if mode == "eager" else (" (graph)" if d.get("captured") else " (static, not captured)")
            print(f"[{label}] {mode} decode batch {b}: {d['ms_per_step']:.2f} ms/step, "
                  f"{d['tokens_per_s']:.0f} tokens/s{note}", flush=True)
    return res


def bandwidth_model(spec: ModelSpec, n_kv_layers: int, elem: int, batch: int, context: int) -> float:
    """Bytes one decode step must read from memory: all weights once (the embedding only for
    the batch's rows) plus, for EVERY layer, its source's KV (a shared layer still reads the KV
    it attends over, so sharing shrinks the cache, not the KV each step reads)."""
    s = spec
    kv_row = s.num_kv_heads * s.head_dim * 2 * elem
    per_layer = (s.hidden_size * s.q_size + s.q_size * s.hidden_size + 3 * s.hidden_size * s.intermediate_size)
    weights = (s.num_layers * per_layer + n_kv_layers * 2 * s.kv_size * s.hidden_size + s.vocab_size * s.hidden_size) * elem
    return weights + s.num_layers * batch * context * kv_row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true", help="tiny model on CPU: checks the logic only")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    ap.add_argument("--budget-gib", type=float, nargs="+", default=None,
                    help="KV budgets; the first is the headline (default 24 12 6; tiny 0.006 0.003)")
    ap.add_argument("--context", type=int, default=None, help="tokens per sequence (default 4096; tiny 128)")
    ap.add_argument("--steps", type=int, default=None, help="timed decode steps (default 32; tiny 4)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-graph", action="store_true", help="eager decode only (no CUDA-graph step)")
    ap.add_argument("--graph-attn", choices=("auto", "sdpa", "matmul"), default="auto",
                    help="attention in the graphed step: masked SDPA (flash/efficient), two matmuls, "
                         "or auto (matmuls when batch x KV heads < 128)")
    ap.add_argument("--prefill-reps", type=int, default=None, help="default 5 (tiny 2)")
    args = ap.parse_args(argv)
    tiny = args.tiny
    dev = torch.device(args.device or ("cpu" if tiny else "cuda"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU, or pass --tiny for a CPU logic check")
    dtype = torch.float32 if (tiny and dev.type == "cpu") else torch.bfloat16
    budgets = [int(g * GIB) for g in (args.budget_gib or ([0.006, 0.003] if tiny else [24, 12, 6]))]
    budget = budgets[0]
    context = args.context or (128 if tiny else 4096)
    steps = args.steps or (4 if tiny else 32)
    reps = args.prefill_reps or (2 if tiny else 5)
    spec = ModelSpec(**(TINY if tiny else LLAMA3_8B))
    t0 = time.perf_counter()
    torch.manual_seed(0)
    runner = random_runner(spec, dev, dtype)
    sync(dev)
    build_s = time.perf_counter() - t0
    kv_map = fixed_map(spec.num_layers)
    n_shared = sum(1 for l, s in enumerate(kv_map) if s != l)

    modes = ["eager"] if args.no_graph else ["graph", "eager"]
    base = measure(runner, "no sharing", budgets, context, steps, args.warmup, reps, [1], modes,
                   args.graph_attn)
    b0 = base["max_batch"][gib(budget)]
    runner.share_kv(kv_map)  # in place: the shared layers drop their K/V projection rows
    free(dev)
    shared = measure(runner, "kvsharer 25%", budgets, context, steps, args.warmup, reps,
                     list(base["max_batch"].values()) + [1], modes, args.graph_attn)
    b1 = shared["max_batch"][gib(budget)]
    captured = "graph" in modes and all(d.get("captured") for r in (base, shared)
                                        for d in r["decode_graph"].values())
    headline = "graph" if captured else "eager"
    elem = torch.finfo(dtype).bits // 8

    def decode_summary(key: str) -> dict:
        def tps(res, b):
            return res[key][str(b)]["tokens_per_s"]

        by_budget = []
        for bud in budgets:
            x0, x1 = base["max_batch"][gib(bud)], shared["max_batch"][gib(bud)]
            m0 = bandwidth_model(spec, spec.num_layers, elem, x0, context)
            m1 = bandwidth_model(spec, spec.num_layers - n_shared, elem, x1, context)
            m1s = bandwidth_model(spec, spec.num_layers - n_shared, elem, x0, context)
            by_budget.append({"budget_gib": bud / GIB, "batch_no_sharing": x0, "batch_sharing": x1,
                              "tokens_per_s_no_sharing": tps(base, x0), "tokens_per_s_sharing": tps(shared, x1),
                              "speedup_at_max_batches": tps(shared, x1) / tps(base, x0),
                              "speedup_same_batch": tps(shared, x0) / tps(base, x0),
                              "bandwidth_model_speedup_at_max_batches": (x1 / m1) / (x0 / m0),
                              "bandwidth_model_speedup_same_batch": m0 / m1s})
        return {"tokens_per_s": (tps(base, b0), tps(shared, b1), tps(shared, b0), tps(base, 1), tps(shared, 1)),
                "decode_speedup_at_max_batches": tps(shared, b1) / tps(base, b0),
                "decode_speedup_same_batch": tps(shared, b0) / tps(base, b0),
                "decode_speedup_batch1": tps(shared, 1) / tps(base, 1),
                "by_budget": by_budget}

    per_mode = {m: decode_summary("decode" if m == "eager" else "decode_graph") for m in modes}
    top = per_mode[headline]
    summary = {
        "headline_decode": headline,
        "kv_bytes_change": shared["kv_bytes_per_token"] / base["kv_bytes_per_token"] - 1,
        "max_batch_change": b1 / b0 - 1,
        "decode_speedup_at_max_batches": top["decode_speedup_at_max_batches"],
        "decode_speedup_same_batch": top["decode_speedup_same_batch"],
        "decode_speedup_batch1": top["decode_speedup_batch1"],
        "prefill_speedup": base["prefill"]["median_ms"] / shared["prefill"]["median_ms"],
        "by_budget": top["by_budget"],
        "decode_modes": per_mode,
    }
    goals = {"kv_bytes_minus_25pct": summary["kv_bytes_change"] <= -0.25 + 1e-9,
             "max_batch_plus_33pct": summary["max_batch_change"] >= 0.33,
             "decode_1_2x_at_max_batch": summary["decode_speedup_at_max_batches"] >= 1.2}
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    out = {
        "benchmark": "kvsharer_gpu", "tiny": tiny,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0]] + list(argv or sys.argv[1:])),
        "machine": {"device": gpu, "platform": platform.platform(), "torch": torch.__version__,
                    "cuda": torch.version.cuda, "cpus": os.cpu_count()},
        "model": {"spec": spec.to_dict(), "dtype": str(dtype), "weights": "random", "build_s": build_s},
        "kv_source": kv_map, "shared_layers": n_shared, "kv_budget_gib": [b / GIB for b in budgets],
        "context": context,
        "no_sharing": base, "sharing": shared, "summary": summary, "goals": goals,
        "wall_s": time.perf_counter() - t0,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")

    rows = [("KV bytes / token", base["kv_bytes_per_token"], shared["kv_bytes_per_token"], summary["kv_bytes_change"]),
            (f"max batch ({budget / GIB:g} GiB, ctx {context})", b0, b1, summary["max_batch_change"]),
            (f"prefill {context} tokens (ms)", base["prefill"]["median_ms"], shared["prefill"]["median_ms"],
             shared["prefill"]["median_ms"] / base["prefill"]["median_ms"] - 1)]
    for m in modes:
        t = per_mode[m]["tokens_per_s"]
        tag = m if m == "eager" else ("graph" if captured else "static")
        rows += [(f"{tag} decode tok/s, max batch ({b0} vs {b1})", t[0], t[1], t[1] / t[0] - 1),
                 (f"{tag} decode tok/s, same batch ({b0})", t[0], t[2], t[2] / t[0] - 1),
                 (f"{tag} decode tok/s, batch 1", t[3], t[4], t[4] / t[3] - 1)]
    print(f"\nKVSharer, {'tiny' if tiny else 'Llama-3-8B'} shape, {gpu}, {n_shared}/{spec.num_layers} layers shared")
    print(f"{'':44s}{'no sharing':>13s}{'sharing':>13s}{'change':>9s}")
    for name, a, b, ch in rows:
        print(f"{name:44s}{a:13,.1f}{b:13,.1f}{ch:+9.1%}")
    print(f"\n{headline} decode by KV budget (model: bandwidth model's speedup)")
    print(f"{'budget':>8s}{'batch':>11s}{'tok/s':>22s}{'speedup':>9s}{'same batch':>11s}"
          f"{'model':>8s}{'model same':>11s}")
    for r in summary["by_budget"]:
        print(f"{r['budget_gib']:7g}G{r['batch_no_sharing']:5d}->{r['batch_sharing']:<5d}"
              f"{r['tokens_per_s_no_sharing']:10,.0f}->{r['tokens_per_s_sharing']:<10,.0f}"
              f"{r['speedup_at_max_batches']:8.2f}x{r['speedup_same_batch']:10.2f}x"
              f"{r['bandwidth_model_speedup_at_max_batches']:7.2f}x{r['bandwidth_model_speedup_same_batch']:10.2f}x")
    print("goals:", json.dumps(goals))
    print(f"wrote {args.out} ({out['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
