"""TTFT of prefill with reuse vs full prefill on one GPU, Llama-3-8B shape, random bf16 weights.

    python benchmarks/reuse_gpu_bench.py --out benchmarks/results/reuse_gpu.json

Per prompt length: full prefill (and its MFU against a bf16 matmul peak measured in the same
run), an exact-prefix hit with the KV already on the GPU, and dhd (r = 0.15, 0.05) and cacheblend
with 90% and 98% of the prompt's tokens reused. Each reuse mode's FLOP limit is the speedup if
only its linear-layer FLOPs counted: layers 0..c for every token plus layers c+1..L-1 for the
recomputed tokens, over full prefill. Needs only torch, numpy, xxhash (no Ray/Redis/Qdrant).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from index_service.plan import ReusePlan, ReuseSpan  # noqa: E402
from workers.engine import ReuseEngine, ReuseSettings  # noqa: E402
from workers.model_loader import LLAMA3_8B, random_runner  # noqa: E402
from workers.model_spec import ModelSpec  # noqa: E402
from workers.segments import InMemorySegmentStore  # noqa: E402
from benchmarks.variants import apply_variant  # noqa: E402


def matmul_peak(dtype=torch.bfloat16, n: int = 8192, reps: int = 10) -> float:
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def hbm_bandwidth(nbytes: int = 1 << 30, reps: int = 10) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second)."""
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        b.copy_(a)
    torch.cuda.synchronize()
    return 2 * nbytes * reps / (time.perf_counter() - t)


def layer_params(s: ModelSpec) -> int:
    """Weights of one layer's linear layers (q/k/v, o, gate/up, down)."""
    return s.hidden_size * (s.q_size + 2 * s.kv_size) + s.q_size * s.hidden_size + 3 * s.hidden_size * s.intermediate_size


def weight_read_bytes(s: ModelSpec, dtype_bytes: int = 2) -> int:
    """What a one-token step reads: every layer's linear weights and the LM head, once."""
    return dtype_bytes * (s.num_layers * layer_params(s) + s.vocab_size * s.hidden_size)


def pass_bound_s(spec: ModelSpec, layers: int, m: int, n_keys: int, peak: float, bw: float) -> float:
    """Roofline time of ``layers`` layers over m tokens attending n_keys keys: the larger of FLOPs
    over the matmul peak and bytes (weights + KV read) over the bandwidth."""
    s = spec
    params = layer_params(s)
    flops = layers * (2 * params * m + 4 * s.num_heads * s.head_dim * m * n_keys / (2 if m == n_keys else 1))
    nbytes = layers * (2 * params + 2 * 2 * s.kv_size * n_keys)
    return max(flops / peak, nbytes / bw)


def mode_bound_s(spec: ModelSpec, n: int, prefix: int, upper_tokens: int, c: int | None, placed: int,
                 peak: float, bw: float) -> float:
    """Physical limit of the work one prefill with reuse does: donor KV placement (read + write
    every placed row), for checked modes layers 0..c-1 and layer c's q/k/v over the tokens after
    the exact prefix, the remaining layers (all layers when c is None) over the computed tokens,
    and the logits of the last token."""
    s, L = spec, spec.num_layers
    t = placed * 2 * 2 * 2 * s.kv_size * L / bw
    if c is None:
        t += pass_bound_s(spec, L, upper_tokens, n, peak, bw)
    else:
        t += pass_bound_s(spec, c, n - prefix, n, peak, bw)
        t += 2 * s.hidden_size * (s.q_size + 2 * s.kv_size) * (n - prefix) / peak
        t += pass_bound_s(spec, L - c, upper_tokens, n, peak, bw)
    return t + max(2 * s.hidden_size * s.vocab_size / peak, 2 * s.hidden_size * s.vocab_size / bw)


def issue_flop_limit(spec: ModelSpec, n: int, prefix: int, upper_tokens: int, c: int) -> float:
    """The issue's FLOP-count limit of a checked mode: full prefill's layer-token count over
    layers 0..c for every token after the exact prefix plus layers c+1..L-1 for the computed ones.
    (The engine does less: only layer c's q/k/v for the tokens it does not recompute.)"""
    L = spec.num_layers
    return L * n / ((c + 1) * (n - prefix) + (L - c - 1) * upper_tokens)


def prefill_flops(spec: ModelSpec, n: int) -> float:
    s = spec
    per_layer = layer_params(s)
    linear = 2 * per_layer * s.num_layers * n + 2 * s.hidden_size * s.vocab_size  # logits: last token
    attention = 2 * s.num_heads * s.head_dim * n * n * s.num_layers  # causal QK^T and PV
    return linear + attention


