#!/usr/bin/env python3
"""Where one prefill with reuse spends its GPU time (diagnostic: prints, writes no results file).

    python benchmarks/diag_reuse_profile.py --mode dhd --tokens 8192      # dhd r=.05, 98% reused
    python benchmarks/diag_reuse_profile.py --mode prefix --tokens 8192   # pooled prefix hit
    python benchmarks/diag_reuse_profile.py --mode prefix_copy --tokens 8192   # prefix hit placed from the tier
    python benchmarks/diag_reuse_profile.py --mode cacheblend --tokens 1024 --reuse 0.9 --phases

Llama-3-8B shape, random bf16 weights, one GPU. Prints the median wall time of the prefill, the
host time before the one-token graph's launch (prefix mode), and the CUDA kernels sorted by time
(torch.profiler) over three prefills, with their summed GPU time per prefill (wall minus that is
time the GPU waited for the host). ``--phases`` adds the wall time of each phase of a prefill
(placement, check layer, scoring, selection, upper layers, logits), measured with a device sync
around each, so their sum exceeds the plain prefill a little. ``--gaps`` instead profiles host and device
together (no syncs) and charges each stretch where no kernel runs to the phase the host was in:
what a CUDA graph of that phase could save. The README's kernel breakdowns come from this script.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.reuse_gpu_bench import changed_plan, timed  # noqa: E402
from benchmarks.variants import AB_VARIANTS, module_setting, set_settings  # noqa: E402
from index_service.plan import ReusePlan, ReuseSpan  # noqa: E402
from workers.engine import ReuseEngine, ReuseSettings  # noqa: E402
from workers.model_loader import LLAMA3_8B, random_runner  # noqa: E402
from workers.model_spec import ModelSpec  # noqa: E402
from workers.segments import InMemorySegmentStore  # noqa: E402


def setup(n: int, mode: str, reuse: float = 0.98, ratio: float = 0.05):
    spec = ModelSpec(**LLAMA3_8B)
    store = InMemorySegmentStore(max_bytes=64 << 30)
    eng = ReuseEngine(random_runner(spec, "cuda", torch.bfloat16), store, static_tokens=n + 64)
    ids = torch.randint(0, spec.vocab_size, (n,)).tolist()
    seq, _ = eng.prefill(ids, None, ReuseSettings(mode="full"), keep_segment=True)
    store.put(eng.segment_of(seq, "d"))
    if mode in ("prefix", "prefix_copy"):  # prefix: the prompt's KV left in the pool; copy: placed from the tier
        eng.pool_reuse = mode == "prefix"
        return eng, ids, ReusePlan(n, [ReuseSpan(0, "d", 0, n)], prefix_len=n), ReuseSettings(mode="prefix")
    eng.pool_reuse = False
    plan, changed = changed_plan(n, reuse, "d")
    new = list(ids)
    for p in np.nonzero(changed)[0]:
        new[p] = (ids[p] + 1) % spec.vocab_size
    return eng, new, plan, ReuseSettings(mode=mode, recompute_ratio=ratio, decode_recompute=0)


class PhaseTimer:
    """Wraps engine/runner methods: exclusive wall time of each (device synced at both ends)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self._stack: list[list] = []

    def wrap(self, obj, name: str, label: str) -> None:
        real = getattr(obj, name)

        def timed_call(*args, **kwargs):
            torch.cuda.synchronize()
            frame = [label, time.perf_counter(), 0.0]  # label, start, time of nested phases
            self._stack.append(frame)
            try:
                return real(*args, **kwargs)
            finally:
                torch.cuda.synchronize()
                self._stack.pop()
                took = time.perf_counter() - frame[1]
                self.totals[label] = self.totals.get(label, 0.0) + took - frame[2]
                if self._stack:
                    self._stack[-1][2] += took
        setattr(obj, name, timed_call)


