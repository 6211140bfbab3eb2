"""One decode step for a batch of sequences of different lengths over paged KV blocks.

The B new tokens go through the QKV, output and MLP matmuls together (the runner's building
blocks on a [B, hidden] matrix, each row at its own position). Attention is per sequence over its
own blocks: on CUDA a Triton kernel reads each sequence's keys straight from its blocks
(workers/paged_attention.py); elsewhere the block tables are gathered into a padded
[B, Hkv, max_len, d] view and SDPA runs with a length mask. Either way the query heads of a KV
group are folded into the query axis (GQA without expanding K/V). KVSharer: a shared layer computes only Q and reads its source layer's slot
(``runner.kv_slot``), which the source wrote earlier in the same step, so the gathered view of a
slot is reused by the layers that share it.

On CUDA the step is ~1,000 small kernels; launched from Python that is ~15 ms per step for an
8B model on an H100, three times the time to read the weights. ``GraphedPagedStep`` replays it
as one CUDA graph per (batch bucket, table-width bucket): padding rows decode token 0 at
position 0 in a scratch block the pool keeps for them, and their logits are dropped.
"""
from __future__ import annotations

import logging
import os
import time

import torch
import torch.nn.functional as F

from workers import gemv, qkv_write
from workers.block_manager import BlockManager
from workers.model_runner import LlamaRunner, Positions
from workers.paged_attention import available as kernel_available, paged_attend

log = logging.getLogger(__name__)
# attention straight from the blocks (workers/paged_attention.py) on CUDA; 0: gather + SDPA (A/B)
PAGED_KERNEL = os.environ.get("KVCLUSTER_PAGED_KERNEL", "1") != "0"
# in graphs of up to PAGED_GEMV_ROWS rows (KVCLUSTER_PAGED_GEMV_ROWS, 0..16): GEMV-kernel linears
# and the q/k/v kernel (_few_row_layers). Default 16, every row count it takes: on an H100
# (2026-12-07 23:37, benchmarks/results/paged_decode_gpu.json) that step took 6.0-10.5 ms against
# 7.4-11.6 on cuBLAS at 1-16 rows of 1k-4k tokens (1.10-1.22x faster). 0 turns it off.


def _rows_setting(raw: str) -> int:
    try:
        return max(0, int(raw))
    except ValueError:
        raise ValueError(f"KVCLUSTER_PAGED_GEMV_ROWS must be a row count (0 = off, 1..16), got {raw!r}") from None


PAGED_GEMV_ROWS = _rows_setting(os.environ.get("KVCLUSTER_PAGED_GEMV_ROWS", "16"))


def few_rows(runner: LlamaRunner, rows: int) -> bool:
    """Whether a step of ``rows`` tokens takes _few_row_layers (inside a capture, kernels there)."""
    return rows <= PAGED_GEMV_ROWS and runner.few_row_kernels(rows)


