"""A compact Llama-family runner (Llama, Qwen2, Mistral) built for KV reuse.

What it does that a stock model does not: it runs any subset of tokens at any positions against a
KV cache that mixes fresh and reused entries (causal mask by position), hands out keys before
RoPE, runs layer by layer so the reuse engine can stop at a check layer, and lets a layer attend
over another layer's KV (KVSharer) without computing its own K/V.
"""
from __future__ import annotations

import logging
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import xxhash

from workers import decode_attention, fused, gemv, qkv_write, subset_attention
from workers.kv_cache import KVCache
from workers.model_spec import ModelSpec
from workers.rope import Rope, apply_rope

try:  # block-sparse attention with a causal mask by position, compiled once (CUDA only)
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # pragma: no cover - old torch
    flex_attention = BlockMask = None

try:  # cuDNN's SDPA spends ~1.3 ms of CPU per call building its graph (measured on an H100
    # host): ruinous for one-token passes, so non-causal attention keeps to flash/efficient
    from torch.nn.attention import SDPBackend, sdpa_kernel
    _NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
except ImportError:  # pragma: no cover - old torch
    sdpa_kernel = None

FLEX_MIN_QUERIES, FLEX_MIN_KEYS = 128, 8192  # where it was measured to beat dense masks
SMALL_QUERY = 256  # folded query rows below which kernel launch cost outweighs cuDNN's speed
_FLEX = None
FLEX_DYNAMIC = os.environ.get("KVCLUSTER_FLEX_DYNAMIC", "1") == "1"
log = logging.getLogger(__name__)


def _flex():
    global _FLEX
    if _FLEX is None:
        _FLEX = torch.compile(flex_attention, dynamic=FLEX_DYNAMIC)
    return _FLEX



@dataclass
class LayerWeights:
    attn_norm: torch.Tensor
    w_qkv: torch.Tensor  # [q + 2*kv, hidden], or [q, hidden] when the layer shares another's KV
    b_qkv: torch.Tensor | None
    w_o: torch.Tensor
    mlp_norm: torch.Tensor
    w_gate_up: torch.Tensor  # [2*inter, hidden]
    w_down: torch.Tensor


