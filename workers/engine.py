"""Prefill with reuse and decode, one sequence at a time.

Every mode runs through the same code, so comparisons are one setting apart:
  full        compute every token                      (the reference)
  prefix      reuse only the exact prefix, compute the rest
  naive       reuse every matched token, compute only new tokens and the suffix
  epic        naive + recompute the first ``epic_tokens`` of every reused run
  cacheblend  layers 0..1 for all tokens; recompute the top r reused tokens by V deviation
  dhd         layers 0..c for all tokens; recompute the top r by attention x V deviation
cacheblend and dhd recompute at least min(``min_recompute``, candidates) reused tokens.
DHD decode (``decode_recompute`` = k > 0) recomputes k more reused tokens at each decode step,
chosen by the new token's attention at the check layer times their prefill deviation.
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from index_service.plan import ReusePlan
from workers.dhd import (epic_positions, recompute_budget, select_cacheblend_tokens, select_dhd_tokens,
                         v_deviation)
from workers.errors import (DonorMissingError, DonorShapeError, EmptyPromptError,
                            FingerprintMismatchError, InvalidParameterError, PromptTooLongError,
                            TokenOutOfVocabError)
from workers.kv_cache import KVCache
from workers.kv_place import place_kv
from workers.model_runner import LlamaRunner
from workers.segments import SegmentKV, SegmentStore

MODES = ("full", "prefix", "naive", "epic", "cacheblend", "dhd")


@dataclass(frozen=True)
class ReuseSettings:
    mode: str = "dhd"
    recompute_ratio: float = 0.15
    check_layer: int = 1
    decode_recompute: int = 3
    epic_tokens: int = 32
    suffix_tokens: int = 1
    # dhd/cacheblend: recompute at least min(this, candidates) reused tokens; 16 measured in
    # benchmarks/reuse_quality.json (a long exact prefix leaves r x few candidates)
    min_recompute: int = 16

    def validate(self, num_layers: int) -> None:
        if self.mode not in MODES:
            raise InvalidParameterError(f"unknown reuse mode {self.mode!r}; one of {', '.join(MODES)}")
        if not 0.0 <= self.recompute_ratio <= 1.0:
            raise InvalidParameterError(f"recompute_ratio must be in [0, 1], got {self.recompute_ratio}")
        if not 0 <= self.check_layer < num_layers - 1:
            raise InvalidParameterError(f"check_layer must be in [0, {num_layers - 2}], got {self.check_layer}")
        if self.decode_recompute < 0 or self.epic_tokens < 0 or self.suffix_tokens < 1:
            raise InvalidParameterError("decode_recompute and epic_tokens must be >= 0, suffix_tokens >= 1")
        if isinstance(self.min_recompute, bool) or not isinstance(self.min_recompute, (int, np.integer)) \
                or self.min_recompute < 0:
            raise InvalidParameterError(f"min_recompute must be an int >= 0, got {self.min_recompute!r}")


@dataclass
class PrefillStats:
    prompt_tokens: int
    reused_tokens: int = 0  # tokens whose KV came from a donor
    recomputed_tokens: int = 0  # of those, recomputed through the upper layers
    computed_tokens: int = 0  # tokens with no donor (always computed)
    flops_fraction: float = 1.0  # linear-layer FLOPs over a full prefill's
    ttft_s: float = 0.0

    @property
    def cached_tokens(self) -> int:
        return self.reused_tokens - self.recomputed_tokens


@dataclass
class Sequence:
    prompt: np.ndarray  # int64 ids (a list of 8k ints costs ~0.2 ms to build and compare)
    prompt_len: int
    cache: KVCache
    settings: ReuseSettings
    stats: PrefillStats
    k_pre: torch.Tensor | None = None  # pre-RoPE keys of the prompt, for the stored segment
    hidden_c: torch.Tensor | None = None  # layer c's input for the prompt, for DHD decode
    hidden_offset: int = 0  # position of hidden_c's first row (the exact prefix is skipped)
    deviation: torch.Tensor | None = None  # per-position V deviation at layer c (0 if fresh)
    stale: torch.Tensor | None = None  # bool per prompt position: reused and not recomputed
    decode_recomputed: int = 0
    exact_len: int = 0  # leading positions whose KV is what full compute gives (pool reuse)
    generated: list[int] = field(default_factory=list)  # tokens fed to decode_step

    @property
    def token_ids(self) -> list[int]:
        return self.prompt.tolist() + self.generated


@dataclass
class GenerationResult:
    token_ids: list[int]
    prompt_tokens: int
    reused_tokens: int
    recomputed_tokens: int
    cached_tokens: int
    ttft_s: float
    decode_s: float
    decode_recomputed: int = 0
    flops_fraction: float = 1.0
    first_logits: torch.Tensor | None = field(default=None, repr=False)
    finish_reason: str = "length"


def _sync(device: torch.device) -> None:
    """Wait for this thread's stream only. A device-wide sync (cudaDeviceSynchronize) from a
    request thread invalidates a CUDA graph being captured in another thread (the batcher's),
    whatever the capture mode: that capture fails, and its batch size runs eager for a while."""
    torch.cuda.current_stream(device).synchronize()


class ReuseEngine:
    def __init__(self, runner: LlamaRunner, store: SegmentStore | None = None,
                 settings: ReuseSettings = ReuseSettings(), max_context: int | None = None,
                 static_tokens: int | None = None) -> None:
        """``static_tokens``: on CUDA, keep one KV pool of that many tokens (at most the context)
        and run one-token passes (prefix-hit suffixes, decode steps) and short passes as replayed
        CUDA graphs over it; a prompt that does not fit runs eager in a cache of its own."""
        settings.validate(runner.spec.num_layers)
        self.runner = runner
        self.store = store
        self.settings = settings
        self.max_context = min(max_context or runner.spec.max_position, runner.spec.max_position)
        self._pool: KVCache | None = None
        self._pool_owner: Sequence | None = None
        self._graph = None
        self._layer_graphs = None
        self._check_graphs = None
        self._k_pre_pool: torch.Tensor | None = None  # pre-RoPE keys of the pooled prompt (static)
        self.pool_reuse = True  # a pooled prompt's exact prefix left in the pool is reused in place
        if static_tokens and runner.device.type == "cuda":
            static_tokens = min(static_tokens, self.max_context)
            from workers.cuda_graph import GraphedLayers, GraphedStep
            from workers.graphed_check import CheckGraphs
            # + the graph's reserved slot, rounded so attention rows stay aligned
            self._pool = runner.new_cache(-(-(static_tokens + 1) // 128) * 128)
            runner.rope.reserve(self._pool.capacity)  # graphs' padding rows sit up to the last slot
            self._graph = GraphedStep(runner, self._pool)
            self._layer_graphs = GraphedLayers(runner, self._pool)
            self._check_graphs = CheckGraphs(runner, self._pool)

    # ---- validation -------------------------------------------------------------------------
    def check_prompt(self, token_ids, max_tokens: int = 0) -> list[int]:
        return self.prompt_array(token_ids, max_tokens).tolist()

    def prompt_array(self, token_ids, max_tokens: int = 0) -> np.ndarray:
        """The prompt as int64 ids, validated (vectorized: an 8k-token list costs ~0.3 ms)."""
        if isinstance(token_ids, (str, bytes)) or not hasattr(token_ids, "__len__"):
            raise InvalidParameterError(f"token_ids must be a sequence of ints, got {type(token_ids).__name__}")
        if isinstance(token_ids, Mapping):  # a tokenizer's BatchEncoding
            raise InvalidParameterError(f"token_ids must be a sequence of ints, got a {type(token_ids).__name__} "
                                        f"with keys {sorted(map(str, token_ids))[:4]}: pass its ['input_ids']")
        if isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.detach().cpu().numpy()
        arr = None
        if isinstance(token_ids, np.ndarray):
            arr = token_ids.copy()  # the sequence keeps it: a caller reusing its buffer must not change it
        elif isinstance(token_ids, (list, tuple)):
            try:  # with the dtype given, numpy skips type inference: 2x faster on long lists
                arr = np.fromiter(token_ids, dtype=np.int64, count=len(token_ids))
            except (TypeError, ValueError, OverflowError):
                arr = None
        if arr is None or arr.ndim != 1 or arr.dtype.kind not in "iu":
            try:  # mixed types: one by one
                arr = np.asarray([int(t) for t in token_ids], dtype=np.int64)
            except (TypeError, ValueError, OverflowError) as e:
                raise InvalidParameterError(f"token_ids must be a sequence of ints: {e}") from None
        arr = arr.astype(np.int64, copy=False)
        if arr.size == 0:
            raise EmptyPromptError("the prompt has no tokens")
        bad = (arr < 0) | (arr >= self.runner.spec.vocab_size)
        if bad.any():
            raise TokenOutOfVocabError(f"token id {arr[bad][0]} outside the vocabulary [0, {self.runner.spec.vocab_size})")
        if max_tokens < 0:
            raise InvalidParameterError(f"max_tokens must be >= 0, got {max_tokens}")
        if arr.size + max_tokens > self.max_context:
            raise PromptTooLongError(f"{arr.size} prompt tokens + {max_tokens} new tokens exceed the "
                                     f"model's context of {self.max_context}")
        return arr

    def _donor(self, donor_id: str) -> SegmentKV:
        seg = self.store.get(donor_id) if self.store is not None else None
        if seg is None:
            raise DonorMissingError(f"donor segment {donor_id!r} is not in the store")
        r, s = self.runner, self.runner.spec
        if seg.fingerprint != r.fingerprint:
            raise FingerprintMismatchError(f"donor {donor_id!r} was computed by model {seg.fingerprint}, "
                                           f"this worker runs {r.fingerprint}")
        want = (len(r.kv_layers), s.num_kv_heads, seg.n_tokens, s.head_dim)
        if tuple(seg.keys.shape) != want or tuple(seg.values.shape) != want or tuple(seg.layers) != r.kv_layers:
            raise DonorShapeError(f"donor {donor_id!r} KV has shape {tuple(seg.keys.shape)} for layers "
                                  f"{tuple(seg.layers)}, expected {want} for layers {r.kv_layers}")
        if seg.keys.dtype != r.dtype or seg.values.dtype != r.dtype:
            raise DonorShapeError(f"donor {donor_id!r} KV is {seg.keys.dtype}, this worker runs {r.dtype}")
        if len(seg.token_ids) != seg.n_tokens:
            raise DonorShapeError(f"donor {donor_id!r} has {len(seg.token_ids)} token ids for {seg.n_tokens} KV rows")
        return seg

    # ---- placing donor KV -------------------------------------------------------------------
    def _place(self, seq: Sequence, plan: ReusePlan, ids: np.ndarray, resident: int = 0) -> np.ndarray:
        """Copy donor KV into the cache at the new positions (keys rotated); returns the reused
        positions. The first ``resident`` positions already hold this prompt's exact KV."""
        if resident and resident >= plan.reused_tokens:  # all of it is in the pool already
            return np.arange(resident)
        donor_idx, donor_pos, donor_ids = plan.donor_arrays()
        r = self.runner
        placed = [np.arange(resident)]
        donor_idx[:resident] = -1
        for slot, did in enumerate(donor_ids):
            seg = self._donor(did)
            new_pos = np.nonzero(donor_idx == slot)[0]
            if new_pos.size == 0:
                continue
            src = donor_pos[new_pos]
            if src.max() >= seg.n_tokens:
                raise DonorShapeError(f"plan reads position {src.max()} of donor {did!r} with {seg.n_tokens} tokens")
            if not np.array_equal(np.asarray(seg.token_ids)[src], ids[new_pos]):
                raise DonorShapeError(f"plan maps tokens of donor {did!r} onto different tokens")
            dst_t = torch.from_numpy(new_pos).to(r.device, non_blocking=True)
            src_t = torch.from_numpy(src).to(seg.keys.device, non_blocking=True)
            cos, sin = r.rope.cos_sin(dst_t, r.dtype, bound=len(ids))
            place_kv(seq.cache.k, seq.cache.v, seg.keys, seg.values, src_t, dst_t, cos, sin, seq.k_pre)
            placed.append(new_pos)
        placed = [p for p in placed if p.size]
        return placed[0] if len(placed) == 1 else np.sort(np.concatenate(placed))

    def _resident(self, ids: np.ndarray, plan: ReusePlan, cache: KVCache, keep_segment: bool) -> int:
        """How many of the plan's exact-prefix tokens the KV pool already holds, exactly, from the
        previous pooled sequence (a chat's next turn): those need no copy. Not when the prompt's
        segment is kept, since its pre-RoPE keys would then be copied anyway."""
        old = self._pool_owner
        if not self.pool_reuse or cache is not self._pool or old is None or keep_segment or old.exact_len == 0:
            return 0
        k = min(old.exact_len, plan.prefix_len, len(ids))
        same = old.prompt[:k] == ids[:k]
        return k if same.all() else int(np.argmin(same))

    # ---- prefill ----------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, token_ids, plan: ReusePlan | None = None, settings: ReuseSettings | None = None,
                max_tokens: int = 0, keep_segment: bool = True, pooled: bool = True) -> tuple[Sequence, torch.Tensor]:
        """Returns the sequence state and the logits of the last prompt token. ``pooled=False``
        keeps the sequence out of the static CUDA-graph pool (a caller whose sequences overlap in
        time: the pool holds one at a time)."""
        st = settings or self.settings
        st.validate(self.runner.spec.num_layers)
        t0 = time.perf_counter()
        arr = self.prompt_array(token_ids, max_tokens)
        r, n = self.runner, len(arr)
        if pooled and self._pool is not None and n + max_tokens < self._pool.capacity:
            cache = self._pool  # the previous pooled sequence is finished by now
        else:
            cache = r.new_cache(n + max_tokens)
        cache.length = n
        seq = Sequence(arr, n, cache, st, PrefillStats(prompt_tokens=n))
        plan = self._effective_plan(plan, st, n)
        resident = self._resident(arr, plan, cache, keep_segment) if plan is not None else 0
        if cache is self._pool:
            self._pool_owner = seq
        if keep_segment and cache is self._pool:
            if self._k_pre_pool is None:
                self._k_pre_pool = torch.zeros_like(cache.k)
            seq.k_pre = self._k_pre_pool[:, :, :n]  # a fixed address the graphs can write to
        elif keep_segment:
            seq.k_pre = torch.zeros_like(cache.k[:, :, :n])
        if plan is None or plan.reused_tokens == 0:
            logits = self._full(seq, arr)
        else:
            reused = self._place(seq, plan, arr, resident)
            if st.mode in ("cacheblend", "dhd"):
                logits = self._checked(seq, arr, reused, st, plan.prefix_len)
            else:
                extra = epic_positions(plan, st.epic_tokens) if st.mode == "epic" else []
                logits = self._subset(seq, arr, reused, extra)
        seq.exact_len = n if plan is None or st.mode == "prefix" else plan.prefix_len
        if r.device.type == "cuda":  # this thread's stream, not the device: see _sync
            _sync(r.device)
        seq.stats.ttft_s = time.perf_counter() - t0
        return seq, logits

    def _effective_plan(self, plan: ReusePlan | None, st: ReuseSettings, n: int) -> ReusePlan | None:
        if plan is None or st.mode == "full":
            return None
        if plan.n_tokens != n:
            raise InvalidParameterError(f"reuse plan is for {plan.n_tokens} tokens, prompt has {n}")
        keep_until = n - st.suffix_tokens  # the last tokens are always computed (their logits)
        limit = plan.prefix_len if st.mode == "prefix" else keep_until
        limit = min(limit, keep_until)
        spans = [replace(s, length=min(s.new_end, limit) - s.new_start) for s in plan.spans if s.new_start < limit]
        if st.mode == "prefix":
            spans = [s for s in spans if s.new_start == s.donor_start]
        return ReusePlan(n, spans, prefix_len=min(plan.prefix_len, limit), source=plan.source)

    def _tokens(self, ids: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(ids)).to(self.runner.device, non_blocking=True)

    def _full(self, seq: Sequence, ids: np.ndarray) -> torch.Tensor:
        r, n = self.runner, len(ids)
        h = r.embed(self._tokens(ids))
        p = r.positions(torch.arange(n, device=r.device), "causal", n)
        for l in range(r.spec.num_layers):
            h = r.layer(l, h, p, seq.cache, k_pre_out=seq.k_pre)
        seq.stats.computed_tokens = n
        return r.logits(h[-1:])[0]

    def _subset(self, seq: Sequence, ids: np.ndarray, reused: np.ndarray, extra: list[int]) -> torch.Tensor:
        """naive / epic / prefix: only non-reused tokens (plus ``extra``) run, from layer 0."""
        r, n = self.runner, len(ids)
        s = seq.stats
        s.reused_tokens = len(reused)
        if not extra and len(reused) == n - 1 and reused[-1] == n - 2:  # a prefix hit: one token
            s.computed_tokens, s.recomputed_tokens, s.flops_fraction = 1, 0, 1 / n
            if self._graphable(seq):
                return self._graph_token(seq, int(ids[-1]), n - 1)
        compute = np.ones(n, dtype=bool)  # on the host: no GPU sync to learn the positions
        compute[reused] = False
        n_new = int(compute.sum())
        if extra:
            compute[np.asarray(extra)] = True
        pos_np = np.nonzero(compute)[0]
        pos = torch.from_numpy(pos_np).to(r.device, non_blocking=True)
        s.computed_tokens, s.recomputed_tokens = n_new, len(pos_np) - n_new
        s.flops_fraction = len(pos_np) / n
        if len(pos_np) == 1 and self._graphable(seq):
            return self._graph_token(seq, int(ids[-1]), n - 1)
        layout = "tail" if int(pos_np[0]) == n - len(pos_np) else "mask"
        h = self._layers(seq, r.embed(self._tokens(ids[pos_np])), pos, 0, n, layout)
        return r.logits(h[-1:])[0]

    def _layers(self, seq: Sequence, h: torch.Tensor, pos: torch.Tensor, first: int, n: int,
                layout: str = "mask") -> torch.Tensor:
        """Layers first..L-1 for the tokens at ``pos``: a replayed graph for a pooled sequence's
        short passes, else layer by layer."""
        r = self.runner
        if self._layer_graphs is not None and seq.cache is self._pool and self._layer_graphs.fits(len(pos), n):
            return self._layer_graphs(first, h, pos, n, self._k_pre_pool if seq.k_pre is not None else None)
        p = r.positions(pos, layout, n)
        for l in range(first, r.spec.num_layers):
            h = r.layer(l, h, p, seq.cache, k_pre_out=seq.k_pre)
        return h

    def _checked(self, seq: Sequence, ids: np.ndarray, reused: np.ndarray, st: ReuseSettings,
                 prefix: int) -> torch.Tensor:
        """cacheblend / dhd: tokens after the exact prefix through layers 0..c, then a subset.

        The exact prefix (same tokens, same positions, same history) is already exact KV: it is
        neither run through layers 0..c nor a candidate for recomputation."""
        r, n = self.runner, len(ids)
        c = 1 if st.mode == "cacheblend" else st.check_layer
        slot_c = r.kv_slot[c]
        must_np = np.ones(n, dtype=bool)
        must_np[reused] = False
        if self._check_graphs is not None and seq.cache is self._pool and self._check_graphs.fits(n, prefix):
            return self._checked_graphed(seq, ids, reused, must_np, st, prefix, c)
        cand = torch.from_numpy(reused[reused >= prefix]).to(r.device, non_blocking=True)
        must_pos = torch.from_numpy(np.nonzero(must_np)[0]).to(r.device, non_blocking=True)
        v_reused = seq.cache.v[slot_c][:, cand].clone()
        p_all = r.positions(torch.arange(prefix, n, device=r.device), "causal" if prefix == 0 else "tail", n)
        h = r.embed(self._tokens(ids[prefix:]))
        for l in range(c):
            h = r.layer(l, h, p_all, seq.cache, k_pre_out=seq.k_pre)
        # layer c's K/V for every token (deviation, attention received); the rest of layer c runs
        # only for the tokens recomputed above it: the others' hidden states are never read
        q = r.write_kv(c, h, p_all, seq.cache, k_pre_out=seq.k_pre)
        dev = r.all_reduce(v_deviation(seq.cache.v[slot_c][:, cand], v_reused))  # all KV heads under TP
        if st.mode == "dhd":
            attn = r.attention_received(q[:, must_pos - prefix], seq.cache.k[slot_c, :, :n], must_pos, n)
            chosen = select_dhd_tokens(attn[cand], dev, st.recompute_ratio, st.min_recompute)
        else:
            chosen = select_cacheblend_tokens(dev, st.recompute_ratio, st.min_recompute)
        sel = torch.cat([must_pos, cand[chosen]]).sort().values  # sizes known: no GPU sync
        if st.decode_recompute > 0 and st.mode == "dhd":
            dev_rows = torch.zeros(n - prefix, dtype=torch.float32, device=r.device)
            dev_rows[cand - prefix] = dev
            stale_rows = torch.zeros(n - prefix, dtype=torch.bool, device=r.device)
            stale_rows[cand - prefix] = True
            stale_rows[sel - prefix] = False
            self._keep_for_decode(seq, h, prefix, dev_rows, stale_rows)
        hs = self._layers(seq, h[sel - prefix], sel, c, n)
        self._checked_stats(seq, reused, must_np, len(chosen), prefix, c)
        return r.logits(hs[-1:])[0]

    def _checked_graphed(self, seq: Sequence, ids: np.ndarray, reused: np.ndarray, must_np: np.ndarray,
                         st: ReuseSettings, prefix: int, c: int) -> torch.Tensor:
        """``_checked`` with layers 0..c and the scoring replayed as one graph (short prompts)."""
        from workers.graphed_check import CANDIDATE, MUST
        kinds = np.where(must_np[prefix:], MUST, CANDIDATE)
        k = recompute_budget(int((kinds == CANDIDATE).sum()), st.recompute_ratio, st.min_recompute)
        out = self._check_graphs(st.mode, c, ids[prefix:], prefix, len(ids), kinds, k,
                                 self._k_pre_pool if seq.k_pre is not None else None)
        if st.decode_recompute > 0 and st.mode == "dhd":  # the graph's buffers are reused: copies
            self._keep_for_decode(seq, out.hidden.clone(), prefix, out.deviation.clone(), out.stale.clone())
        hs = self._layers(seq, out.hidden[out.rows], out.rows + prefix, c, len(ids))
        self._checked_stats(seq, reused, must_np, k, prefix, c)
        return self.runner.logits(hs[-1:])[0]

    def _checked_stats(self, seq: Sequence, reused: np.ndarray, must_np: np.ndarray, recomputed: int,
                       prefix: int, c: int) -> None:
        r, n, s = self.runner, len(must_np), seq.stats
        L = r.spec.num_layers
        s.reused_tokens, s.computed_tokens = len(reused), int(must_np.sum())
        s.recomputed_tokens = recomputed
        upper = s.computed_tokens + recomputed
        s.flops_fraction = ((c + r.qkv_flop_share()) * (n - prefix) + (L - c) * upper) / (L * n)

    def _keep_for_decode(self, seq: Sequence, h_c: torch.Tensor, offset: int, dev_rows: torch.Tensor,
                         stale_rows: torch.Tensor) -> None:
        """What DHD decode needs: layer c's input and, per prompt position, the V deviation and
        whether the KV is reused and not recomputed (``*_rows``: positions offset.. of the prompt)."""
        n = seq.prompt_len
        seq.hidden_c, seq.hidden_offset = h_c, offset
        seq.deviation = torch.zeros(n, dtype=torch.float32, device=h_c.device)
        seq.deviation[offset:] = dev_rows
        seq.stale = torch.zeros(n, dtype=torch.bool, device=h_c.device)
        seq.stale[offset:] = stale_rows

    # ---- decode -----------------------------------------------------------------------------
    @torch.inference_mode()
    def decode_step(self, seq: Sequence, token: int) -> torch.Tensor:
        """Append ``token`` at the next position; returns the logits for the one after it."""
        r = self.runner
        t = seq.cache.length
        if seq.cache is self._pool and t + 1 >= self._pool.capacity:
            raise InvalidParameterError(f"sequence reached the KV pool's {self._pool.capacity - 1} tokens")
        if t >= seq.cache.capacity:
            seq.cache.grow(t + 64)
        seq.cache.length = t + 1
        seq.generated.append(token)
        k = seq.settings.decode_recompute
        recompute = k > 0 and seq.stale is not None and bool(seq.stale.any())
        if not recompute and self._graphable(seq):  # the graph embeds and positions by itself
            return self._graph_token(seq, token, t)
        pos = torch.tensor([t], device=r.device)
        h = r.embed(torch.tensor([token], device=r.device))
        if recompute:
            return self._decode_with_recompute(seq, h, pos, k)
        p = r.positions(pos, "tail", t + 1)
        for l in range(r.spec.num_layers):
            h = r.layer(l, h, p, seq.cache)
        return r.logits(h)[0]

    def _graphable(self, seq: Sequence) -> bool:
        if self._graph is None or seq.cache is not self._pool:
            return False
        if self._pool_owner is not seq:
            raise InvalidParameterError("this sequence's KV pool was taken by a newer request")
        return seq.cache.length < self._pool.capacity

    def _graph_token(self, seq: Sequence, token, position: int) -> torch.Tensor:
        logits = self._graph(token, position)
        if seq.k_pre is not None and position < seq.prompt_len:  # the stored segment wants pre-RoPE keys
            pos = torch.tensor([position], device=self.runner.device)
            k = seq.cache.k[:, :, position:position + 1]
            seq.k_pre[:, :, position:position + 1] = self.runner.rotate(k, -pos)
        return logits

    def _decode_with_recompute(self, seq: Sequence, h: torch.Tensor, pos: torch.Tensor, k: int) -> torch.Tensor:
        r, st = self.runner, seq.settings
        c, n = st.check_layer, seq.cache.length
        p = r.positions(pos, "tail", n)
        for l in range(c):
            h = r.layer(l, h, p, seq.cache)
        q = r.write_kv(c, h, p, seq.cache)
        attn = r.attention_received(q, seq.cache.k[r.kv_slot[c], :, :n], pos, n)[:seq.prompt_len]
        score = torch.where(seq.stale, attn * seq.deviation, torch.full_like(attn, -1.0))
        chosen = torch.topk(score, min(k, int(seq.stale.sum()))).indices.sort().values
        seq.stale[chosen] = False
        seq.decode_recomputed += len(chosen)
        sel = torch.cat([chosen, pos])
        hs = torch.cat([seq.hidden_c[chosen - seq.hidden_offset], h])
        p_sel = r.positions(sel, "mask", n)
        for l in range(c, r.spec.num_layers):
            hs = r.layer(l, hs, p_sel, seq.cache)
        return r.logits(hs[-1:])[0]

    # ---- whole requests ---------------------------------------------------------------------
    def generate(self, token_ids, plan: ReusePlan | None = None, max_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 stop_ids: tuple[int, ...] | None = None, settings: ReuseSettings | None = None,
                 keep_segment: bool = False) -> tuple[GenerationResult, Sequence]:
        if temperature < 0 or not 0 < top_p <= 1:
            raise InvalidParameterError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature}, {top_p}")
        seq, logits = self.prefill(token_ids, plan, settings, max_tokens, keep_segment)
        stop = set(self.runner.spec.eos_token_ids if stop_ids is None else stop_ids)
        gen = torch.Generator(device="cpu").manual_seed(seed if seed is not None else 0)
        first_logits, out, reason = logits.float().cpu(), [], "length"
        t0 = time.perf_counter()
        for i in range(max_tokens):
            nxt = sample(logits, temperature, top_p, gen)
            out.append(nxt)
            if nxt in stop:
                reason = "stop"
                break
            if i + 1 < max_tokens:
                logits = self.decode_step(seq, nxt)
        if self.runner.device.type == "cuda":
            _sync(self.runner.device)
        s = seq.stats
        res = GenerationResult(out, s.prompt_tokens, s.reused_tokens, s.recomputed_tokens, s.cached_tokens,
                               s.ttft_s, time.perf_counter() - t0, seq.decode_recomputed,
                               s.flops_fraction, first_logits, reason)
        return res, seq

    def segment_of(self, seq: Sequence, segment_id: str, tenant: str = "default",
                   scope: str = "private", device: str | torch.device | None = None) -> SegmentKV:
        """The prompt's KV as a storable segment (keys before RoPE)."""
        if seq.k_pre is None:
            raise InvalidParameterError("prefill ran with keep_segment=False; no segment to store")
        if seq.cache is self._pool and self._pool_owner is not seq:
            raise InvalidParameterError("this sequence's KV pool was taken by a newer request; store its segment first")
        n = seq.prompt_len
        dev = device or self.runner.device
        return SegmentKV(segment_id, self.runner.fingerprint, seq.prompt[:n].astype(np.int32),
                         seq.k_pre[:, :, :n].to(dev).clone(), seq.cache.v[:, :, :n].to(dev).clone(),
                         self.runner.kv_layers, tenant, scope)


def sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    if temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    if top_p < 1.0:
        sp, si = torch.sort(probs, descending=True)
        keep = torch.cumsum(sp, 0) - sp < top_p
        probs = torch.zeros_like(probs).scatter(0, si[keep], sp[keep])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))
