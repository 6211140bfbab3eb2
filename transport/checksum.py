"""A checksum computed where the tensor lives (GPU or CPU), for KV that never leaves the device.

xxh64 would need the block copied to the host, which is what a GPU tier or an NCCL transfer
exists to avoid. This is two reductions over the block's 32-bit words (all words, and the words at
odd positions), summed in int64: a single flipped bit changes a word by +-2^k with k < 32, which
can never cancel out, and swapping two neighbouring words changes the second sum. It is an
integrity check against corruption, not a cryptographic hash.
"""
from __future__ import annotations

import torch

_MASK = (1 << 64) - 1


def _words(t: torch.Tensor) -> torch.Tensor:
    flat = t.detach().contiguous().view(-1).view(torch.uint8)
    return flat.view(torch.int32) if flat.numel() % 4 == 0 else flat


def device_checksum_tensor(t: torch.Tensor) -> torch.Tensor:
    """The checksum as a 2-element int64 tensor on t's device (no host sync)."""
    w = _words(t)
    return torch.stack([w.sum(dtype=torch.int64), w[1::2].sum(dtype=torch.int64)])


def device_checksums(tensors: list[torch.Tensor]) -> list[int]:
    """Checksums of many tensors with one host sync at the end."""
    if not tensors:
        return []
    sums = torch.stack([device_checksum_tensor(t) for t in tensors]).cpu().tolist()
    return [((a & _MASK) * 0x9E3779B97F4A7C15 + (b & _MASK)) & _MASK for a, b in sums]


def device_checksum(t: torch.Tensor) -> int:
    return device_checksums([t])[0]
