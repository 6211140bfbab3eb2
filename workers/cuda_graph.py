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

import torch

from workers.kv_cache import KVCache
from workers.model_runner import LlamaRunner, Positions


BUCKET = 1024


class GraphedStep:
    def __init__(self, runner: LlamaRunner, pool: KVCache) -> None:
        self.runner, self.pool = runner, pool
        dev = runner.device
        self.tok = torch.zeros(1, dtype=torch.long, device=dev)
        self.pos = torch.full((1,), pool.capacity - 1, dtype=torch.long, device=dev)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.mempool = None

    def bucket(self, position: int) -> int:
        return min(-(-(position + 1) // BUCKET) * BUCKET, self.pool.capacity)

    def _body(self, keys: int) -> torch.Tensor:
        r = self.runner
        saved, self.pool.length = self.pool.length, keys
        try:
            p = Positions.build(r, self.pos, "mask", keys)
            h = r.embed(self.tok)
            for layer in range(r.spec.num_layers):
                h = r.layer(layer, h, p, self.pool)
            return r.logits(h)
        finally:
            self.pool.length = saved

    def _capture(self, keys: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        dev = self.runner.device
        self.pos.fill_(self.pool.capacity - 1)  # warm-up writes land in the reserved slot
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._body(keys)
        torch.cuda.current_stream(dev).wait_stream(side)
        if self.mempool is None:
            self.mempool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.mempool):  # one pool: graphs never run at once
            logits = self._body(keys)
        return graph, logits

    def __call__(self, token: int | torch.Tensor, position: int) -> torch.Tensor:
        """Logits [vocab] for ``token`` at ``position``; its K/V land in the pool."""
        keys = self.bucket(position)
        if keys not in self.graphs:
            self.graphs[keys] = self._capture(keys)
        graph, logits = self.graphs[keys]
        if isinstance(token, torch.Tensor):
            self.tok.copy_(token.reshape(1))
        else:
            self.tok.fill_(int(token))
        self.pos.fill_(int(position))
        graph.replay()
        return logits[0].clone()
