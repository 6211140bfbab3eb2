"""Prometheus metrics of the serving front, every series under the ``kvcluster:`` prefix.

Each ``Metrics`` owns its registry (several fronts in one process, e.g. tests, never collide).
Request-path series are updated by the front as events arrive; worker-side series (tier bytes
and hit counts, per worker and tier) come from a snapshot of the workers' stats that the front
refreshes just before each scrape (``set_worker_stats``) and a collector that reads it.

Series (counters get ``_total``, histograms ``_bucket``/``_sum``/``_count``):
  kvcluster:requests_total{endpoint,status}         kvcluster:prompt_tokens_total
  kvcluster:generation_tokens_total                  kvcluster:reused_tokens_total
  kvcluster:cached_tokens_total                      kvcluster:recomputed_tokens_total
  kvcluster:computed_tokens_total                    kvcluster:time_to_first_token_seconds
  kvcluster:time_per_output_token_seconds            kvcluster:e2e_request_latency_seconds
  kvcluster:queue_time_seconds                       kvcluster:lookup_seconds
  kvcluster:transfer_bytes_total{channel}            kvcluster:transfer_latency_seconds{channel}
  kvcluster:transfer_failures_total                  kvcluster:requests_running / requests_waiting
  kvcluster:worker_retries_total                     kvcluster:workers_up
  kvcluster:tier_bytes{worker,tier}                  kvcluster:tier_hits_total{worker,tier}
  kvcluster:tier_misses_total{worker,tier}           kvcluster:tier_bytes_in_total{worker,tier}
  kvcluster:tier_bytes_out_total{worker,tier}        kvcluster:tier_corrupt_total{worker,tier}
  kvcluster:batched_decode_steps_total{worker,path}  (path: graph or eager)
  kvcluster:graph_capture_failures_total{worker}     kvcluster:kv_block_usage{worker} (0..1)
"""
from __future__ import annotations

import threading
from typing import Any

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics, generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

P = "kvcluster:"
disable_created_metrics()  # no *_created series: they double the page and nobody graphs them
_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_TPOT = (0.005, 0.01, 0.02, 0.04, 0.08, 0.12, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0)
_FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _WorkerCollector:
    def __init__(self) -> None:
        self.snapshot: dict[str, dict] = {}
        self.lock = threading.Lock()

    def describe(self):
        return []

    def collect(self):
        with self.lock:
            snap = dict(self.snapshot)
        used = GaugeMetricFamily(P + "tier_bytes", "Bytes held in each KV tier", labels=["worker", "tier"])
        fams = {k: CounterMetricFamily(P + f"tier_{k}", f"KV tier {k.replace('_', ' ')}", labels=["worker", "tier"])
                for k in ("hits", "misses", "bytes_in", "bytes_out", "corrupt", "errors")}
        for worker, st in sorted(snap.items()):
            for tier, n in st.get("tier_used_bytes", {}).items():
                used.add_metric([worker, tier], n)
            for tier, counts in st.get("tiers", {}).items():
                if tier == "store":
                    continue
                for k, fam in fams.items():
                    if k in counts:
                        fam.add_metric([worker, tier], counts[k])
        yield used
        yield from fams.values()
        yield from _batching_families(snap)


