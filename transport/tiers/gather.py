"""Many host-tier blocks to a device in a few large copies, verified there in a few kernels.

Copying block by block (two tensors each, four checksum reductions each) costs ~10 small CUDA
calls per block: at 64 KiB - 1 MiB blocks that, not the PCIe link, bounds the host -> GPU path.
Here a read of n blocks becomes:

1. ``plan_layout``: every block's place in ONE device buffer, at 64-aligned offsets, so that
   blocks of equal size sit at a constant stride;
2. the copies: blocks that are small (the per-copy cost would dominate) are first gathered into
   one reused pinned staging buffer (``torch.cat``, one C++ call) and sent in ONE copy; large
   blocks are sent straight from their own pinned buffers, one copy each (no CPU pass);
3. ``uniform_groups``: runs of blocks with the same header layout at a constant stride; each run
   becomes one strided view of the device buffer, unbound into per-block keys/values views, and
   its device checksums are four reductions for the whole run (``group_checksums``), read back
   with one blocking copy, which also waits for the H2D copies (stream order).

The functions without torch in their signature are pure and unit-tested on CPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from transport.block import DTYPES
from transport.checksum import run_sums, word_size

ALIGN = 64


@dataclass(frozen=True)
class Layout:
    """Where a verified encoded block keeps its tensors (taken from its header once, at put)."""

    payload_off: int        # byte offset of the keys within the encoded block (64-aligned)
    half: int               # bytes of the keys (= bytes of the values)
    dtype: str
    shape: tuple[int, int, int, int]
    fingerprint: str
    layers: tuple[int, ...]
    token_hash: int

    @property
    def kind(self) -> tuple:
        """Blocks of one kind can share one strided view."""
        return (self.payload_off, self.half, self.dtype, self.shape)


def align_up(n: int, a: int = ALIGN) -> int:
    return -(-n // a) * a


def plan_layout(sizes: Sequence[int], align: int = ALIGN) -> tuple[list[int], int]:
    """Offsets of blocks of these sizes placed back to back, each start aligned; total bytes."""
    offs, off = [], 0
    for s in sizes:
        offs.append(off)
        off = align_up(off + s, align)
    return offs, off


def uniform_groups(offsets: Sequence[int], kinds: Sequence[object]) -> list[tuple[int, int, int]]:
    """Maximal runs [a, b) of consecutive blocks of one kind at a constant stride: (a, b, stride).
    A single block is a run of its own (stride 0)."""
    out: list[tuple[int, int, int]] = []
    n, a = len(offsets), 0
    while a < n:
        b = a + 1
        stride = offsets[b] - offsets[a] if b < n and kinds[b] == kinds[a] else 0
        while b < n and kinds[b] == kinds[a] and offsets[b] - offsets[b - 1] == stride:
            b += 1
        out.append((a, b, stride))
        a = b
    return out


def group_views(dev: torch.Tensor, base: int, g: int, stride: int, lay: Layout
                ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Keys and values of g blocks of layout ``lay`` whose encoded bytes start at ``base``,
    ``base + stride``, ... in the uint8 device buffer ``dev``: views, no copy."""
    tdtype, npdtype = DTYPES[lay.dtype]
    item = npdtype.itemsize
    start = base + lay.payload_off
    n = lay.half // item
    typed = dev.view(tdtype) if item > 1 else dev
    both = typed.as_strided((g, 2, n), (max(stride, 1) // item if g > 1 else 1, n, 1), start // item)
    both = both.unflatten(2, lay.shape)
    return both[:, 0].unbind(0), both[:, 1].unbind(0)


def group_checksums(dev: torch.Tensor, base: int, g: int, stride: int, lay: Layout) -> torch.Tensor:
    """[g, 2, 2] int64: per block, (sum, odd-word sum) of keys then values, by the formula of
    transport.checksum (one strided view of the g keys, one of the g values)."""
    keys, values = group_views(dev, base, g, stride, lay)
    step = stride // word_size(lay.half)
    return torch.stack([run_sums(keys[0], g, step), run_sums(values[0], g, step)], 1)


def sums_equal(got: torch.Tensor, want: Sequence[Sequence[Sequence[int]] | None]) -> list[bool]:
    """Compare read-back [n, 2, 2] sums with the ones recorded at put ([[k, k_odd], [v, v_odd]])."""
    g = got.numpy().astype(np.int64, copy=False).view(np.uint64)
    out = []
    for i, w in enumerate(want):
        out.append(w is not None and g[i, 0, 0] == w[0][0] and g[i, 0, 1] == w[0][1]
                   and g[i, 1, 0] == w[1][0] and g[i, 1, 1] == w[1][1])
    return out
