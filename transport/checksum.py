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


def _words(t: torch.Tensor) -> torch.Tensor:
    flat = t.detach().contiguous().view(-1).view(torch.uint8)
    for dtype, size in ((torch.int64, 8), (torch.int32, 4)):
        if flat.numel() % size == 0:
            return flat.view(dtype)
    return flat


def _sums(t: torch.Tensor):
    w = _words(t)
    if w.device.type == "cpu":
        a = w.numpy()
        with np.errstate(over="ignore"):
            return torch.tensor([a.sum(dtype=np.int64), a[1::2].sum(dtype=np.int64)])
    return torch.stack([w.sum(dtype=torch.int64), w[1::2].sum(dtype=torch.int64)])


def device_checksums(tensors: list[torch.Tensor]) -> list[list[int]]:
    """[sum, odd-word sum] per tensor, with one host sync at the end."""
    if not tensors:
        return []
    parts = [_sums(t) for t in tensors]
    # one device->host copy per device, blocking: a non_blocking copy read before the sync
    # returned garbage sums on a GPU (every block then looked corrupt)
    if len({p.device for p in parts}) == 1:
        sums = torch.stack(parts).cpu()
    else:
        sums = torch.stack([p.cpu() for p in parts])
    return [[a & _MASK, b & _MASK] for a, b in sums.tolist()]


def device_checksum(t: torch.Tensor) -> list[int]:
    return device_checksums([t])[0]
