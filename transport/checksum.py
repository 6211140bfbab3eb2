"""A checksum computed where the tensor lives (GPU or CPU), for KV that never leaves the device.

xxh64 would need the block copied to the host, which is what a GPU tier or an NCCL transfer
exists to avoid. This is two sums over the block's 64-bit words (all words, and the words at odd
positions), wrapping modulo 2^64: a single flipped bit changes one word by +-2^k with k < 64,
which can never cancel out, and swapping two neighbouring words changes the second sum. Integer
sums are exact, so CPU (numpy: torch's integer reductions on CPU are ~15x slower) and GPU (torch)
give the same numbers. An integrity check against corruption, not a cryptographic hash.
"""
from __future__ import annotations

import numpy as np
import torch

_MASK = (1 << 64) - 1


def word_size(nbytes: int) -> int:
    """The sums run over 64-bit words if the tensor's bytes allow, else 32-bit, else bytes."""
    return 8 if nbytes % 8 == 0 else 4 if nbytes % 4 == 0 else 1


_WORD = {8: torch.int64, 4: torch.int32, 1: torch.uint8}


def _words(t: torch.Tensor) -> torch.Tensor:
    flat = t.detach().contiguous().view(-1).view(torch.uint8)
    size = word_size(flat.numel())
    if flat.storage_offset() % size:  # a view at an odd address: the same words, copied
        flat = flat.clone()
    return flat.view(_WORD[size])


def _place(t: torch.Tensor) -> tuple[int, int, int, int] | None:
    """(storage address, byte offset in it, word size, words) of a contiguous tensor, else None."""
    if not t.is_contiguous() or t.numel() == 0:
        return None
    nbytes = t.numel() * t.element_size()
    ws = word_size(nbytes)
    base = t.untyped_storage().data_ptr()
    off = t.data_ptr() - base
    return (base, off, ws, nbytes // ws) if off % ws == 0 else None


def strided_runs(tensors: list[torch.Tensor]) -> list[tuple[int, int, int]]:
    """Maximal runs [a, b) of consecutive tensors that are equal-sized contiguous pieces of one
    storage at a constant distance: (a, b, distance in words; 0 for a run of one). Blocks cut from
    one buffer (a GPU tier's slab, a gathered read, a received payload) come as a few runs."""
    places = [(t.device, t.dtype, _place(t)) for t in tensors]
    out, n, a = [], len(tensors), 0
    while a < n:
        dev, dt, pa = places[a]
        b, step = a + 1, None
        while pa is not None and b < n:
            dev_b, dt_b, pb = places[b]
            if pb is None or (dev_b, dt_b) != (dev, dt) or (pb[0], pb[2], pb[3]) != (pa[0], pa[2], pa[3]):
                break
            d = pb[1] - places[b - 1][2][1]
            if d % pa[2] or d // pa[2] < pa[3] or (step is not None and d // pa[2] != step):
                break  # overlapping or irregular: not one strided view
            step, b = d // pa[2], b + 1
        out.append((a, b, step or 0))
        a = b
    return out


def run_sums(t: torch.Tensor, count: int = 1, step: int = 0) -> torch.Tensor:
    """[count, 2] (sum, odd-word sum) of ``t`` and the count - 1 equal tensors that follow it in its
    storage every ``step`` words: one strided view, two reductions in all."""
    w = _words(t)
    if count > 1 and w.untyped_storage().data_ptr() != t.untyped_storage().data_ptr():
        raise ValueError("a run of tensors must start at a word-aligned address")  # _words copied it
    w = w.as_strided((count, w.numel()), (step, 1)) if count > 1 else w.view(1, -1)
    if w.device.type == "cpu":  # numpy: torch's integer reductions on CPU are ~15x slower
        arr = w.numpy()
        with np.errstate(over="ignore"):
            return torch.from_numpy(np.stack([arr.sum(-1, dtype=np.int64),
                                              arr[:, 1::2].sum(-1, dtype=np.int64)], -1))
    return torch.stack([w.sum(-1, dtype=torch.int64), w[:, 1::2].sum(-1, dtype=torch.int64)], -1)


def device_checksums(tensors: list[torch.Tensor]) -> list[list[int]]:
    """[sum, odd-word sum] per tensor, with one host sync at the end. Tensors that follow each
    other in one buffer at a constant distance (see ``strided_runs``) are summed together: a
    segment's blocks cost two reductions, not two each."""
    if not tensors:
        return []
    parts = [run_sums(tensors[a], b - a, step) for a, b, step in strided_runs(tensors)]
    # one device->host copy per device, blocking: a non_blocking copy read before the sync
    # returned garbage sums on a GPU (every block then looked corrupt)
    if len({p.device for p in parts}) == 1:
        sums = torch.cat(parts).cpu()
    else:
        sums = torch.cat([p.cpu() for p in parts])
    return [[a & _MASK, b & _MASK] for a, b in sums.tolist()]


def device_checksum(t: torch.Tensor) -> list[int]:
    return device_checksums([t])[0]
