"""One decode step for a batch of sequences of different lengths over paged KV blocks.

The B new tokens go through the QKV, output and MLP matmuls together (the runner's building
blocks on a [B, hidden] matrix, each row at its own position). Attention is per sequence over its
own blocks: the block tables are gathered into a padded [B, Hkv, max_len, d] view and SDPA runs
with a length mask, the query heads of a KV group folded into the query axis (GQA without
expanding K/V). KVSharer: a shared layer computes only Q and reads its source layer's slot
(``runner.kv_slot``), which the source wrote earlier in the same step, so the gathered view of a
slot is reused by the layers that share it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from workers.block_manager import BlockManager
from workers.model_runner import LlamaRunner, Positions


@torch.inference_mode()
def paged_decode_step(runner: LlamaRunner, blocks: BlockManager, seq_ids: list[int],
                      tokens: list[int]) -> torch.Tensor:
    """Append ``tokens[i]`` to sequence ``seq_ids[i]`` at its current length; returns the
    next-token logits [B, vocab]. Every sequence must have room (``blocks.can_append``)."""
    s, dev = runner.spec, runner.device
    B = len(seq_ids)
    pos = torch.tensor([blocks.lengths[i] for i in seq_ids], device=dev)
    where = [blocks.append(i) for i in seq_ids]
    blk = torch.tensor([b for b, _ in where], device=dev)
    off = torch.tensor([o for _, o in where], device=dev)
    table = blocks.table_tensor(seq_ids)
    width = table.shape[1] * blocks.block_size
    mask = (torch.arange(width, device=dev)[None, :] <= pos[:, None])[:, None, None, :]  # [B, 1, 1, W]
    cos, sin = runner.rope.cos_sin(pos, runner.dtype)
    p = Positions(pos, "mask", cos, sin, None)
    g = s.num_heads // s.num_kv_heads
    h = runner.embed(torch.tensor(tokens, device=dev))
    gathered: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for layer in range(s.num_layers):
        q, k, v = runner.qkv(layer, h, p)  # q [H, B, d], k/v [Hkv, B, d] or None (shared layer)
        slot = runner.kv_slot[layer]
        if k is not None:
            blocks.k[slot][blk, :, off] = k.transpose(0, 1)
            blocks.v[slot][blk, :, off] = v.transpose(0, 1)
            gathered.pop(slot, None)
        if slot not in gathered:
            gathered[slot] = blocks.gather(slot, table)
        kk, vv = gathered[slot]
        qf = q.transpose(0, 1).reshape(B, s.num_kv_heads, g, s.head_dim)
        o = F.scaled_dot_product_attention(qf, kk, vv, attn_mask=mask, scale=runner.scale)
        h = h + F.linear(o.reshape(B, s.num_heads * s.head_dim), runner.layers[layer].w_o)
        h = h + runner.mlp(layer, h)
    return runner.logits(h)
