"""Static-batch prefill and greedy decode of B equal-length sequences on a LlamaRunner.

One KV cache [slots, B, Hkv, capacity, d] for the whole batch, one token per sequence per step,
attention through SDPA over the batch. It honors the runner's KVSharer map: a shared layer
computes only its Q, reads its source layer's slot (``runner.kv_slot``) and stores nothing, so the
cache holds ``len(runner.kv_layers)`` slots. ``kv_source=`` runs an UNSHARED runner as if a map
were applied (the KVSharer search tries many maps on one set of weights): the cache then has one
slot per layer and a shared layer uses the first q rows of its fused QKV weight, the same matmul
``runner.share_kv`` leaves it with.

Used for decode tokens/s at a batch size (benchmarks) and for batched calibration / perplexity.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from workers.model_runner import LlamaRunner
from workers.model_runner import _NO_CUDNN, sdpa_kernel  # noqa: E402
from workers.rope import apply_rope

try:
    from torch.nn.attention.bias import causal_lower_right
except ImportError:  # pragma: no cover - old torch
    causal_lower_right = None


@dataclass
class BatchKV:
    k: torch.Tensor  # [slots, B, Hkv, capacity, d], keys after RoPE, slot = position
    v: torch.Tensor
    length: int = 0  # positions 0..length-1 hold valid KV (same for every sequence)

    @classmethod
    def empty(cls, runner: LlamaRunner, batch: int, capacity: int, slots: int | None = None,
              zero: bool = True) -> "BatchKV":
        s = runner.spec
        shape = (len(runner.kv_layers) if slots is None else slots, batch, s.num_kv_heads, capacity,
                 s.head_dim)
        make = torch.zeros if zero else torch.empty
        return cls(make(shape, dtype=runner.dtype, device=runner.device),
                   make(shape, dtype=runner.dtype, device=runner.device))

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def clone(self) -> "BatchKV":
        return BatchKV(self.k.clone(), self.v.clone(), self.length)


def kv_bytes_per_token(runner: LlamaRunner) -> int:
    """Bytes of K and V one token occupies across the stored (owner) layers."""
    s = runner.spec
    return len(runner.kv_layers) * 2 * s.num_kv_heads * s.head_dim * runner.embed_w.element_size()


def _routing(runner: LlamaRunner, kv_source: Sequence[int] | None) -> tuple[list[int], list[bool]]:
    """Per layer: cache slot it reads, and whether it computes and writes its own K/V."""
    L = runner.spec.num_layers
    if kv_source is None:
        return list(runner.kv_slot), [runner.kv_source[l] == l for l in range(L)]
    if any(runner.kv_source[l] != l for l in range(L)):
        raise ValueError("kv_source= needs an unshared runner (this one already shares KV)")
    if len(kv_source) != L:
        raise ValueError(f"kv_source has {len(kv_source)} entries, model has {L} layers")
    for l, src in enumerate(kv_source):
        if not 0 <= src <= l or kv_source[src] != src:
            raise ValueError(f"layer {l} cannot share layer {src}'s KV (source must be an earlier owner)")
    return list(kv_source), [kv_source[l] == l for l in range(L)]


# SDPA kernels parallelize over (batch, head, query block): a one-token step of a small batch
# gives them too few blocks for the GPU (8 CTAs at batch 1 on Llama-3-8B), batched matmuls
# spread over the keys instead
SMALL_DECODE_BATCH_HEADS = 128


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Softmax precision: at least float32."""
    return torch.promote_types(dtype, torch.float32)


