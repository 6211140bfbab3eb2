"""One token through every layer as a single CUDA graph, over a static KV pool.

A one-token pass of an 8B model is ~1,000 small kernels; launched one by one from Python that
costs ~15 ms on an H100 host, three times the ~5 ms it takes to read the weights. Replaying a
captured graph removes the launch cost. Graphs need fixed addresses, so the sequence's KV lives
in a pool the engine allocates once. One graph is captured per key-length bucket (multiples of
``BUCKET`` slots), attending only over the pool's first ``bucket`` slots with a mask by position
hiding those past the token, so an early token does not pay for the whole pool. The pool's last
slot is reserved for the captures' warm-up writes.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Callable

import torch

from workers.kv_cache import KVCache
from workers.model_runner import LlamaRunner, Positions


BUCKET = 1024
log = logging.getLogger(__name__)


def key_bucket(n_keys: int, capacity: int) -> int:
    return min(-(-n_keys // BUCKET) * BUCKET, capacity)


@contextmanager
def attending_over(pool: KVCache, keys: int):
    """Layers attend over the pool's first ``keys`` slots while capturing."""
    saved, pool.length = pool.length, keys
    try:
        yield
    finally:
        pool.length = saved


def capture(runner: LlamaRunner, body: Callable[[], torch.Tensor], mempool, what: str = ""
            ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Warm ``body`` up twice on a side stream (compiles the fused pieces), then capture it with
    fusion on, in ``mempool`` (shared: an engine's graphs never run at once). Errors are checked
    for this thread only: a worker's other threads (donor fetches onto the GPU) may launch work
    while a graph is captured, and in the default global mode that would fail the capture."""
    dev = runner.device
    t0 = time.perf_counter()
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with runner.fusing(), torch.cuda.stream(side):
        for _ in range(2):
            body()
    torch.cuda.current_stream(dev).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with runner.fusing(), torch.cuda.graph(graph, pool=mempool, capture_error_mode="thread_local"):
        out = body()
    log.debug("captured the CUDA graph %s in %.0f ms", what, (time.perf_counter() - t0) * 1e3)
    return graph, out


class GraphedStep:
    def __init__(self, runner: LlamaRunner, pool: KVCache) -> None:
        self.runner, self.pool = runner, pool
        dev = runner.device
        self.tok = torch.zeros(1, dtype=torch.long, device=dev)
        self.pos = torch.full((1,), pool.capacity - 1, dtype=torch.long, device=dev)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.mempool = None

    def bucket(self, position: int) -> int:
        return key_bucket(position + 1, self.pool.capacity)

    def _body(self, keys: int) -> torch.Tensor:
        r = self.runner
        with attending_over(self.pool, keys):
            p = Positions.build(r, self.pos, "mask", keys, bound=self.pool.capacity)
            h = r.embed(self.tok)
            for layer in range(r.spec.num_layers):
                h = r.layer(layer, h, p, self.pool)
            return r.logits(h)

    def _capture(self, keys: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        self.pos.fill_(self.pool.capacity - 1)  # warm-up writes land in the reserved slot
        if self.mempool is None:
            self.mempool = torch.cuda.graph_pool_handle()
        return capture(self.runner, lambda: self._body(keys), self.mempool, f"one token, {keys} keys")

    def __call__(self, token: int | torch.Tensor, position: int) -> torch.Tensor:
        """Logits [vocab] for ``token`` at ``position``; its K/V land in the pool."""
        keys = self.bucket(position)
        if keys not in self.graphs:
            try:
                self.graphs[keys] = self._capture(keys)
            except Exception as e:  # FlexAttention's decoder did not capture: batched matmuls
                if not self.runner.flex_decode:
                    raise
                log.warning("one-token graph with FlexAttention failed (%s); using matmul attention",
                            str(e).splitlines()[0][:160])
                self.runner.flex_decode = False
                # this stream, not the device: a device sync would break another thread's capture
                torch.cuda.current_stream(self.runner.device).synchronize()
                self.graphs[keys] = self._capture(keys)
        graph, logits = self.graphs[keys]
        if isinstance(token, torch.Tensor):
            self.tok.copy_(token.reshape(1))
        else:
            self.tok.fill_(int(token))
        self.pos.fill_(int(position))
        graph.replay()
        return logits[0].clone()


# token counts with a graph: steps of 16 to 256 (a layer's four matmuls at 1k keys on an H200,
# benchmarks/diag_small_pass.py: 125.7 us for 67 rows, 135.4 for 128; 152.3 for 176, 165.6 for
# 192), then padding at most ~1/8; larger passes are GPU-bound
M_BUCKETS = tuple(range(16, 257, 16)) + (288, 320, 352, 384, 448, 512, 576, 640, 768, 896, 1024)


class GraphedLayers:
    """Layers ``first..L-1`` for a few tokens at any positions, over the pool, as one graph per
    (token bucket, key bucket): the upper pass of dhd/cacheblend (the recomputed tokens) and short
    subset passes. Eagerly, 30 layers of a few hundred tokens are launch-bound (~1 ms of Python
    and ~25 kernels per layer); replayed, they cost their GPU time. Padding rows sit at the pool's
    reserved last slot, so their K/V writes land there; their outputs are dropped. Attention goes
    through the split-key kernel (workers/subset_attention.py), which reads the positions from the
    device; without it, a dense mask. (FlexAttention with a block mask built inside the graph from
    the position tensor was measured and dropped: at 4k keys on an H200, 36.2 ms for dhd r=.15 at
    90% reuse against 36.4 with the kernel, but slower than the dense mask for 320-token passes.)
    """

    def __init__(self, runner: LlamaRunner, pool: KVCache) -> None:
        self.runner, self.pool = runner, pool
        self.graphs: dict[tuple, tuple] = {}
        self.mempool = None

    @staticmethod
    def fits(m: int, n_keys: int) -> bool:
        """Where a graph beats the eager layers: up to 1024 tokens, but not where the eager pass
        would use FlexAttention (>= 128 tokens over >= 8k keys): that pass is GPU-bound, and the
        graph's padded rows and dense mask cost more than the launches it saves (measured at 8k:
        48.5 vs 44.8 ms for dhd r=.05 at 98% reuse)."""
        from workers.model_runner import FLEX_MIN_KEYS, FLEX_MIN_QUERIES
        return m <= M_BUCKETS[-1] and not (m >= FLEX_MIN_QUERIES and n_keys >= FLEX_MIN_KEYS)

    def __call__(self, first: int, h: torch.Tensor, pos: torch.Tensor, n_keys: int,
                 k_pre_out: torch.Tensor | None = None) -> torch.Tensor:
        m = h.shape[0]
        mb = next(b for b in M_BUCKETS if b >= m)
        nb = key_bucket(n_keys, self.pool.capacity)
        key = (first, mb, nb, k_pre_out is not None)
        if key not in self.graphs:
            self.graphs[key] = self._capture(first, mb, nb, k_pre_out)
        graph, h_in, pos_in, out = self.graphs[key]
        h_in[:m].copy_(h)
        pos_in[:m].copy_(pos)
        pos_in[m:].fill_(self.pool.capacity - 1)
        graph.replay()
        return out[:m].clone()

    def _body(self, first: int, h: torch.Tensor, pos: torch.Tensor, keys: int, k_pre_out) -> torch.Tensor:
        r = self.runner
        with attending_over(self.pool, keys):
            p = Positions.build(r, pos, "mask", keys, bound=self.pool.capacity)
            p.block_mask = None
            for layer in range(first, r.spec.num_layers):
                h = r.layer(layer, h, p, self.pool, k_pre_out=k_pre_out)
            return h

    def _capture(self, first: int, mb: int, keys: int, k_pre_out):
        r, dev = self.runner, self.runner.device
        h_in = torch.zeros(mb, r.spec.hidden_size, dtype=r.dtype, device=dev)
        pos_in = torch.full((mb,), self.pool.capacity - 1, dtype=torch.long, device=dev)
        if self.mempool is None:
            self.mempool = torch.cuda.graph_pool_handle()
        graph, out = capture(r, lambda: self._body(first, h_in, pos_in, keys, k_pre_out), self.mempool,
                             f"layers {first}.., {mb} rows, {keys} keys")
        return graph, h_in, pos_in, out