def ab(eng, run, only: str = "") -> dict[int, dict]:
    """The prefill timed with each variant of AB_VARIANTS (those numbered in ``only``, e.g.
    "0,2,9", if given), in this process, graphs captured anew; returns {number: label, ms}."""
    r = eng.runner
    check_type = type(eng._check_graphs) if eng._check_graphs is not None else None
    saved_r = {k: getattr(r, k) for _, r_attrs, _, _ in AB_VARIANTS for k in r_attrs}
    saved_m = {k: getattr(*module_setting(k)) for _, _, m_attrs, _ in AB_VARIANTS for k in m_attrs}

    def apply(r_attrs: dict, m_attrs: dict) -> None:  # on top of the saved settings
        set_settings(r, {**saved_r, **r_attrs}, {**saved_m, **m_attrs})

    def fresh(graphed: bool) -> None:
        # fresh graphs in fresh memory pools (re-capturing into a pool whose graphs were dropped
        # trips an allocator assert)
        eng._check_graphs = check_type(r, eng._pool) if graphed and check_type else None
        if eng._layer_graphs is not None:
            eng._layer_graphs = type(eng._layer_graphs)(r, eng._pool)
        if eng._graph is not None:
            eng._graph = type(eng._graph)(r, eng._pool)
    chosen = {int(i) for i in only.split(",")} if only else set(range(len(AB_VARIANTS)))
    times: dict[int, dict] = {}
    for i, (label, r_attrs, m_attrs, graphed) in enumerate(AB_VARIANTS):
        if i not in chosen:
            continue
        apply(r_attrs, m_attrs)
        fresh(graphed)
        for _ in range(3):
            run()
        ms = timed(run, 10) * 1e3
        times[i] = {"label": label, "ms": ms}
        print(f"  {i:2d} {label:52s} prefill {ms:.2f} ms")
    apply({}, {})
    fresh(True)
    for _ in range(3):
        run()
    return times


def wrap_phases(eng, wrap) -> None:
    import workers.engine as engine_mod
    r = eng.runner
    wrap(eng, "_place", "place donor KV")
    wrap(r, "layer", "layers, eager")
    wrap(r, "write_kv", "check layer q/k/v")
    wrap(r, "attention_received", "attention received")
    for fn in ("select_dhd_tokens", "select_cacheblend_tokens", "v_deviation"):
        wrap(engine_mod, fn, fn)
    wrap(eng, "_layers", "upper layers (graph or eager)")
    wrap(r, "logits", "logits")
    wrap(eng, "_checked", "rest of _checked")
    wrap(eng, "prefill", "rest of prefill")


def phases(eng, run, reps: int = 10) -> None:
    t = PhaseTimer()
    wrap_phases(eng, t.wrap)
    for _ in range(2):
        run()
    t.totals.clear()
    for _ in range(reps):
        run()
    print("phases (ms per prefill, synced, exclusive):")
    for label, s in sorted(t.totals.items(), key=lambda kv: -kv[1]):
        print(f"  {label:34s} {s / reps * 1e3:8.3f}")
    print(f"  {'sum':34s} {sum(t.totals.values()) / reps * 1e3:8.3f}")