def attend_matmul(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Unmasked attention of q [B, Hkv, g, d] over k, v [B, Hkv, n, d] by two matmuls."""
    scores = torch.matmul(q, k.transpose(-1, -2)).to(_acc(q.dtype)) * scale
    return torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)


def _attend(runner: LlamaRunner, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            start: int) -> torch.Tensor:
    """q [B, H, m, d] at positions start..start+m-1 over keys 0..start+m-1 [B, Hkv, n, d]."""
    s = runner.spec
    B, H, m, d = q.shape
    groups = H // s.num_kv_heads
    if m == 1:
        # decode: every key is visible, so fold the query heads of a KV group into the query
        # axis: plain multi-head attention over Hkv heads, any kernel, no K/V expansion.
        qf = q.reshape(B, s.num_kv_heads, groups, d)
        if q.is_cuda and B * s.num_kv_heads < SMALL_DECODE_BATCH_HEADS:
            o = attend_matmul(qf, k, v, runner.scale)
        elif sdpa_kernel is not None and q.is_cuda:  # cuDNN's per-call CPU cost, see model_runner
            with sdpa_kernel(_NO_CUDNN):
                o = F.scaled_dot_product_attention(qf, k, v, scale=runner.scale)
        else:
            o = F.scaled_dot_product_attention(qf, k, v, scale=runner.scale)
        return o.reshape(B, 1, H * d)
    if start == 0:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=runner.scale,
                                           enable_gqa=groups > 1)
    elif causal_lower_right is not None:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(m, k.shape[2]),
                                           scale=runner.scale, enable_gqa=groups > 1)
    else:  # pragma: no cover - old torch
        key_pos = torch.arange(k.shape[2], device=q.device)
        mask = key_pos[None, :] <= torch.arange(start, start + m, device=q.device)[:, None]
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=runner.scale)
    return o.transpose(1, 2).reshape(B, m, H * d)


def batch_layer(runner: LlamaRunner, layer: int, h: torch.Tensor, start: int, cache: BatchKV,
                slot: int, own: bool) -> torch.Tensor:
    """One layer for h [B, m, hidden] at positions start..start+m-1; writes K/V when ``own``."""
    s, lw = runner.spec, runner.layers[layer]
    if own and lw.w_qkv.shape[0] == s.q_size:
        raise ValueError(f"layer {layer} has no K/V projection (the runner shares its KV)")
    w, b = (lw.w_qkv, lw.b_qkv) if own else (lw.w_qkv[:s.q_size],
                                              None if lw.b_qkv is None else lw.b_qkv[:s.q_size])
    x = F.linear(runner._norm(h, lw.attn_norm), w, b)
    B, m, _ = x.shape
    end = start + m
    cos, sin = runner.rope.cos_sin(torch.arange(start, end, device=h.device), h.dtype)
    q = apply_rope(x[..., :s.q_size].view(B, m, s.num_heads, s.head_dim).transpose(1, 2), cos, sin)
    if own:
        kv = s.kv_size
        k = x[..., s.q_size:s.q_size + kv].view(B, m, s.num_kv_heads, s.head_dim).transpose(1, 2)
        cache.k[slot, :, :, start:end] = apply_rope(k, cos, sin)
        cache.v[slot, :, :, start:end] = x[..., s.q_size + kv:].view(
            B, m, s.num_kv_heads, s.head_dim).transpose(1, 2)
    attn = _attend(runner, q, cache.k[slot, :, :, :end], cache.v[slot, :, :, :end], start)
    h = h + F.linear(attn, lw.w_o)
    return h + runner.mlp(layer, h)


@torch.inference_mode()
def run_layers(runner: LlamaRunner, h: torch.Tensor, start: int, cache: BatchKV,
               layers: Sequence[int] | None = None, kv_source: Sequence[int] | None = None,
               trace: list | None = None) -> torch.Tensor:
    """Layers (default all, in order) over h [B, m, hidden]; ``trace`` collects each layer's
    input hidden state (trace[l] = input of layer l) for callers that restart mid-model."""
    slots, own = _routing(runner, kv_source)
    for l in (range(runner.spec.num_layers) if layers is None else layers):
        if trace is not None:
            trace[l] = h
        h = batch_layer(runner, l, h, start, cache, slots[l], own[l])
    return h


def _as_batch(runner: LlamaRunner, token_ids) -> torch.Tensor:
    if isinstance(token_ids, torch.Tensor):
        ids = token_ids.to(runner.device)
    else:
        rows = [list(map(int, r)) for r in token_ids]
        if not rows or len({len(r) for r in rows}) != 1 or not rows[0]:
            raise ValueError("a static batch needs >= 1 sequences of equal, non-zero length")
        ids = torch.tensor(rows, device=runner.device)
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(f"token ids must be [batch, length], got {tuple(ids.shape)}")
    if int(ids.min()) < 0 or int(ids.max()) >= runner.spec.vocab_size:
        raise ValueError(f"token ids outside the vocabulary [0, {runner.spec.vocab_size})")
    return ids


@torch.inference_mode()
def batch_prefill(runner: LlamaRunner, token_ids, max_new_tokens: int = 0,
                  kv_source: Sequence[int] | None = None) -> tuple[BatchKV, torch.Tensor]:
    """Prefill [B, T] prompts; returns the cache (capacity T + max_new_tokens) and the last
    position's logits [B, vocab]."""
    ids = _as_batch(runner, token_ids)
    B, T = ids.shape
    slots = runner.spec.num_layers if kv_source is not None else None
    cache = BatchKV.empty(runner, B, T + max_new_tokens, slots)
    h = run_layers(runner, runner.embed(ids), 0, cache, kv_source=kv_source)
    cache.length = T
    return cache, runner.logits(h[:, -1])


@torch.inference_mode()
def batch_decode_step(runner: LlamaRunner, cache: BatchKV, tokens: torch.Tensor,
                      kv_source: Sequence[int] | None = None) -> torch.Tensor:
    """Append one token per sequence (tokens [B]); returns next-token logits [B, vocab]."""
    t = cache.length
    if t >= cache.capacity:
        raise ValueError(f"batch KV cache is full ({cache.capacity} positions)")
    h = runner.embed(tokens.view(-1, 1).to(runner.device))
    h = run_layers(runner, h, t, cache, kv_source=kv_source)
    cache.length = t + 1
    return runner.logits(h[:, -1])


@torch.inference_mode()
def batch_generate(runner: LlamaRunner, token_ids, max_tokens: int = 32,
                   stop_ids: Sequence[int] | None = None) -> list[list[int]]:
    """Greedy generation for B equal-length prompts. Every sequence runs ``max_tokens`` steps
    (static batch; it stops early only when all have stopped); each output is cut after its
    first stop token, as ReuseEngine.generate does."""
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
    cache, logits = batch_prefill(runner, token_ids, max_tokens)
    stop = set(runner.spec.eos_token_ids if stop_ids is None else stop_ids)
    out = []
    done = torch.zeros(cache.batch, dtype=torch.bool, device=runner.device)
    for i in range(max_tokens):
        nxt = torch.argmax(logits, dim=-1)
        out.append(nxt)
        for sid in stop:
            done |= nxt == sid
        if i + 1 < max_tokens and not bool(done.all()):
            logits = batch_decode_step(runner, cache, nxt)
        elif i + 1 < max_tokens:
            break
    rows = torch.stack(out, dim=1).tolist() if out else [[] for _ in range(cache.batch)]
    result = []
    for r in rows:
        cut = next((j + 1 for j, t in enumerate(r) if t in stop), len(r))
        result.append(r[:cut])
    return result


# ---- one decode step as a CUDA graph ----------------------------------------------------------
class GraphedBatchStep:
    """``batch_decode_step`` for a fixed cache and batch, with static shapes so that CUDA can
    capture it once and replay it: an eager step of an 8B model launches ~1,000 small kernels
    whose CPU cost (~20-30 ms on an H100 host) exceeds the ~15 ms of memory reads of a large
    batch. Attention spans the whole cache capacity with a mask by position (the position is a
    device tensor), K/V are written with ``index_copy_``. Without CUDA (or ``graph=False``) the
    same static body runs eagerly, which is what the CPU tests check against the plain step.
    Capture happens on the first call, which must find a free slot (length < capacity): the
    capture's warm-up writes land in the next slot, which that call then overwrites."""

    def __init__(self, runner: LlamaRunner, cache: BatchKV, graph: bool | None = None,
                 attn: str = "auto") -> None:
        if attn not in ("auto", "sdpa", "matmul"):
            raise ValueError(f"attn must be auto, sdpa or matmul, got {attn!r}")
        self.runner, self.cache, self.attn = runner, cache, attn
        dev = runner.device
        self.use_graph = (dev.type == "cuda") if graph is None else graph
        self.tok = torch.zeros(cache.batch, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        cap = cache.capacity
        width = -(-cap // 16) * 16  # mask rows 16-aligned, or SDPA falls back to its math path
        self.key_pos = torch.arange(width, device=dev)
        self.cap = cap
        self.graph: "torch.cuda.CUDAGraph | None" = None
        self.logits: torch.Tensor | None = None
        self.graph_error: str | None = None

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        r, s = self.runner, self.runner.spec
        B, H, _, d = q.shape
        qf = q.reshape(B, s.num_kv_heads, H // s.num_kv_heads, d)
        small = q.is_cuda and B * s.num_kv_heads < SMALL_DECODE_BATCH_HEADS
        if self.attn == "matmul" or (self.attn == "auto" and small):
            scores = torch.matmul(qf, k.transpose(-1, -2)).to(_acc(q.dtype)) * r.scale
            scores.masked_fill_(~mask, float("-inf"))
            o = torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)
        elif q.is_cuda and sdpa_kernel is not None:
            with sdpa_kernel(_NO_CUDNN):
                o = F.scaled_dot_product_attention(qf, k, v, attn_mask=mask, scale=r.scale)
        else:
            o = F.scaled_dot_product_attention(qf, k, v, attn_mask=mask, scale=r.scale)
        return o.reshape(B, 1, H * d)

    def _body(self) -> torch.Tensor:
        r, s, c = self.runner, self.runner.spec, self.cache
        pos = self.pos
        cos, sin = r.rope.cos_sin(pos, r.dtype)
        mask = (self.key_pos[None, :] <= pos[:, None])[None, None, :, :self.cap]  # [1, 1, 1, cap]
        h = r.embed(self.tok)[:, None, :]
        B = h.shape[0]
        for l in range(s.num_layers):
            lw, slot, own = r.layers[l], r.kv_slot[l], r.kv_source[l] == l
            x = F.linear(r._norm(h, lw.attn_norm), lw.w_qkv, lw.b_qkv)
            q = apply_rope(x[..., :s.q_size].view(B, 1, s.num_heads, s.head_dim).transpose(1, 2), cos, sin)
            if own:
                kv = s.kv_size
                k = x[..., s.q_size:s.q_size + kv].view(B, 1, s.num_kv_heads, s.head_dim).transpose(1, 2)
                v = x[..., s.q_size + kv:].view(B, 1, s.num_kv_heads, s.head_dim).transpose(1, 2)
                c.k[slot].index_copy_(2, pos, apply_rope(k, cos, sin))
                c.v[slot].index_copy_(2, pos, v)
            attn = self._attend(q, c.k[slot], c.v[slot], mask)
            h = h + F.linear(attn, lw.w_o)
            h = h + r.mlp(l, h)
        return r.logits(h[:, -1])

    def _capture(self) -> None:
        dev = self.runner.device
        self.pos.fill_(self.cache.length)  # warm-up writes go to the slot this call fills anyway
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._body()
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.logits = self._body()

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per sequence (tokens [B]) at ``cache.length``; logits [B, vocab]."""
        c = self.cache
        t = c.length
        if t >= c.capacity:
            raise ValueError(f"batch KV cache is full ({c.capacity} positions)")
        self.tok.copy_(tokens.reshape(-1))
        if self.use_graph and self.graph is None:
            try:
                self._capture()
            except Exception as e:  # a kernel that will not capture: run eagerly from now on
                self.graph_error = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
                self.use_graph, self.graph = False, None
                torch.cuda.current_stream(self.runner.device).synchronize()
        self.pos.fill_(t)
        if self.graph is not None:
            self.graph.replay()
            out = self.logits.clone()
        else:
            out = self._body()
        c.length = t + 1
        return out