def changed_plan(n: int, reuse: float, donor: str, chunks: int = 8, seed: int = 0) -> tuple[ReusePlan, np.ndarray]:
    """A prompt equal to the donor except ``chunks`` changed runs (1 - reuse of the tokens) and the
    last token; returns the plan and the mask of changed positions."""
    rng = np.random.default_rng(seed)
    n_new = max(1, int(round((1 - reuse) * n)))
    changed = np.zeros(n, dtype=bool)
    per = max(1, n_new // chunks)
    starts = np.sort(rng.choice(np.arange(1, n - per - 1), size=chunks, replace=False))
    for s in starts:
        changed[s:s + per] = True
    changed[-1] = True
    spans, i = [], 0
    while i < n:
        if changed[i]:
            i += 1
            continue
        j = i
        while j < n and not changed[j]:
            j += 1
        spans.append(ReuseSpan(i, donor, i, j - i))
        i = j
    return ReusePlan(n, spans, prefix_len=spans[0].length if spans and spans[0].new_start == 0 else 0), changed


def timed(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def decode_ms(engine: ReuseEngine, ids: list[int], plan: ReusePlan, steps: int = 16) -> float:
    """Time per output token after a prefix hit (plain decode, no DHD recomputation)."""
    st = ReuseSettings(mode="prefix", decode_recompute=0)
    seq, logits = engine.prefill(ids, plan, st, max_tokens=steps + 4, keep_segment=False)
    tok = int(logits.argmax())
    engine.decode_step(seq, tok)  # warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        tok = int(engine.decode_step(seq, tok).argmax())
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps * 1e3


def engine_settings(runner, variant: str = "default") -> dict:
    """The kernel paths and tilings this run used (several are switched by KVCLUSTER_* variables
    or --variant)."""
    from workers import cuda_graph, fused, gemv, subset_attention
    return {"variant": variant, "subset_kernel": runner.subset_kernel, "qkv_kernel": runner.qkv_kernel,
            "decode_kernel": runner.decode_kernel, "gemv_kernel": runner.gemv_kernel,
            "gemv_per_shape": gemv.PER_SHAPE, "fused": fused.ENABLED,
            "addmm_residual": fused.ADDMM_RESIDUAL, "silu_kernel": fused.SILU_KERNEL,
            "compiled_qkv_norm": fused.COMPILED_QKV_NORM,
            "subset_tiling": subset_attention.settings(), "m_buckets": list(cuda_graph.M_BUCKETS)}


def write_result(path: str, cfg: dict, peak: float, bw: float, rows: list, settings: dict | None = None) -> dict:
    result = {
        "benchmark": "reuse_gpu", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "device": torch.cuda.get_device_name(), "host": platform.node(), "torch": torch.__version__,
        "model": {**cfg, "dtype": "bfloat16", "weights": "random"}, "bf16_matmul_peak_tflops": peak / 1e12,
        "hbm_copy_bandwidth_tbps": bw / 1e12, "engine_settings": settings or {},
        "rows": rows,
    }
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="1024,4096,8192,16384")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--layers", type=int, default=None, help="override layer count (smoke runs)")
    ap.add_argument("--out", default="benchmarks/results/reuse_gpu.json")
    ap.add_argument("--variant", type=int, default=0, help="run with kernel option N of "
                    "benchmarks/variants.py:AB_VARIANTS (0: the defaults)")
    args = ap.parse_args()
    cfg = dict(LLAMA3_8B)
    if args.layers:
        cfg["num_layers"] = args.layers
    spec = ModelSpec(**cfg)
    peak = matmul_peak()
    bw = hbm_bandwidth()
    runner = random_runner(spec, "cuda", torch.bfloat16)
    variant = apply_variant(runner, args.variant)
    store = InMemorySegmentStore(max_bytes=64 << 30)
    lengths = [int(x) for x in args.lengths.split(",")]
    # one static KV pool + a CUDA graph for one-token passes; the eager engine is the comparison
    engine = ReuseEngine(runner, store, static_tokens=max(lengths) + 64)
    engine.pool_reuse = False  # on only for prefix_hit_pooled
    eager = ReuseEngine(runner, store)
    rows = []
    gen = torch.Generator().manual_seed(0)
    for n in lengths:
        ids = torch.randint(0, spec.vocab_size, (n,), generator=gen).tolist()
        full = ReuseSettings(mode="full")
        seq, _ = engine.prefill(ids, None, full, keep_segment=True)
        store.put(engine.segment_of(seq, f"donor{n}"))
        del seq
        t_full = timed(lambda: engine.prefill(ids, None, full, keep_segment=False), args.reps)
        mfu = prefill_flops(spec, n) / t_full / peak
        row = {"tokens": n, "full_ms": t_full * 1e3, "full_mfu": mfu, "modes": []}
        prefix_plan = ReusePlan(n, [ReuseSpan(0, f"donor{n}", 0, n)], prefix_len=n)
        # prefix_hit: the donor's KV in the GPU tier, copied (and rotated) into the working pool;
        # prefix_hit_pooled: the same prompt's exact KV still in the pool (vLLM-style, no copy)
        cases = [("prefix_hit", 1.0, ReuseSettings(mode="prefix"), prefix_plan),
                 ("prefix_hit_pooled", 1.0, ReuseSettings(mode="prefix"), prefix_plan)]
        t_eager = timed(lambda: eager.prefill(ids, prefix_plan, ReuseSettings(mode="prefix"), keep_segment=False), args.reps)
        row["prefix_hit_eager_ms"] = t_eager * 1e3
        row["tpot_graph_ms"], row["tpot_eager_ms"] = (decode_ms(e, ids, prefix_plan) for e in (engine, eager))
        for reuse in (0.90, 0.98):
            plan, changed = changed_plan(n, reuse, f"donor{n}")
            new_ids = list(ids)
            for p in np.nonzero(changed)[0]:
                new_ids[p] = (ids[p] + 1) % spec.vocab_size
            for name, st in (("dhd_r0.15", ReuseSettings(mode="dhd", recompute_ratio=0.15, decode_recompute=0)),
                             ("dhd_r0.05", ReuseSettings(mode="dhd", recompute_ratio=0.05, decode_recompute=0)),
                             ("cacheblend", ReuseSettings(mode="cacheblend", recompute_ratio=0.15, decode_recompute=0))):
                cases.append((f"{name}@{int(reuse * 100)}%", reuse, st, (plan, new_ids)))
        for name, reuse, st, plan in cases:
            plan_, ids_ = (plan, ids) if isinstance(plan, ReusePlan) else plan
            holder = {}
            engine.pool_reuse = name == "prefix_hit_pooled"

            def run():
                holder["seq"] = engine.prefill(ids_, plan_, st, keep_segment=False)[0]
            t = timed(run, args.reps)
            stats = holder["seq"].stats
            speedup = t_full / t
            upper = stats.computed_tokens + stats.recomputed_tokens
            checked = st.mode in ("dhd", "cacheblend")
            c = (1 if st.mode == "cacheblend" else st.check_layer) if checked else None
            limit = issue_flop_limit(spec, n, plan_.prefix_len, upper, c) if checked else 1.0 / stats.flops_fraction
            placed = 0 if name == "prefix_hit_pooled" else stats.reused_tokens
            bound = mode_bound_s(spec, n, plan_.prefix_len if checked else 0, upper, c, placed, peak, bw)
            row["modes"].append({"mode": name, "ms": t * 1e3, "speedup": speedup, "flop_limit": limit,
                                 "of_limit": speedup / limit, "roofline_ms": bound * 1e3,
                                 "of_roofline": bound / t, "engine_flops_fraction": stats.flops_fraction, "reused": stats.reused_tokens,
                                 "recomputed": stats.recomputed_tokens, "computed": stats.computed_tokens})
            engine.pool_reuse = False
            del holder
        rows.append(row)
        write_result(args.out, cfg, peak, bw, rows, engine_settings(runner, variant))  # after each length: a cut-off run keeps its rows
        store.evict(f"donor{n}")
        torch.cuda.empty_cache()
    result = write_result(args.out, cfg, peak, bw, rows, engine_settings(runner, variant))
    print(f"\n{result['device']}  bf16 peak {peak / 1e12:.0f} TFLOP/s (measured)")
    print(f"HBM copy bandwidth {bw / 1e12:.2f} TB/s (measured)")
    print(f"{'tokens':>6} {'mode':<18} {'ms':>8} {'speedup':>8} {'limit':>7} {'of_lim':>7} {'roof_ms':>8} {'of_roof':>7}")
    for row in rows:
        print(f"{row['tokens']:>6} {'full (MFU %.2f)' % row['full_mfu']:<18} {row['full_ms']:>8.1f}")
        print(f"{row['tokens']:>6} {'prefix_hit eager':<18} {row['prefix_hit_eager_ms']:>8.1f} "
              f"{row['full_ms'] / row['prefix_hit_eager_ms']:>8.2f}   TPOT graph {row['tpot_graph_ms']:.2f} ms, "
              f"eager {row['tpot_eager_ms']:.2f} ms")
        for m in row["modes"]:
            print(f"{row['tokens']:>6} {m['mode']:<18} {m['ms']:>8.1f} {m['speedup']:>8.2f} "
                  f"{m['flop_limit']:>7.2f} {m['of_limit']:>7.2f} {m['roofline_ms']:>8.1f} {m['of_roofline']:>7.2f}")


if __name__ == "__main__":
    main()
