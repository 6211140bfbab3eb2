"""The working KV cache of one sequence: keys after RoPE, slot = position."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVCache:
    k: torch.Tensor  # [kv_layers, Hkv, capacity, d], rotated to each slot's position
    v: torch.Tensor
    length: int = 0  # slots 0..length-1 are valid keys for attention

    @classmethod
    def empty(cls, n_layers: int, n_kv_heads: int, capacity: int, head_dim: int,
              dtype: torch.dtype, device: torch.device) -> "KVCache":
        shape = (n_layers, n_kv_heads, capacity, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device),
                   torch.zeros(shape, dtype=dtype, device=device))

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def write(self, slot: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              layout: str = "mask") -> None:
        if layout in ("causal", "tail"):  # contiguous positions: a slice copy, no scatter
            start = self.length - k.shape[1]
            self.k[slot, :, start:self.length] = k
            self.v[slot, :, start:self.length] = v
        else:
            self.k[slot][:, positions] = k
            self.v[slot][:, positions] = v

    def grow(self, capacity: int) -> None:
        if capacity <= self.capacity:
            return
        pad = capacity - self.capacity
        self.k = torch.nn.functional.pad(self.k, (0, 0, 0, pad))
        self.v = torch.nn.functional.pad(self.v, (0, 0, 0, pad))

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2