class LlamaRunner:
    def __init__(self, spec: ModelSpec, embed: torch.Tensor, layers: list[LayerWeights],
                 final_norm: torch.Tensor, lm_head: torch.Tensor, name: str = "model",
                 kv_source: list[int] | None = None) -> None:
        self.spec = spec
        self.name = name
        self.embed_w = embed
        self.layers = layers
        self.final_norm = final_norm
        self.lm_head = lm_head
        self.device = embed.device
        self.dtype = embed.dtype
        self.rope = Rope(spec, self.device)
        self.scale = spec.head_dim ** -0.5
        self.kv_source = list(kv_source) if kv_source else list(range(spec.num_layers))
        # masked passes on CUDA use FlexAttention (skips fully masked blocks, native GQA)
        self.use_flex = self.device.type == "cuda" and flex_attention is not None
        self.flex_failures = 0
        # tensor parallel (workers/tensor_parallel.py): sums a shard's partial results over the
        # ranks (o-proj, down-proj, per-head score sums); None on an unsharded runner
        self.reduce = None
        # compiled pointwise fusion (workers/fused.py): CUDA only, off under tensor parallelism,
        # and only inside CUDA-graph captures (``fusing``), where its ~0.4 ms of Python per call
        # (guards on dynamic shapes) is paid once at capture instead of on every pass
        self.fuse = self.device.type == "cuda" and fused.ENABLED
        self._fusing_in = threading.local()  # per thread: a worker captures while others run eager
        # one-token graph steps through FlexAttention's decoder: measured equal to batched matmuls
        # (0.85 vs 0.88 ms of attention per 8k-token step), so off; kept, tested, for longer contexts
        self.flex_decode = False
        # masked passes of several tokens through the split-key Triton kernel
        # (workers/subset_attention.py) instead of SDPA with a dense mask; KVCLUSTER_SUBSET_KERNEL=0: off
        self.subset_kernel = (self.device.type == "cuda" and subset_attention.supports(spec.head_dim)
                              and os.environ.get("KVCLUSTER_SUBSET_KERNEL", "1") == "1")
        # one-token steps through the split-key Triton kernel (workers/decode_attention.py)
        self.decode_kernel = self.device.type == "cuda" and decode_attention.triton is not None
        # inside graphs, RoPE + K/V write + pre-RoPE keys in one Triton kernel (workers/qkv_write.py):
        # every 1k reuse cell 3-5% faster on an H100 (benchmarks/results/reuse_gpu_h100_qkv_only.json against
        # reuse_gpu_h100_1k_noqkv.json, 2026-12-07); KVCLUSTER_QKV_KERNEL=0 turns it off
        self.qkv_kernel = (self.device.type == "cuda" and qkv_write.supports(spec.head_dim)
                           and os.environ.get("KVCLUSTER_QKV_KERNEL", "1") == "1")
        # one-token graph steps: each linear a Triton GEMV with its norm, SiLU x up or residual add
        # folded in (workers/gemv.py) instead of cuBLAS plus small kernels; KVCLUSTER_GEMV=0: off
        self.gemv_kernel = self.device.type == "cuda" and gemv.triton is not None and gemv.ENABLED
        self._set_slots()
        self.fingerprint = self._fingerprint()

    # ---- identity -------------------------------------------------------------------------
    def _set_slots(self) -> None:
        owners = [l for l in range(self.spec.num_layers) if self.kv_source[l] == l]
        self.kv_layers: tuple[int, ...] = tuple(owners)  # layers that own (store) KV
        slot = {l: i for i, l in enumerate(owners)}
        self.kv_slot = [slot[self.kv_source[l]] for l in range(self.spec.num_layers)]

    def _fingerprint(self) -> str:
        h = xxhash.xxh64()
        h.update(repr(sorted(self.spec.to_dict().items())).encode())
        h.update(str(self.dtype).encode())
        h.update(repr(self.kv_source).encode())
        for t in (self.embed_w, self.layers[0].w_qkv, self.layers[-1].w_down):
            h.update(t.reshape(-1)[:4096].float().cpu().numpy().tobytes())
        return f"{self.name}-{h.hexdigest()}"

    def share_kv(self, kv_source: list[int]) -> None:
        """Apply a KVSharer map: layer l attends over layer kv_source[l]'s KV (kv_source[l] <= l)."""
        if len(kv_source) != self.spec.num_layers:
            raise ValueError(f"kv_source has {len(kv_source)} entries, model has {self.spec.num_layers} layers")
        for l, src in enumerate(kv_source):
            if not 0 <= src <= l or kv_source[src] != src:
                raise ValueError(f"layer {l} cannot share layer {src}'s KV (source must be an earlier owner)")
        q = self.spec.q_size
        for l, src in enumerate(kv_source):
            if src != l:
                lw = self.layers[l]
                lw.w_qkv = lw.w_qkv[:q].contiguous()  # a shared layer never computes K/V
                lw.b_qkv = None if lw.b_qkv is None else lw.b_qkv[:q].contiguous()
        self.kv_source = list(kv_source)
        self._set_slots()
        self.fingerprint = self._fingerprint()

    # ---- building blocks ------------------------------------------------------------------
    def new_cache(self, capacity: int) -> KVCache:
        s = self.spec
        return KVCache.empty(len(self.kv_layers), s.num_kv_heads, capacity, s.head_dim,
                             self.dtype, self.device)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(token_ids, self.embed_w)

    @contextmanager
    def fusing(self):
        saved, self._fusing_in.on = self._fusing, self.fuse
        try:
            yield
        finally:
            self._fusing_in.on = saved

    @property
    def _fusing(self) -> bool:
        return getattr(self._fusing_in, "on", False)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_fusing_in")  # thread-local state does not pickle
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._fusing_in = threading.local()

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.reduce is None else self.reduce(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        if self._one_token_gemv(h, self.lm_head):
            return gemv.gemv(h, self.lm_head, norm_w=self.final_norm, eps=self.spec.rms_norm_eps)
        return F.linear(self._norm(h, self.final_norm), self.lm_head)

    def few_row_kernels(self, rows: int) -> bool:
        """Inside a graph capture, unsharded: a step of ``rows`` tokens may run its linears through
        the GEMV kernels (workers/gemv.py) and its K/V writes through the q/k/v kernel."""
        return (self.gemv_kernel and self.qkv_kernel and self._fusing and self.reduce is None
                and (rows == 1 or (gemv.ROWS_ENABLED and rows <= gemv.MAX_ROWS)))

    def _one_token_gemv(self, x: torch.Tensor, w: torch.Tensor) -> bool:
        """Inside a one-token graph capture, unsharded: the GEMV kernel takes this linear."""
        return self.gemv_kernel and self._fusing and self.reduce is None and gemv.supports(x, w)

    def _norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), w, self.spec.rms_norm_eps)

    def positions(self, pos: torch.Tensor, layout: str, n_keys: int | None = None) -> "Positions":
        return Positions.build(self, pos, layout, n_keys)

    def qkv(self, layer: int, h: torch.Tensor, p: "Positions", k_pre_out: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """q and k rotated [H|Hkv, m, d] and v (None for a shared layer); pre-RoPE keys go to
        ``k_pre_out`` on the way."""
        s, lw = self.spec, self.layers[layer]
        x = F.linear(self._norm(h, lw.attn_norm), lw.w_qkv, lw.b_qkv)
        m = h.shape[0]
        owns_kv = x.shape[1] > s.q_size
        heads = s.num_heads + (s.num_kv_heads if owns_kv else 0)
        qk = x[:, :heads * s.head_dim].view(m, heads, s.head_dim).transpose(0, 1)
        if owns_kv and k_pre_out is not None:
            k_pre_out[self.kv_slot[layer]][:, p.pos] = qk[s.num_heads:]
        qk = apply_rope(qk, p.cos, p.sin)  # one rotation for q and k together
        q = qk[:s.num_heads]
        if not owns_kv:
            return q, None, None
        v = x[:, s.q_size + s.kv_size:].view(m, s.num_kv_heads, s.head_dim).transpose(0, 1)
        return q, qk[s.num_heads:], v

    def rotate(self, k_pre: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cos, sin = self.rope.cos_sin(positions, k_pre.dtype)
        return apply_rope(k_pre, cos, sin)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: "Positions") -> torch.Tensor:
        """q [H, m, d] over cached keys [Hkv, n, d]; returns [m, H*d].

        "causal" (queries are positions 0..m-1) goes to the flash kernel with native GQA. Any other
        layout folds the query heads of a KV group into the query axis ([Hkv, g*m, d]) so masked
        kernels see matching head counts without copying K/V g times.
        """
        s = self.spec
        g, m = s.num_heads // s.num_kv_heads, q.shape[1]
        if p.layout == "causal":
            o = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True,
                                               scale=self.scale, enable_gqa=g > 1)[0]
        elif q.is_cuda and padded_causal(p.layout, m, k.shape[1]):
            pad = q.new_zeros(q.shape[0], k.shape[1] - m, q.shape[2])
            o = F.scaled_dot_product_attention(torch.cat([pad, q], 1)[None], k[None], v[None], is_causal=True,
                                               scale=self.scale, enable_gqa=g > 1)[0, :, -m:]
        elif p.block_mask is not None and self.use_flex:
            try:
                # contiguous K/V (a copy, ~50 us per layer at 8k keys): over the whole pool slot
                # instead (no copy, mask past n) the pass measured 1.8x slower in the engine on an
                # H100 (429 vs 241 us per layer, dhd at 8k), and strided K/V 1.7x slower
                o = _flex()(q.contiguous()[None], k.contiguous()[None], v.contiguous()[None],
                            block_mask=p.block_mask, scale=self.scale, enable_gqa=g > 1)[0]
            except Exception as e:  # a shape the kernel will not compile for: dense mask this pass
                self.flex_failures += 1
                log.warning("FlexAttention failed (%s); dense mask for this pass", str(e).splitlines()[0][:160])
                self.use_flex = self.flex_failures < 3
                p.block_mask = None
                return self.attend(q, k, v, p)
        else:
            qf = q.reshape(s.num_kv_heads, g * m, s.head_dim)
            if q.is_cuda and m == 1 and p.layout == "mask":
                # the CUDA-graph step: SDPA kernels parallelize over query blocks, which a single
                # token does not have (8 CTAs on 132 SMs). The split-key kernel, or FlexAttention's
                # decoding kernel, splits the keys instead, masking by the position tensor inside
                # the graph; else batched matmuls over the keys
                if self.decode_kernel and decode_attention.available(q):
                    o = decode_attention.attend_one_token(qf, k, v, p.pos, self.scale)
                    return o.reshape(s.num_heads, 1, s.head_dim).transpose(0, 1).reshape(1, -1)
                if self._fusing and self.use_flex and self.flex_decode:
                    k, v = _whole_rows(k), _whole_rows(v)  # strided K/V would be copied each layer
                    if p.block_mask is None:
                        p.block_mask = by_position_block_mask(p.pos, k.shape[1])
                    o = _flex()(q[None], k[None], v[None], block_mask=p.block_mask, scale=self.scale,
                                enable_gqa=g > 1)[0]
                    return o.transpose(0, 1).reshape(1, -1)
                o = self._attend_one(qf, k, v, p.dense_mask(self))
                return o.reshape(s.num_heads, 1, s.head_dim).transpose(0, 1).reshape(1, -1)
            if self.subset_kernel and subset_attention.strides_fit(k, v):
                token_major = subset_attention.TOKEN_MAJOR_OUT
                o = subset_attention.attend_subset(qf, k, v, p.pos, self.scale, p.subset_ends(g), token_major)
                return o if token_major else o.reshape(s.num_heads, m, s.head_dim).transpose(0, 1).reshape(m, -1)
            mask = p.dense_mask(self)
            if q.is_cuda and sdpa_kernel is not None and g * m <= SMALL_QUERY:
                with sdpa_kernel(_NO_CUDNN):
                    o = F.scaled_dot_product_attention(qf[None], k[None], v[None], attn_mask=mask,
                                                       scale=self.scale)[0]
            else:
                o = F.scaled_dot_product_attention(qf[None], k[None], v[None], attn_mask=mask,
                                                   scale=self.scale)[0]
            o = o.reshape(s.num_heads, m, s.head_dim)
        return o.transpose(0, 1).reshape(m, s.num_heads * s.head_dim)

    def _attend_one(self, qf: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    mask: torch.Tensor) -> torch.Tensor:
        attend = fused.compiled("one") if self._fusing else fused.attend_one
        return attend(qf, k, v, mask[0], self.scale)

    def attention_received(self, q: torch.Tensor, k: torch.Tensor, q_positions: torch.Tensor,
                           n_keys: int, chunk: int = 256, row_weight: torch.Tensor | None = None) -> torch.Tensor:
        """Attention each key 0..n_keys-1 receives from the queries q [H, m, d], summed over
        queries (each weighted by ``row_weight`` [m] if given: a graph's padding rows weigh 0) and
        heads (causal by position). Used to score reused tokens (DHD)."""
        s = self.spec
        g = s.num_heads // s.num_kv_heads
        kk = k.transpose(1, 2)
        key_pos = torch.arange(n_keys, device=q.device)
        total = torch.zeros(n_keys, dtype=torch.float32, device=q.device)
        for i in range(0, q.shape[1], chunk):
            qs = q[:, i:i + chunk]
            mc = qs.shape[1]
            scores = torch.matmul(qs.reshape(s.num_kv_heads, g * mc, s.head_dim), kk).float() * self.scale
            allowed = (key_pos[None, :] <= q_positions[i:i + chunk, None]).repeat(g, 1)
            probs = torch.softmax(scores.masked_fill(~allowed[None], float("-inf")), dim=-1)
            if row_weight is not None:  # rows are (group, query): weight by query
                probs = probs.view(s.num_kv_heads, g, mc, n_keys) * row_weight[i:i + chunk, None]
            total += probs.sum(dim=tuple(range(probs.dim() - 1)))
        return self.all_reduce(total)

    def mlp(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        lw = self.layers[layer]
        gate, up = _linear_rows64(self._norm(h, lw.mlp_norm), lw.w_gate_up).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, lw.w_down)

    # ---- one layer over a subset of tokens ------------------------------------------------
    def write_kv(self, layer: int, h: torch.Tensor, p: "Positions", cache: KVCache,
                 k_pre_out: torch.Tensor | None = None) -> torch.Tensor:
        """The first part of ``layer``: K/V of the tokens at ``p`` into the cache; returns their
        rotated queries. DHD's check layer stops here for the tokens it does not recompute."""
        lw, s = self.layers[layer], self.spec
        owns_kv = lw.w_qkv.shape[0] > s.q_size
        if self.qkv_kernel and self._fusing and self.reduce is None and owns_kv:
            slot = self.kv_slot[layer]
            if self._one_token_gemv(h, lw.w_qkv):
                x = gemv.gemv(h, lw.w_qkv, norm_w=lw.attn_norm, eps=s.rms_norm_eps, bias=lw.b_qkv)
            else:
                norm_linear = fused.compiled("norm_linear") if fused.COMPILED_QKV_NORM else fused.norm_linear
                x = norm_linear(h, lw.attn_norm, lw.w_qkv, lw.b_qkv, s.rms_norm_eps)
            return qkv_write.write_qkv(x, p.cos, p.sin, p.pos, cache.k[slot], cache.v[slot], s.num_heads,
                                       s.num_kv_heads, None if k_pre_out is None else k_pre_out[slot])
        if self._fusing and self.reduce is None and k_pre_out is None and owns_kv:
            q, k, v = fused.compiled("pre")(h, lw.attn_norm, lw.w_qkv, lw.b_qkv, p.cos, p.sin, s.rms_norm_eps,
                                            s.num_heads, s.num_kv_heads, s.head_dim)
        else:
            q, k, v = self.qkv(layer, h, p, k_pre_out)
        if k is not None:
            cache.write(self.kv_slot[layer], p.pos, k, v, p.layout)
        return q

    def layer(self, layer: int, h: torch.Tensor, p: "Positions | torch.Tensor", cache: KVCache,
              layout: str | None = None, k_pre_out: torch.Tensor | None = None) -> torch.Tensor:
        """Run ``layer`` for tokens at positions ``p`` (sorted, cache slot = position). Writes their
        K/V into the cache before attention, so the subset sees its own fresh KV, and returns the
        new hidden states."""
        if not isinstance(p, Positions):
            p = self.positions(p, layout or "mask", cache.length)
        q = self.write_kv(layer, h, p, cache, k_pre_out)
        lw, s, slot, n = self.layers[layer], self.spec, self.kv_slot[layer], cache.length
        attn = self.attend(q, cache.k[slot, :, :n], cache.v[slot, :, :n], p)
        if self._one_token_gemv(attn, lw.w_o):
            h = gemv.gemv(attn, lw.w_o, residual=h)
            act = gemv.gemv(h, lw.w_gate_up, norm_w=lw.mlp_norm, eps=s.rms_norm_eps, glu=True)
            return gemv.gemv(act, lw.w_down, residual=h)
        if self._fusing and self.reduce is None:
            return fused.post_attn(h, attn, lw.w_o, lw.mlp_norm, lw.w_gate_up, lw.w_down, s.rms_norm_eps)
        h = h + self.all_reduce(F.linear(attn, lw.w_o))
        return h + self.all_reduce(self.mlp(layer, h))

    def qkv_flop_share(self) -> float:
        """The q/k/v projection's share of a layer's linear-layer FLOPs (0.12 for Llama-3-8B)."""
        s = self.spec
        qkv = s.q_size + 2 * s.kv_size
        return qkv / (qkv + s.q_size + 3 * s.intermediate_size)

    @torch.inference_mode()
    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                layout: str = "mask") -> torch.Tensor:
        """All layers for tokens at positions; returns hidden states after the last layer."""
        h = self.embed(token_ids)
        p = self.positions(positions, layout, cache.length)
        for l in range(self.spec.num_layers):
            h = self.layer(l, h, p, cache)
        return h

    @torch.inference_mode()
    def prefill_logits(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Plain full prefill; logits for every position (used to test against transformers)."""
        n = token_ids.shape[0]
        cache = self.new_cache(n)
        cache.length = n
        h = self.forward(token_ids, torch.arange(n, device=self.device), cache, "causal")
        return self.logits(h)


def _linear_rows64(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear with the rows padded to a multiple of 64 on CUDA. cuBLAS picks a much slower
    kernel for some row counts: the 8B model's gate/up projection took 296 us for 556 rows and
    201 us for 576 on an H100."""
    m = x.shape[0]
    if not x.is_cuda or m < 128 or m % 64 == 0:
        return F.linear(x, w)
    pad = x.new_zeros(64 - m % 64, x.shape[1])
    return F.linear(torch.cat([x, pad]), w)[:m]


def _whole_rows(x: torch.Tensor) -> torch.Tensor:
    """[H, n, d], the first n rows of a contiguous [H, capacity, d] cache slot -> the whole slot
    (contiguous). The block mask hides the rows past the token, so they cost nothing."""
    if x.is_contiguous():
        return x
    cap = x.stride(0) // x.stride(1)
    return x.as_strided((x.shape[0], cap, x.shape[2]), x.stride())


def padded_causal(layout: str, m: int, n: int) -> bool:
    """A tail pass (queries = the last m of n positions) covering at least half the keys runs as
    plain causal flash attention with zero queries in front: the wasted rows cost less than a
    masked kernel (measured 0.94 vs 2.2 ms at 8k on an H100)."""
    return layout == "tail" and 1 < m < n <= 2 * m


def by_position_block_mask(q_pos: torch.Tensor, n_keys: int, block: int = 128):
    """FlexAttention's BlockMask for "key position <= query position", built from the sorted query
    positions in a few tensor ops. ``create_block_mask`` evaluates the mask on every (query, key)
    pair instead: ~4 ms per pass at 8k keys."""
    m, dev = q_pos.shape[0], q_pos.device
    qb, kb = -(-m // block), -(-n_keys // block)
    starts = torch.arange(qb, device=dev) * block
    first = q_pos[starts]  # sorted: the block's smallest position
    # padding rows of a graphed pass sit past the keys: they see every key, no block beyond
    last = torch.clamp(q_pos[torch.clamp(starts + block, max=m) - 1], max=n_keys - 1)
    full = torch.clamp((first + 1) // block, max=n_keys // block)  # kv blocks every query sees whole
    partial = last // block + 1 - full
    cols = torch.arange(kb, device=dev)
    full_idx = cols.expand(qb, kb)
    part_idx = torch.clamp(full[:, None] + cols[None, :], max=kb - 1)

    def by_position(b, h, q_idx, kv_idx):
        return kv_idx <= q_pos[q_idx]
    as4 = lambda t: t[None, None].to(torch.int32).contiguous()  # noqa: E731
    args = (as4(partial), as4(part_idx), as4(full), as4(full_idx))
    try:  # forward passes only: skip the transposed (query-block) index, ~2.5 ms of sorting
        return BlockMask.from_kv_blocks(*args, BLOCK_SIZE=block, mask_mod=by_position,
                                        seq_lengths=(m, n_keys), compute_q_blocks=False)
    except TypeError:  # older torch
        return BlockMask.from_kv_blocks(*args, BLOCK_SIZE=block, mask_mod=by_position, seq_lengths=(m, n_keys))


@dataclass
class Positions:
    """Where a pass's tokens sit, with what every layer of the pass shares: RoPE cos/sin and the
    attention mask (built once per pass, not once per layer)."""

    pos: torch.Tensor
    layout: str  # "causal" | "tail" | "mask"
    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor | None  # [1, 1, g*m, n] bool, in the folded-GQA query order
    block_mask: object | None = None  # FlexAttention's BlockMask (CUDA), instead of ``mask``
    n_keys: int | None = None
    ends: torch.Tensor | None = None  # the split-key kernel's per-row-block key limits

    def subset_ends(self, groups: int) -> torch.Tensor:
        if self.ends is None:
            self.ends = subset_attention.block_ends(self.pos, groups)
        return self.ends

    @classmethod
    def build(cls, runner: "LlamaRunner", pos: torch.Tensor, layout: str, n_keys: int | None,
              bound: int | None = None) -> "Positions":
        """``bound``: every position is below it; by default ``n_keys`` (a token attends to its
        own key), but a graph's padding rows sit past the keys, up to its pool's last slot."""
        if layout not in ("causal", "tail", "mask"):
            raise ValueError(f"unknown layout {layout!r}")
        m = pos.shape[0]
        n = int(n_keys) if n_keys is not None else int(pos[-1]) + 1
        cos, sin = runner.rope.cos_sin(pos, runner.dtype, bound or n)
        if layout == "causal" or (m == 1 and layout == "tail"):
            return cls(pos, layout, cos, sin, None)
        # long masked passes: the split-key kernel where it runs (measured on an H200, dhd r=.05
        # at 98% reuse, 8k: 33.6 ms vs 37.7 with FlexAttention, which copies K/V contiguous)
        if (runner.use_flex and not runner.subset_kernel and m >= FLEX_MIN_QUERIES and n >= FLEX_MIN_KEYS
                and not padded_causal(layout, m, n)):
            return cls(pos, layout, cos, sin, None, by_position_block_mask(pos, n), n_keys=n)
        return cls(pos, layout, cos, sin, None, n_keys=n)

    def dense_mask(self, runner: "LlamaRunner") -> torch.Tensor | None:
        if self.mask is None and self.n_keys is not None:
            g = runner.spec.num_heads // runner.spec.num_kv_heads
            # width padded to 16 and sliced back: the memory-efficient kernel needs an aligned
            # row stride, and without it SDPA falls back to the slow math path
            width = -(-self.n_keys // 16) * 16
            allowed = torch.arange(width, device=self.pos.device)[None, :] <= self.pos[:, None]
            self.mask = allowed.repeat(g, 1)[None, None, :, :self.n_keys]
        return self.mask