def gaps(eng, run, reps: int = 5, step_us: float = 2.0) -> None:
    """Device idle time per prefill, charged to the innermost phase the host was in."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    def wrap(obj, name, label):
        real = getattr(obj, name)

        def labelled(*args, **kwargs):
            with record_function("phase:" + label):
                return real(*args, **kwargs)
        setattr(obj, name, labelled)
    wrap_phases(eng, wrap)
    wrap(torch.cuda.CUDAGraph, "replay", "graph launch")
    if eng._check_graphs is not None:
        wrap(type(eng._check_graphs), "__call__", "check graph (inputs, launch)")
    for _ in range(2):
        run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            run()
            torch.cuda.synchronize()
    events = prof.events()
    kernels = sorted((e.time_range.start, e.time_range.end) for e in events  # not the phases'
                     if e.device_type == DeviceType.CUDA and not e.name.startswith("phase:"))  # device spans
    spans = sorted(((e.time_range.start, e.time_range.end, e.name[6:]) for e in events
                    if e.name.startswith("phase:")), key=lambda t: (t[0], -t[1]))
    calls = [s for s in spans if s[2] == "rest of prefill"]
    idle: dict[str, float] = {}
    walls, busy = [], []
    for c0, c1, _ in calls:
        ks = [(max(a, c0), min(b, c1)) for a, b in kernels if b > c0 and a < c1]
        end = max((b for _, b in ks), default=c1)  # the host's sync after the last kernel is not idle
        walls.append(end - c0)
        merged: list[list[float]] = []
        for a, b in ks:
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        busy.append(sum(b - a for a, b in merged))
        inner = [s for s in spans if s[0] >= c0 and s[1] <= c1]
        t, k = c0, 0
        while t < end:
            while k < len(merged) and merged[k][1] <= t:
                k += 1
            if k < len(merged) and merged[k][0] <= t:
                t = merged[k][1]
                continue
            label = next((s[2] for s in reversed(inner) if s[0] <= t < s[1]), "outside any phase")
            idle[label] = idle.get(label, 0.0) + step_us
            t += step_us
    timeline(events, kernels, calls[-1], spans)
    n = len(calls)
    print(f"profiled (host + device, no syncs): prefill {sum(walls) / n / 1e3:.2f} ms to its last kernel, "
          f"device busy {sum(busy) / n / 1e3:.2f} ms")
    print("device idle per prefill, by the phase the host was in (ms):")
    for label, us in sorted(idle.items(), key=lambda kv: -kv[1]):
        print(f"  {label:34s} {us / n / 1e3:8.3f}")


def timeline(events, kernels, call, spans, min_us: float = 10.0) -> None:
    """The device's idle stretches of one prefill (``call``: its host span), each with the phase
    and the innermost host call (a CUDA runtime call or an aten op) in flight when it began."""
    from torch.autograd import DeviceType
    c0, c1, _ = call
    host = [(e.time_range.start, e.time_range.end, e.name) for e in events
            if e.device_type == DeviceType.CPU and not e.name.startswith("phase:")
            and e.time_range.start < c1 and e.time_range.end > c0]
    busy = sorted((max(a, c0), b) for a, b in kernels if b > c0 and a < c1)
    t, stretches = c0, []
    for a, b in busy:
        if a - t >= min_us:
            stretches.append((t, a))
        t = max(t, b)
    print(f"idle stretches of >= {min_us:.0f} us in one prefill (offset from its start, us):")
    for a, b in stretches:
        phase = next((s[2] for s in sorted(spans, key=lambda s: s[1] - s[0]) if s[0] <= a < s[1]), "-")
        inner = min((h for h in host if h[0] <= a < h[1]), key=lambda h: h[1] - h[0], default=None)
        print(f"  at {a - c0:8.0f} for {b - a:6.0f}  phase {phase:30s} host in {inner[2] if inner else '-'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--mode", choices=("dhd", "cacheblend", "prefix", "prefix_copy"), default="dhd")
    ap.add_argument("--reuse", type=float, default=0.98, help="fraction of the prompt reused")
    ap.add_argument("--ratio", type=float, default=0.05, help="recompute ratio r")
    ap.add_argument("--phases", action="store_true", help="also time each phase (synced)")
    ap.add_argument("--gaps", action="store_true", help="also charge device idle time to phases")
    ap.add_argument("--cprofile", type=int, default=0, help="also print this many rows of a "
                    "Python profile (cProfile, by own time) over 10 prefills")
    ap.add_argument("--ab", action="store_true", help="also time the prefill with each variant of "
                    "AB_VARIANTS (attention paths, kernel settings, graphed or eager lower part)")
    ap.add_argument("--ab-only", default="", help="with --ab: the numbers of the variants to time, e.g. 0,2,9")
    ap.add_argument("--ab-json", default="", help="with --ab: also write {number: label, ms} here")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--rows", type=int, default=20, help="kernel table rows")
    a = ap.parse_args()
    eng, ids, plan, st = setup(a.tokens, a.mode, a.reuse, a.ratio)
    run = lambda: eng.prefill(ids, plan, st, keep_segment=False)  # noqa: E731
    for _ in range(3):
        run()
    launch = []
    if a.mode.startswith("prefix"):  # host time from the call to the graph's launch
        graph, real = eng._graph, eng._graph.__call__
        class Timed:  # noqa: E306
            def __call__(self, token, position):
                launch.append(time.perf_counter())
                return real(token, position)
        eng._graph = Timed()
    walls, starts = [], []
    for _ in range(10):
        torch.cuda.synchronize()
        starts.append(time.perf_counter())
        run()
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - starts[-1])
    line = f"{a.mode} n={a.tokens}: prefill {statistics.median(walls) * 1e3:.2f} ms"
    if launch:
        eng._graph = graph
        line += f", host work before the graph launch {statistics.median(l - s for l, s in zip(launch, starts)) * 1e3:.2f} ms"
    print(line)
    if a.ab:
        times = ab(eng, run, a.ab_only)
        if a.ab_json:
            Path(a.ab_json).write_text(json.dumps({"mode": a.mode, "tokens": a.tokens, "reuse": a.reuse,
                                                   "ratio": a.ratio, "device": torch.cuda.get_device_name(),
                                                   "variants": times}, indent=1))
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            run()
        torch.cuda.synchronize()
    gpu = sum(e.self_device_time_total for e in prof.key_averages()) / 3 / 1e3
    print(f"GPU kernel time per prefill {gpu:.2f} ms (the rest of the wall time the GPU waited)")
    print("kernels over 3 prefills:")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=a.rows, max_name_column_width=60))
    if a.cprofile:
        import cProfile
        import pstats
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(10):
            run()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(a.cprofile)
    if a.gaps:  # before --phases: both wrap the same methods
        gaps(eng, run)
    elif a.phases:
        phases(eng, run)


if __name__ == "__main__":
    main()