def _layers(runner: LlamaRunner, blocks: BlockManager, tok: torch.Tensor, pos: torch.Tensor,
            blk: torch.Tensor, off: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The step on device tensors only (no host reads): capturable as a CUDA graph."""
    s, dev = runner.spec, runner.device
    B = tok.shape[0]
    kernel = PAGED_KERNEL and kernel_available(tok)  # the kernel reads the positions itself
    if kernel and few_rows(runner, B):
        return _few_row_layers(runner, blocks, tok, pos, blk, off, table)
    mask = None
    if not kernel:  # [B, 1, 1, W] over the gathered, padded blocks
        keys = torch.arange(table.shape[1] * blocks.block_size, device=dev)
        mask = (keys[None, :] <= pos[:, None])[:, None, None, :]
    cos, sin = runner.rope.cos_sin(pos, runner.dtype)
    p = Positions(pos, "mask", cos, sin, None)
    g = s.num_heads // s.num_kv_heads
    h = runner.embed(tok)
    gathered: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for layer in range(s.num_layers):
        q, k, v = runner.qkv(layer, h, p)  # q [H, B, d], k/v [Hkv, B, d] or None (shared layer)
        slot = runner.kv_slot[layer]
        if k is not None:
            blocks.k[slot][blk, :, off] = k.transpose(0, 1)
            blocks.v[slot][blk, :, off] = v.transpose(0, 1)
            gathered.pop(slot, None)
        qf = q.transpose(0, 1).reshape(B, s.num_kv_heads, g, s.head_dim)
        if kernel:
            o = paged_attend(qf, blocks.k[slot], blocks.v[slot], table, pos, runner.scale)
        else:
            if slot not in gathered:
                gathered[slot] = blocks.gather(slot, table)
            kk, vv = gathered[slot]
            o = F.scaled_dot_product_attention(qf, kk, vv, attn_mask=mask, scale=runner.scale)
        h = h + F.linear(o.reshape(B, s.num_heads * s.head_dim), runner.layers[layer].w_o)
        h = h + runner.mlp(layer, h)
    return runner.logits(h)


def _few_row_layers(runner: LlamaRunner, blocks: BlockManager, tok: torch.Tensor, pos: torch.Tensor,
                    blk: torch.Tensor, off: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``_layers`` for up to gemv.MAX_ROWS sequences in graphs: each linear reads its weights once
    for all rows with the norm, SiLU x up and residual folded in (workers/gemv.py), and one kernel
    rotates q/k and writes K/V into the blocks (workers/qkv_write.py): 8 kernels a layer for ~20."""
    s, eps = runner.spec, runner.spec.rms_norm_eps
    B, g = tok.shape[0], s.num_heads // s.num_kv_heads
    cos, sin = runner.rope.cos_sin(pos, runner.dtype)
    row = blk * (s.num_kv_heads * blocks.block_size) + off  # each token's row in _rows_view
    p = Positions(pos, "mask", cos, sin, None)
    h = runner.embed(tok)
    for layer in range(s.num_layers):
        lw, slot = runner.layers[layer], runner.kv_slot[layer]
        if lw.w_qkv.shape[0] > s.q_size:  # the layer owns its K/V
            x = gemv.gemv(h, lw.w_qkv, norm_w=lw.attn_norm, eps=eps, bias=lw.b_qkv)
            q = qkv_write.write_qkv(x, cos, sin, row, _rows_view(blocks.k[slot]), _rows_view(blocks.v[slot]),
                                    s.num_heads, s.num_kv_heads)
        else:  # KVSharer: q only, K/V from the layer it shares
            q = runner.qkv(layer, h, p)[0]
        qf = q.transpose(0, 1).reshape(B, s.num_kv_heads, g, s.head_dim)
        o = paged_attend(qf, blocks.k[slot], blocks.v[slot], table, pos, runner.scale)
        h = gemv.gemv(o, lw.w_o, residual=h)
        act = gemv.gemv(h, lw.w_gate_up, norm_w=lw.mlp_norm, eps=eps, glu=True)
        h = gemv.gemv(act, lw.w_down, residual=h)
    return gemv.gemv(h, runner.lm_head, norm_w=runner.final_norm, eps=eps)


def _drop_few_rows(runner: LlamaRunner, rows: int, error: Exception) -> bool:
    """After a failed capture: whether it may have been the few-row kernels; if so they are off
    for this process (a kernel that does not build here fails every capture), so the caller can
    capture the op-by-op step instead of running eager."""
    global PAGED_GEMV_ROWS
    with runner.fusing():
        suspect = few_rows(runner, rows)
    if suspect:
        PAGED_GEMV_ROWS = 0
        log.warning("capturing the few-row decode step failed (%s: %s); it is off from now on",
                    type(error).__name__, str(error).splitlines()[0][:200] if str(error) else "")
    return suspect


def _rows_view(pool: torch.Tensor) -> torch.Tensor:
    """One layer's blocks [num_blocks, Hkv, block_size, d] seen as [Hkv, rows, d], as a contiguous
    cache is, where block b's offset o is row b * Hkv * block_size + o: so the cache writer of
    workers/qkv_write.py places K/V into blocks."""
    nb, kv_heads, bs, d = pool.shape
    return pool.as_strided((kv_heads, (nb - 1) * kv_heads * bs + bs, d), (bs * d, d, 1))


def _append(blocks: BlockManager, seq_ids: list[int]) -> tuple[list[int], list[int], list[int]]:
    """Room for each sequence's next token: (positions, blocks, offsets), on the host."""
    pos = [blocks.lengths[i] for i in seq_ids]
    where = [blocks.append(i) for i in seq_ids]
    return pos, [b for b, _ in where], [o for _, o in where]


@torch.inference_mode()
def paged_decode_step(runner: LlamaRunner, blocks: BlockManager, seq_ids: list[int],
                      tokens: list[int]) -> torch.Tensor:
    """Append ``tokens[i]`` to sequence ``seq_ids[i]`` at its current length; returns the
    next-token logits [B, vocab]. Every sequence must have room (``blocks.can_append``)."""
    dev = runner.device
    pos, blk, off = _append(blocks, seq_ids)
    as_dev = lambda x: torch.tensor(x, device=dev)  # noqa: E731
    return _layers(runner, blocks, as_dev(tokens), as_dev(pos), as_dev(blk), as_dev(off),
                   blocks.table_tensor(seq_ids))


def batch_bucket(b: int) -> int:
    """Rows a graph runs for ``b`` sequences: powers of two to 8, then steps of 8 (the matmuls
    read every weight whatever the row count, so padding rows cost little)."""
    return 1 << (b - 1).bit_length() if b <= 8 else -(-b // 8) * 8


def width_bucket(n_blocks: int, block_size: int) -> int:
    """Table width (blocks) a graph gathers: 256, 512, 1024 tokens, then multiples of 1024 (the
    gather and the attention scale with the width)."""
    tokens = n_blocks * block_size
    size = 256
    while size < min(tokens, 1024):
        size *= 2
    if tokens > size:
        size = -(-tokens // 1024) * 1024
    return -(-size // block_size)


class GraphCaptureError(RuntimeError):
    """A paged decode graph could not be captured (the step itself has not run)."""


# A bucket whose capture failed runs eager, and is tried again after CAPTURE_BACKOFF_S, doubled
# each time, CAPTURE_TRIES times in all: a capture can fail for a passing reason (memory taken by
# a long prompt running beside the batch), and one failure must not cost every later step a graph.
CAPTURE_TRIES = 3
CAPTURE_BACKOFF_S = 10.0


class GraphedPagedStep:
    """``paged_decode_step`` replayed from CUDA graphs for up to ``max_batch`` sequences whose
    block tables cover at most ``max_tokens`` tokens; ``fits`` says when the caller must run the
    eager step instead."""

    def __init__(self, runner: LlamaRunner, blocks: BlockManager, max_batch: int, max_tokens: int) -> None:
        self.runner, self.blocks = runner, blocks
        self.max_rows = batch_bucket(max_batch)
        self.max_width = width_bucket(blocks.blocks_for(max_tokens), blocks.block_size)
        self.scratch = blocks.reserve_scratch()
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.failed: dict[tuple[int, int], tuple[int, float]] = {}  # bucket -> (failed tries, next try)
        self.mempool = None

    def _widest(self, seq_ids: list[int]) -> int:
        """Blocks of the longest table once every sequence has room for its next token."""
        return max(self.blocks.blocks_for(self.blocks.lengths[i] + 1) for i in seq_ids)

    def _bucket(self, seq_ids: list[int], widest: int | None = None) -> tuple[int, int]:
        widest = self._widest(seq_ids) if widest is None else widest
        return batch_bucket(len(seq_ids)), width_bucket(widest, self.blocks.block_size)

    def fits(self, seq_ids: list[int]) -> bool:
        """Whether these sequences replay (or may now capture) a graph; else the eager step."""
        widest = self._widest(seq_ids)
        if len(seq_ids) > self.max_rows or widest > self.max_width:
            return False
        key = self._bucket(seq_ids, widest)
        tries, next_try = self.failed.get(key, (0, 0.0))
        return key in self.graphs or (tries < CAPTURE_TRIES and time.monotonic() >= next_try)

    @torch.inference_mode()
    def __call__(self, seq_ids: list[int], tokens: list[int]) -> torch.Tensor:
        """As ``paged_decode_step``. A failed capture raises ``GraphCaptureError`` before any
        sequence has grown, so the caller can run the eager step instead."""
        bl = self.blocks
        B = len(seq_ids)
        rows, width = self._bucket(seq_ids)
        graph, inputs, logits = self._graph(rows, width)
        pos, blk, off = _append(bl, seq_ids)
        pad = rows - B
        table = bl.padded_tables(seq_ids, width) + [[self.scratch] * width] * pad
        flat = list(tokens) + [0] * pad + pos + [0] * pad + blk + [self.scratch] * pad + off + [0] * pad
        flat += [b for row in table for b in row]
        inputs.copy_(torch.tensor(flat, dtype=torch.long))  # one small host-to-device copy per step
        graph.replay()
        return logits[:B].clone()

    def capture_buckets(self, max_tokens: int) -> int:
        """Capture now every batch bucket at every table width up to ``max_tokens`` tokens (and
        the graphs' limits), so a burst of requests replays graphs instead of capturing them
        inside its TTFT. Returns the number of graphs held; a bucket that fails is logged and
        left to be tried again when a step needs it."""
        bs = self.blocks.block_size
        rows = sorted({batch_bucket(b) for b in range(1, self.max_rows + 1)})
        n_blocks = min(self.blocks.blocks_for(max(max_tokens, 1)), self.max_width)
        widths = sorted({width_bucket(n, bs) for n in range(1, n_blocks + 1)})
        for r in rows:
            for w in widths:
                try:
                    self._graph(r, w)
                except GraphCaptureError as e:
                    log.warning("%s", e)
        return len(self.graphs)

    def _graph(self, rows: int, width: int):
        key = (rows, width)
        if key not in self.graphs:
            try:
                self.graphs[key] = self._capture(rows, width)
            except Exception as e:  # noqa: BLE001 - out of memory, an op that cannot be captured
                if self.runner.device.type == "cuda":
                    # this stream, not the device: a device sync would break another thread's capture
                    torch.cuda.current_stream(self.runner.device).synchronize()
                if _drop_few_rows(self.runner, rows, e):
                    return self._graph(rows, width)
                raise GraphCaptureError(f"capturing the paged decode step ({rows} rows, {width} blocks) "
                                        f"failed: {type(e).__name__}: {e}; {self._failed(key)}") from e
        return self.graphs[key]

    def _failed(self, key: tuple[int, int]) -> str:
        tries = self.failed.get(key, (0, 0.0))[0] + 1
        wait = CAPTURE_BACKOFF_S * 2 ** (tries - 1)
        self.failed[key] = (tries, time.monotonic() + wait)
        if tries >= CAPTURE_TRIES:
            return f"that bucket runs eager from now on ({tries} failed captures)"
        return f"that bucket runs eager, and its capture is tried again in {wait:.0f} s"

    def _capture(self, rows: int, width: int):
        from workers.cuda_graph import capture
        r = self.runner
        # tokens, positions, blocks, offsets (rows each), then the block table [rows, width]
        inputs = torch.full((4 * rows + rows * width,), self.scratch, dtype=torch.long, device=r.device)
        inputs[:2 * rows] = 0
        inputs[3 * rows:4 * rows] = 0
        tok, pos, blk, off = inputs[:4 * rows].view(4, rows)
        table = inputs[4 * rows:].view(rows, width)
        if self.mempool is None:
            self.mempool = torch.cuda.graph_pool_handle()
        body = lambda: _layers(r, self.blocks, tok, pos, blk, off, table)  # noqa: E731
        graph, logits = capture(r, body, self.mempool, f"paged decode, {rows} rows, {width} blocks")
        return graph, inputs, logits
