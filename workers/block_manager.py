"""A paged KV pool: fixed-size blocks of token slots shared by every running sequence.

One tensor for K and one for V, shaped [kv_layers, num_blocks, Hkv, block_size, d] (keys after
RoPE, like ``KVCache``), a free list of block ids, and one block table per sequence: token t of a
sequence lives in block ``table[t // block_size]`` at offset ``t % block_size``. Only layers that
own KV have a slot (``runner.kv_layers``): a KVSharer layer reads its source's slot.

Running out of blocks raises ``OutOfBlocksError``; the caller (the continuous batcher) checks
``can_allocate`` first and waits or preempts instead of failing a request.
"""
from __future__ import annotations

from collections import deque

import torch

from workers.model_runner import LlamaRunner


class OutOfBlocksError(RuntimeError):
    """The pool has fewer free blocks than asked for."""


class BlockManager:
    def __init__(self, runner: LlamaRunner, num_blocks: int, block_size: int = 16) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        s = runner.spec
        shape = (len(runner.kv_layers), num_blocks, s.num_kv_heads, block_size, s.head_dim)
        # zeros, not empty: a padded gather reads unused slots, and 0 x NaN would poison attention
        self.k = torch.zeros(shape, dtype=runner.dtype, device=runner.device)
        self.v = torch.zeros(shape, dtype=runner.dtype, device=runner.device)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.free_ids: deque[int] = deque(range(num_blocks))
        self.tables: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}
        self.scratch: int | None = None

    @classmethod
    def for_bytes(cls, runner: LlamaRunner, kv_bytes: int, block_size: int = 16) -> "BlockManager":
        """As many blocks as fit in ``kv_bytes`` (K and V together)."""
        return cls(runner, max(1, kv_bytes // block_bytes(runner, block_size)), block_size)

    # ---- accounting -----------------------------------------------------------------------
    @property
    def free_blocks(self) -> int:
        return len(self.free_ids)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self.free_ids)

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def can_allocate(self, n_tokens: int) -> bool:
        return self.blocks_for(n_tokens) <= len(self.free_ids)

    def can_append(self, seq_id: int) -> bool:
        """Whether one more token fits without a block the pool does not have."""
        return self.lengths[seq_id] % self.block_size != 0 or len(self.free_ids) > 0

    def reserve_scratch(self) -> int:
        """A block no sequence ever gets: padding rows of a graphed decode step write their K/V
        there. Reserved once, before any sequence has blocks; it leaves ``num_blocks``."""
        if self.scratch is None:
            if self.tables:
                raise RuntimeError("reserve the scratch block before any sequence has blocks")
            if self.num_blocks < 2:
                raise OutOfBlocksError("a pool of one block has none to spare for padding rows")
            self.scratch = self.free_ids.pop()
            self.num_blocks -= 1
        return self.scratch

    # ---- allocate / append / free -----------------------------------------------------------
    def allocate(self, seq_id: int, n_tokens: int) -> list[int]:
        """Blocks for a new sequence's first ``n_tokens`` tokens."""
        if seq_id in self.tables:
            raise ValueError(f"sequence {seq_id} already has blocks")
        need = self.blocks_for(n_tokens)
        if need > len(self.free_ids):
            raise OutOfBlocksError(f"sequence {seq_id} needs {need} blocks for {n_tokens} tokens, "
                                   f"{len(self.free_ids)} of {self.num_blocks} are free")
        self.tables[seq_id] = [self.free_ids.popleft() for _ in range(need)]
        self.lengths[seq_id] = n_tokens
        return self.tables[seq_id]

    def append(self, seq_id: int) -> tuple[int, int]:
        """Room for one more token; returns its (block, offset)."""
        t = self.lengths[seq_id]
        table = self.tables[seq_id]
        if t == len(table) * self.block_size:
            if not self.free_ids:
                raise OutOfBlocksError(f"sequence {seq_id} needs a new block at token {t}; none is free")
            table.append(self.free_ids.popleft())
        self.lengths[seq_id] = t + 1
        return table[t // self.block_size], t % self.block_size

    def free(self, seq_id: int) -> None:
        table = self.tables.pop(seq_id, None)
        self.lengths.pop(seq_id, None)
        if table:
            self.free_ids.extend(table)

    # ---- moving KV in and out ---------------------------------------------------------------
    def write(self, seq_id: int, k: torch.Tensor, v: torch.Tensor, start: int = 0) -> None:
        """Copy K/V [kv_layers, Hkv, n, d] of positions start..start+n-1 into the sequence's blocks."""
        n, bs = k.shape[2], self.block_size
        table = self.tables[seq_id]
        if start + n > len(table) * bs:
            raise ValueError(f"sequence {seq_id} has room for {len(table) * bs} tokens, asked {start + n}")
        t = start
        while t < start + n:
            b, off = divmod(t, bs)
            m = min(bs - off, start + n - t)
            self.k[:, table[b], :, off:off + m] = k[:, :, t - start:t - start + m]
            self.v[:, table[b], :, off:off + m] = v[:, :, t - start:t - start + m]
            t += m

    def read(self, seq_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The sequence's K/V as contiguous [kv_layers, Hkv, length, d] (swap-out, tests)."""
        n, table = self.lengths[seq_id], self.tables[seq_id]
        idx = torch.tensor(table, device=self.k.device)
        L, _, H, bs, d = self.k.shape

        def one(x: torch.Tensor) -> torch.Tensor:
            g = x.index_select(1, idx).permute(0, 2, 1, 3, 4).reshape(L, H, len(table) * bs, d)
            return g[:, :, :n].contiguous()
        return one(self.k), one(self.v)

    def padded_tables(self, seq_ids: list[int], width: int | None = None) -> list[list[int]]:
        """Block tables of ``seq_ids``, each padded with its last block to ``width`` (default: the
        longest); the padding slots lie past the sequence's length, so a length mask hides them."""
        rows = [self.tables[s] for s in seq_ids]
        width = max(len(r) for r in rows) if width is None else width
        return [r + [r[-1]] * (width - len(r)) for r in rows]

    def table_tensor(self, seq_ids: list[int]) -> torch.Tensor:
        """Block tables of ``seq_ids`` as [B, max_blocks] (``padded_tables``)."""
        return torch.tensor(self.padded_tables(seq_ids), device=self.k.device)

    def gather(self, slot: int, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of one slot for a batch of block tables [B, nb]: [B, Hkv, nb * block_size, d]."""
        B, nb = table.shape
        _, _, H, bs, d = self.k.shape
        flat = table.reshape(-1)

        def one(x: torch.Tensor) -> torch.Tensor:
            g = x[slot].index_select(0, flat).view(B, nb, H, bs, d)
            return g.transpose(1, 2).reshape(B, H, nb * bs, d)
        return one(self.k), one(self.v)

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


def block_bytes(runner: LlamaRunner, block_size: int) -> int:
    """Bytes of K and V of one block across the stored layers."""
    s = runner.spec
    return len(runner.kv_layers) * 2 * s.num_kv_heads * block_size * s.head_dim * runner.embed_w.element_size()
