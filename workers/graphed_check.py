"""The lower part of a dhd/cacheblend prefill as one CUDA graph, over the engine's KV pool.

That part is layers 0..c-1 and layer c's q/k/v for the tokens after the exact prefix, then
scoring: each token's V deviation at layer c, for dhd the attention it receives from the new
tokens, and the choice of the reused tokens to recompute. At 1k tokens it is ~100 kernels, many
tiny; launched from Python they leave the GPU waiting (``benchmarks/diag_reuse_profile.py
--gaps``). Replayed, it costs its GPU time.

A graph has fixed shapes, so it is captured per bucket and the request's sizes become data:
  - the tokens after the prefix are padded to a multiple of ``ROW_BUCKET``; padding rows sit at
    positions past the prompt (their K/V land in pool slots no prompt token attends to, and the
    next decode step overwrites the first of them);
  - the new tokens whose attention scores the others are gathered into a power-of-two bucket,
    padding rows weighted 0;
  - how many tokens to recompute is a device scalar: tokens are ranked by score once and the
    first k candidates taken, which is top-k without a static k.
The outputs are views of the graph's buffers, valid until this object replays a graph again:
callers copy what they keep.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from workers.cuda_graph import attending_over, capture, key_bucket
from workers.dhd import v_deviation
from workers.kv_cache import KVCache
from workers.model_runner import LlamaRunner, Positions

ROW_BUCKET = 128
MAX_ROWS = 2048  # longer lower passes keep the GPU busy by themselves: eager
PAD, MUST, CANDIDATE = 0, 1, 2  # row kinds


@dataclass
class CheckOutput:
    hidden: torch.Tensor  # [T, hidden]: layer c's input for the tokens after the prefix
    rows: torch.Tensor  # [must + k] rows (into hidden) to run through layers c..L-1, ascending;
    # row i is position prefix + i
    deviation: torch.Tensor  # [T] float: V deviation of candidates, 0 elsewhere
    stale: torch.Tensor  # [T] bool: candidates not chosen


def row_bucket(rows: int) -> int:
    return -(-rows // ROW_BUCKET) * ROW_BUCKET


def must_bucket(must: int) -> int:
    return max(16, 1 << (max(must, 1) - 1).bit_length())


class CheckGraphs:
    def __init__(self, runner: LlamaRunner, pool: KVCache) -> None:
        self.runner, self.pool = runner, pool
        self.graphs: dict[tuple, tuple] = {}
        self.mempool = None

    def fits(self, n: int, prefix: int) -> bool:
        rows = n - prefix
        padded_end = prefix + row_bucket(rows)
        return 0 < rows <= MAX_ROWS and padded_end < self.pool.capacity - 1 and self.runner.reduce is None

    def __call__(self, mode: str, check_layer: int, ids: np.ndarray, prefix: int, n: int,
                 kinds: np.ndarray, k: int, k_pre_out: torch.Tensor | None) -> CheckOutput:
        """``ids``/``kinds``: the tokens after the prefix and their kind (MUST: no donor KV,
        CANDIDATE: reused and may be recomputed); ``k``: how many candidates to recompute."""
        rows = len(ids)
        tb = row_bucket(rows)
        must = np.nonzero(kinds == MUST)[0]
        mb = must_bucket(len(must)) if mode == "dhd" else 0
        keys = key_bucket(n, self.pool.capacity)
        key = (mode, check_layer, tb, mb, keys, k_pre_out is not None)
        if key not in self.graphs:
            self.graphs[key] = self._capture(mode, check_layer, tb, mb, keys, k_pre_out)
        graph, inp, out = self.graphs[key]
        host = np.zeros(inp.numel(), dtype=np.int64)  # one copy to the device: ids, positions, kinds, ...
        host[:rows] = ids
        host[tb:2 * tb] = np.arange(prefix, prefix + tb)
        host[2 * tb:2 * tb + rows] = kinds
        if mb:
            host[3 * tb:3 * tb + len(must)] = must
            host[3 * tb + mb:3 * tb + mb + len(must)] = 1
        host[-1] = k
        inp.copy_(torch.from_numpy(host), non_blocking=False)
        graph.replay()
        h, order, dev, stale = out
        chosen = order[:len(must) + k]
        return CheckOutput(h[:rows], chosen, dev[:rows], stale[:rows])

    def _capture(self, mode: str, c: int, tb: int, mb: int, keys: int, k_pre_out: torch.Tensor | None):
        r = self.runner
        inp = torch.zeros(3 * tb + 2 * mb + 1, dtype=torch.long, device=r.device)
        inp[tb:2 * tb] = self.pool.capacity - 1  # the warm-up and capture writes land in the reserved slot
        if self.mempool is None:
            self.mempool = torch.cuda.graph_pool_handle()
        body = lambda: self._body(mode, c, tb, mb, keys, inp, k_pre_out)  # noqa: E731
        graph, out = capture(r, body, self.mempool, f"{mode} check, layer {c}, {tb} tokens, {keys} keys")
        return graph, inp, out

    def _body(self, mode: str, c: int, tb: int, mb: int, keys: int, inp: torch.Tensor,
              k_pre_out: torch.Tensor | None):
        r, pool = self.runner, self.pool
        ids, pos, kinds = inp[:tb], inp[tb:2 * tb], inp[2 * tb:3 * tb]
        k = inp[-1]
        slot = r.kv_slot[c]
        with attending_over(pool, keys):
            p = Positions.build(r, pos, "mask", keys, bound=pool.capacity)
            p.block_mask = None
            # the donor's V, read before any layer writes: under KVSharer layer c's slot may be an
            # earlier layer's, rewritten below
            v_old = pool.v[slot][:, pos].clone()
            h = r.embed(ids)
            for layer in range(c):
                h = r.layer(layer, h, p, pool, k_pre_out=k_pre_out)
            q = r.write_kv(c, h, p, pool, k_pre_out=k_pre_out)
            cand = kinds == CANDIDATE
            dev = torch.where(cand, v_deviation(pool.v[slot][:, pos], v_old), 0.0)
            if mode == "dhd":
                rows, weight = inp[3 * tb:3 * tb + mb], inp[3 * tb + mb:3 * tb + 2 * mb].float()
                attn = r.attention_received(q[:, rows], pool.k[slot, :, :keys], pos[rows], keys,
                                            row_weight=weight)
                score = attn[pos.clamp(max=keys - 1)] * dev
            else:
                score = dev
            score = torch.where(cand, score, float("-inf"))
            ranked = torch.argsort(score, descending=True, stable=True)
            rank = torch.empty_like(ranked)
            rank[ranked] = torch.arange(tb, device=r.device)
            chosen = cand & (rank < k)
            compute = chosen | (kinds == MUST)
            idx = torch.arange(tb, device=r.device)
            order = torch.sort(torch.where(compute, idx, idx + tb)).values % tb
            return h, order, dev, cand & ~chosen