def _batching_families(snap: dict[str, dict]):
    """The continuous batcher's counters per worker: decode steps replayed from CUDA graphs or run
    eager, failed graph captures, and the share of the paged KV blocks in use."""
    steps = CounterMetricFamily(P + "batched_decode_steps", "Batched decode steps, by path",
                                labels=["worker", "path"])
    failures = CounterMetricFamily(P + "graph_capture_failures", "Batched decode graphs that failed to capture",
                                   labels=["worker"])
    usage = GaugeMetricFamily(P + "kv_block_usage", "Share of the paged KV blocks in use", labels=["worker"])
    for worker, st in sorted(snap.items()):
        b = st.get("batching") or {}
        if not b:
            continue
        graph = b.get("graph_steps", 0)
        steps.add_metric([worker, "graph"], graph)
        steps.add_metric([worker, "eager"], max(0, b.get("decode_steps", 0) - graph))
        failures.add_metric([worker], b.get("capture_failures", 0))
        if b.get("blocks_total"):
            usage.add_metric([worker], 1 - b.get("blocks_free", 0) / b["blocks_total"])
    yield from (steps, failures, usage)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        self.requests = Counter(P + "requests", "Requests by endpoint and outcome", ["endpoint", "status"],
                                registry=r)
        self.prompt_tokens = Counter(P + "prompt_tokens", "Prompt tokens of finished prefills", registry=r)
        self.generation_tokens = Counter(P + "generation_tokens", "Generated tokens", registry=r)
        self.reused_tokens = Counter(P + "reused_tokens", "Prompt tokens that took a donor's KV", registry=r)
        self.cached_tokens = Counter(P + "cached_tokens", "Reused tokens kept as they were (not recomputed)",
                                     registry=r)
        self.recomputed_tokens = Counter(P + "recomputed_tokens", "Reused tokens recomputed by DHD (or the mode)",
                                         registry=r)
        self.computed_tokens = Counter(P + "computed_tokens", "Prompt tokens with no donor (computed)", registry=r)
        self.ttft = Histogram(P + "time_to_first_token_seconds", "Request arrival to first token", buckets=_LATENCY,
                              registry=r)
        self.tpot = Histogram(P + "time_per_output_token_seconds", "Mean time per output token after the first",
                              buckets=_TPOT, registry=r)
        self.e2e = Histogram(P + "e2e_request_latency_seconds", "Request arrival to last token", buckets=_LATENCY,
                             registry=r)
        self.queue_time = Histogram(P + "queue_time_seconds", "Time queued before a worker took the request",
                                    buckets=_LATENCY, registry=r)
        self.lookup_time = Histogram(P + "lookup_seconds", "Index lookup (prefix + semantic + align)",
                                     buckets=_FAST, registry=r)
        self.transfer_bytes = Counter(P + "transfer_bytes", "Donor KV bytes fetched from peer workers",
                                      ["channel"], registry=r)
        self.transfer_latency = Histogram(P + "transfer_latency_seconds", "Time of a request's peer fetches",
                                          ["channel"], buckets=_FAST, registry=r)
        self.transfer_failures = Counter(P + "transfer_failures", "Donors that could not be fetched (recomputed)",
                                         registry=r)
        self.fallbacks = Counter(P + "fallbacks", "Prefills that dropped the plan for a full recompute", registry=r)
        self.running = Gauge(P + "requests_running", "Requests on a worker now", registry=r)
        self.waiting = Gauge(P + "requests_waiting", "Requests queued for a worker now", registry=r)
        self.retries = Counter(P + "worker_retries", "Requests run again because their worker was lost",
                               registry=r)
        self.workers_up = Gauge(P + "workers_up", "Workers taking requests", registry=r)
        self._workers = _WorkerCollector()
        r.register(self._workers)

    # -- updates ---------------------------------------------------------------------------------
    def observe_prefill(self, ev: dict, ttft_s: float) -> None:
        self.prompt_tokens.inc(ev.get("prompt_tokens", 0))
        self.reused_tokens.inc(ev.get("reused_tokens", 0))
        self.cached_tokens.inc(ev.get("cached_tokens", 0))
        self.recomputed_tokens.inc(ev.get("recomputed_tokens", 0))
        self.computed_tokens.inc(ev.get("computed_tokens", 0))
        self.ttft.observe(ttft_s)
        if ev.get("fallback"):
            self.fallbacks.inc()
        f = ev.get("fetch") or {}
        if f.get("peer_blocks"):
            ch = f.get("channel") or "unknown"
            self.transfer_bytes.labels(ch).inc(f.get("peer_bytes", 0))
            self.transfer_latency.labels(ch).observe(f.get("peer_s", 0.0))
        n_fail = len(f.get("dropped", ())) + len(f.get("missing", ()))
        if n_fail:
            self.transfer_failures.inc(n_fail)
        if "lookup_s" in ev:
            self.lookup_time.observe(ev["lookup_s"])

    def observe_done(self, done: dict, ttft_s: float, e2e_s: float) -> None:
        n = done.get("completion_tokens", len(done.get("token_ids", ())))
        self.generation_tokens.inc(n)
        if n > 1:
            self.tpot.observe(max(0.0, e2e_s - ttft_s) / (n - 1))
        self.e2e.observe(e2e_s)
        if "queue_s" in done:
            self.queue_time.observe(done["queue_s"])

    def set_worker_stats(self, stats: dict[str, dict]) -> None:
        with self._workers.lock:
            self._workers.snapshot = dict(stats)

    def set_router_stats(self, running: int, waiting: int, workers_up: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.workers_up.set(workers_up)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def tier_totals(stats: dict[str, dict]) -> dict[str, Any]:
    """Sum of the workers' tier counters by tier (for benchmarks and logs)."""
    out: dict[str, dict[str, int]] = {}
    for st in stats.values():
        for tier, counts in st.get("tiers", {}).items():
            agg = out.setdefault(tier, {})
            for k, v in counts.items():
                agg[k] = agg.get(k, 0) + v
    return out
