"""Rotary position embedding. Keys are stored before RoPE, so moving a reused key to a new
position is one exact rotation."""
from __future__ import annotations

import math

import torch

from workers.model_spec import ModelSpec


def rope_inv_freq(spec: ModelSpec) -> tuple[torch.Tensor, float]:
    """inv_freq [head_dim/2] and the attention scaling factor, for default/linear/llama3 RoPE."""
    d = spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    sc = spec.rope_scaling
    if not sc:
        return inv_freq.float(), 1.0
    rtype = sc.get("rope_type", sc.get("type"))
    if rtype == "linear":
        return (inv_freq / sc["factor"]).float(), 1.0
    if rtype == "llama3":
        return _llama3_inv_freq(inv_freq, sc).float(), 1.0
    raise NotImplementedError(f"RoPE scaling type {rtype!r} is not supported (default, linear, llama3)")


def _llama3_inv_freq(inv_freq: torch.Tensor, sc: dict) -> torch.Tensor:
    factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
    old_ctx = sc["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / lo, old_ctx / hi
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


TABLE_MAX_POSITIONS = 1 << 18  # past this a table (positions x head_dim x 2 per dtype) is not kept


class Rope:
    """cos/sin per position. Where the caller bounds the positions, they are looked up in a table
    of every position the model can see: two gathers instead of ~9 kernels, whose launches cost
    ~0.2 ms of host time per pass on an H200 host."""

    def __init__(self, spec: ModelSpec, device: torch.device) -> None:
        inv_freq, self.scaling = rope_inv_freq(spec)
        self.inv_freq = inv_freq.to(device)
        self.table_positions = spec.max_position
        self._tables: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}
        self._retired: list[tuple[torch.Tensor, torch.Tensor]] = []  # captured graphs may read them

    def reserve(self, positions: int) -> None:
        """Let the table cover positions up to ``positions`` - 1 (a KV pool's slots)."""
        if self.table_positions < positions <= TABLE_MAX_POSITIONS:
            self.table_positions = positions
            self._retired.extend(self._tables.values())
            self._tables.clear()

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype,
                bound: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [n, head_dim] for ``positions``; ``bound``: every position is below it (then
        the table serves, if it reaches that far)."""
        if bound is None or bound > self.table_positions or self.table_positions > TABLE_MAX_POSITIONS:
            return self.compute(positions, dtype)
        table = self._tables.get(dtype)
        if table is None:
            every = torch.arange(self.table_positions, device=self.inv_freq.device)
            table = self._tables[dtype] = self.compute(every, dtype)
        return table[0][positions], table[1][positions]

    def compute(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., n, d] rotated by cos/sin [n, d] (Hugging Face's rotate-half layout)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
