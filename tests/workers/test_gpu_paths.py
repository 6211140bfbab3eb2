"""CUDA-only paths (FlexAttention, the CUDA-graph step, fused RoPE) agree with the eager ones.
Skipped without a GPU; run on a GPU machine with `pytest tests/workers/test_gpu_paths.py`."""
import pytest
import torch

from index_service.plan import ReusePlan, ReuseSpan
from workers.engine import ReuseEngine, ReuseSettings
from workers.model_loader import random_runner
from workers.model_spec import ModelSpec
from workers.segments import InMemorySegmentStore

from tests.workers.pooled_checks import assert_same_segment_and_decode

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SPEC = ModelSpec(vocab_size=1000, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=2,
                 head_dim=32, intermediate_size=512, max_position=4096)


def _runner(flex: bool, subset: bool = False):
    """Masked passes through FlexAttention (flex), the split-key kernel (subset) or SDPA with a
    dense mask (neither): the tests compare these paths with each other."""
    r = random_runner(SPEC, "cuda", torch.float32, seed=3, std=0.1)
    r.use_flex, r.subset_kernel = flex, subset
    return r


def test_subset_kernel_matches_dense_mask_in_the_runner():
    """A masked pass of 150 tokens at scattered positions through the split-key kernel gives the
    dense-mask SDPA logits."""
    ids = torch.randint(0, SPEC.vocab_size, (700,), device="cuda")
    sel = torch.tensor(sorted(set(torch.randint(0, 700, (150,)).tolist()) | {699}), device="cuda")
    outs = []
    for subset in (False, True):
        r = _runner(False, subset)
        cache = r.new_cache(900)
        cache.length = 700
        r.forward(ids, torch.arange(700, device="cuda"), cache, "causal")
        outs.append(r.logits(r.forward(ids[sel], sel, cache, "mask")))
    assert torch.allclose(outs[0], outs[1], atol=2e-3)


def test_flex_matches_dense_mask(monkeypatch):
    from workers import model_runner
    monkeypatch.setattr(model_runner, "FLEX_MIN_QUERIES", 16)  # this small a pass uses flex too
    monkeypatch.setattr(model_runner, "FLEX_MIN_KEYS", 16)
    ids = torch.randint(0, SPEC.vocab_size, (700,), device="cuda")
    sel = torch.tensor(sorted(set(torch.randint(0, 700, (150,)).tolist()) | {699}), device="cuda")
    outs = []
    for flex in (False, True):
        r = _runner(flex)
        cache = r.new_cache(700)
        cache.length = 700
        r.forward(ids, torch.arange(700, device="cuda"), cache, "causal")
        outs.append(r.logits(r.forward(ids[sel], sel, cache, "mask")))
        assert r.flex_failures == 0
    assert torch.allclose(outs[0], outs[1], atol=2e-3)


def test_flex_over_a_larger_slot_ignores_rows_past_the_keys(monkeypatch):
    """FlexAttention reads the whole cache slot (contiguous); rows past the pass's keys hold
    stale KV of an earlier, longer sequence and must not change the result."""
    from workers import model_runner
    monkeypatch.setattr(model_runner, "FLEX_MIN_QUERIES", 16)
    monkeypatch.setattr(model_runner, "FLEX_MIN_KEYS", 16)
    ids = torch.randint(0, SPEC.vocab_size, (700,), device="cuda")
    sel = torch.tensor(sorted(set(torch.randint(0, 700, (150,)).tolist()) | {699}), device="cuda")
    outs = []
    for flex, cap in ((False, 700), (True, 1000)):
        r = _runner(flex)
        cache = r.new_cache(cap)
        cache.k[:, :, 700:] = 50 * torch.randn_like(cache.k[:, :, 700:])
        cache.v[:, :, 700:] = 50 * torch.randn_like(cache.v[:, :, 700:])
        cache.length = 700
        r.forward(ids, torch.arange(700, device="cuda"), cache, "causal")
        outs.append(r.logits(r.forward(ids[sel], sel, cache, "mask")))
        assert r.flex_failures == 0
    assert torch.allclose(outs[0], outs[1], atol=2e-3)


def test_graph_step_matches_eager_decode():
    r = _runner(True)
    store = InMemorySegmentStore()
    ids = torch.randint(0, SPEC.vocab_size, (300,)).tolist()
    eager, graphed = ReuseEngine(r, store), ReuseEngine(r, store, static_tokens=1024)
    a, _ = eager.generate(ids, None, 12, settings=ReuseSettings(mode="full"), keep_segment=True)
    b, seq = graphed.generate(ids, None, 12, settings=ReuseSettings(mode="full"), keep_segment=True)
    assert a.token_ids == b.token_ids
    store.put(graphed.segment_of(seq, "d"))
    plan = ReusePlan(300, [ReuseSpan(0, "d", 0, 300)], prefix_len=300)
    c, _ = graphed.generate(ids, plan, 12, settings=ReuseSettings(mode="prefix"))
    assert c.token_ids == a.token_ids and c.cached_tokens == 299
    assert torch.allclose(c.first_logits, a.first_logits, atol=1e-3)


def test_place_kv_kernel_matches_torch_ops():
    from workers import kv_place
    from workers.rope import apply_rope
    if kv_place.triton is None:
        pytest.skip("needs triton")
    r = _runner(True)
    L, H, d = 4, 2, 32
    src_k, src_v = torch.randn(2, L, H, 600, d, device="cuda").unbind(0)
    src_idx = torch.randperm(600, device="cuda")[:333]
    dst_idx = torch.randperm(700, device="cuda")[:333]
    cos, sin = r.rope.cos_sin(dst_idx, torch.float32)
    ck, cv, kp = (torch.zeros(L, H, 768, d, device="cuda") for _ in range(3))
    kv_place.place_kv(ck, cv, src_k, src_v, src_idx, dst_idx, cos, sin, kp)
    assert torch.allclose(ck[:, :, dst_idx], apply_rope(src_k[:, :, src_idx], cos, sin), atol=1e-5)
    assert torch.equal(cv[:, :, dst_idx], src_v[:, :, src_idx])
    assert torch.equal(kp[:, :, dst_idx], src_k[:, :, src_idx])
    untouched = torch.ones(768, dtype=torch.bool, device="cuda")
    untouched[dst_idx] = False
    assert not ck[:, :, untouched].any() and not cv[:, :, untouched].any()


def test_padded_causal_tail_matches_dense_mask():
    r = _runner(False)
    n, m = 900, 600
    q = torch.randn(SPEC.num_heads, m, SPEC.head_dim, device="cuda")
    k, v = torch.randn(2, SPEC.num_kv_heads, n, SPEC.head_dim, device="cuda").unbind(0)
    pos = torch.arange(n - m, n, device="cuda")
    tail = r.attend(q, k, v, r.positions(pos, "tail", n))
    p = r.positions(pos, "mask", n)
    dense = r.attend(q, k, v, p)
    assert torch.allclose(tail, dense, atol=1e-4)


def test_bucketed_graph_steps_across_buckets():
    """Decoding across a key-length bucket boundary keeps matching the eager engine."""
    from workers import cuda_graph
    r = _runner(True)
    store = InMemorySegmentStore()
    ids = torch.randint(0, SPEC.vocab_size, (cuda_graph.BUCKET - 6,)).tolist()
    eager, graphed = ReuseEngine(r, store), ReuseEngine(r, store, static_tokens=2 * cuda_graph.BUCKET)
    a, _ = eager.generate(ids, None, 12, settings=ReuseSettings(mode="full"))
    b, _ = graphed.generate(ids, None, 12, settings=ReuseSettings(mode="full"))
    assert a.token_ids == b.token_ids
    assert len(graphed._graph.graphs) == 2


def test_exact_prefix_left_in_the_pool_is_reused_in_place():
    """A prompt extending the previous pooled one (a chat's next turn) takes its exact prefix from
    the pool without copying, with the same logits as copying it from the donor."""
    r = _runner(True)
    store = InMemorySegmentStore()
    ids = torch.randint(0, SPEC.vocab_size, (400,)).tolist()
    eng = ReuseEngine(r, store, static_tokens=1024)
    seq, _ = eng.prefill(ids, None, ReuseSettings(mode="full"), keep_segment=True)
    store.put(eng.segment_of(seq, "d"))
    longer = ids + torch.randint(0, SPEC.vocab_size, (50,)).tolist()
    plan = ReusePlan(450, [ReuseSpan(0, "d", 0, 400)], prefix_len=400)
    st = ReuseSettings(mode="prefix")
    calls = []
    orig = eng._place
    eng._place = lambda *a, **k: calls.append(k.get("resident", a[3] if len(a) > 3 else 0)) or orig(*a, **k)
    _, in_place = eng.prefill(longer, plan, st, keep_segment=False)
    eng.pool_reuse = False
    _, copied = eng.prefill(longer, plan, st, keep_segment=False)
    full = ReuseEngine(r, store).prefill(longer, None, ReuseSettings(mode="full"), keep_segment=False)[1]
    assert calls == [400, 0]
    assert torch.allclose(in_place, copied, atol=1e-4) and torch.allclose(in_place, full, atol=1e-3)


def test_padded_rows_linear_matches():
    from workers.model_runner import _linear_rows64
    x, w = torch.randn(556, 64, device="cuda"), torch.randn(96, 64, device="cuda")
    assert torch.allclose(_linear_rows64(x, w), torch.nn.functional.linear(x, w), atol=1e-4)


@pytest.mark.parametrize("addmm,silu", [(False, False), (True, False), (False, True), (True, True)])
def test_fused_layers_match_unfused(addmm, silu, monkeypatch):
    """The compiled pointwise fusion gives the eager layer's results (full, subset and one-token
    passes) and the same greedy tokens through the graphed engine; also with the last residual
    add inside the down projection, and SiLU x up by workers/swiglu.py's kernel."""
    from workers import fused
    monkeypatch.setattr(fused, "ADDMM_RESIDUAL", addmm)
    monkeypatch.setattr(fused, "SILU_KERNEL", silu)
    r = _runner(True)
    assert r.fuse
    r.gemv_kernel = False  # one-token steps through the fused ops, not the GEMV kernel
    ids = torch.randint(0, SPEC.vocab_size, (300,)).tolist()
    outs = {}
    for fuse in (False, True):
        r.fuse = fuse  # fusion applies inside graph captures
        eng = ReuseEngine(r, InMemorySegmentStore(), static_tokens=1024)
        res, _ = eng.generate(ids, None, 8, settings=ReuseSettings(mode="full"))
        outs[fuse] = res
    assert outs[True].token_ids == outs[False].token_ids
    assert torch.allclose(outs[True].first_logits, outs[False].first_logits, atol=1e-3)


def _eager_and_pooled(r, changed):
    """An eager engine and a pooled (graphed) one over ``r``, sharing a store that holds donor
    "d" (500 random tokens); returns them and the donor's tokens with ``changed`` positions
    replaced."""
    store = InMemorySegmentStore()
    ids = torch.randint(0, SPEC.vocab_size, (500,)).tolist()
    eager, pooled = ReuseEngine(r, store), ReuseEngine(r, store, static_tokens=1024)
    seq, _ = eager.prefill(ids, None, ReuseSettings(mode="full"), keep_segment=True)
    store.put(eager.segment_of(seq, "d"))
    new = list(ids)
    for i in changed:
        new[i] = (new[i] + 1) % SPEC.vocab_size
    return eager, pooled, new


@pytest.mark.parametrize("path", ["subset", "dense"])
def test_graphed_upper_pass_matches_eager(path):
    """dhd's upper pass and a short subset pass, replayed as graphs over the pool, give the eager
    engine's logits, stats and stored segment (pre-RoPE keys written through the graph), with
    the graphs attending through the split-key kernel or a dense mask."""
    eager, pooled, new = _eager_and_pooled(_runner(True, subset=path == "subset"), range(100, 130))
    plan = ReusePlan(500, [ReuseSpan(0, "d", 0, 100), ReuseSpan(130, "d", 130, 370)], prefix_len=100)
    for st in (ReuseSettings(mode="dhd", recompute_ratio=0.2, decode_recompute=0), ReuseSettings(mode="naive")):
        a, la = eager.prefill(new, plan, st, keep_segment=True)
        b, lb = pooled.prefill(new, plan, st, keep_segment=True)
        assert (a.stats.recomputed_tokens, a.stats.computed_tokens) == (b.stats.recomputed_tokens, b.stats.computed_tokens)
        assert torch.allclose(la, lb, atol=2e-3), (st.mode, (la - lb).abs().max())
        sa, sb = eager.segment_of(a, "x"), pooled.segment_of(b, "y")
        assert torch.allclose(sa.keys, sb.keys, atol=2e-3) and torch.allclose(sa.values, sb.values, atol=2e-3)
    assert len(pooled._layer_graphs.graphs) == 2


def test_graph_step_flex_decoder_matches_matmul_attention():
    r = _runner(True)
    ids = torch.randint(0, SPEC.vocab_size, (700,)).tolist()
    outs = {}
    r.decode_kernel = False
    for flex in (False, True):
        r.flex_decode = flex
        eng = ReuseEngine(r, InMemorySegmentStore(), static_tokens=2048)
        res, _ = eng.generate(ids, None, 10, settings=ReuseSettings(mode="full"))
        outs[flex] = res.token_ids
    assert r.flex_decode, "the FlexAttention decoder fell back to matmuls"
    r.flex_decode = False
    assert outs[True] == outs[False]


@pytest.mark.parametrize("n_keys,pos", [(1024, 0), (3072, 2500), (8192, 8191), (8192, 700), (1000, 999)])
def test_split_key_decode_kernel_matches_matmuls(n_keys, pos):
    from workers import decode_attention, fused
    g = torch.Generator(device="cuda").manual_seed(n_keys + pos)
    kv_heads, group, d, cap = 8, 4, 128, 9000
    qf = torch.randn(kv_heads, group, d, device="cuda", generator=g).bfloat16()
    k_pool = torch.randn(kv_heads, cap, d, device="cuda", generator=g).bfloat16()
    v_pool = torch.randn(kv_heads, cap, d, device="cuda", generator=g).bfloat16()
    k, v = k_pool[:, :n_keys], v_pool[:, :n_keys]  # strided cache slices, as in the graph step
    pos_t = torch.tensor([pos], device="cuda")
    allowed = (torch.arange(n_keys, device="cuda") <= pos_t)[None, :].expand(group, n_keys)
    want = fused.attend_one(qf.float(), k.float(), v.float(), allowed, d ** -0.5)
    got = decode_attention.attend_one_token(qf, k, v, pos_t, d ** -0.5)
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    assert torch.allclose(got.float(), want, atol=2e-2, rtol=2e-2), (got.float() - want).abs().max()


def test_graph_step_split_key_kernel_matches_matmul_attention():
    r = _runner(True)
    ids = torch.randint(0, SPEC.vocab_size, (1500,)).tolist()
    outs = {}
    for kernel in (False, True):
        r.decode_kernel = kernel
        eng = ReuseEngine(r, InMemorySegmentStore(), static_tokens=2048)
        res, _ = eng.generate(ids, None, 10, settings=ReuseSettings(mode="full"))
        outs[kernel] = (res.token_ids, res.first_logits)
    assert outs[True][0] == outs[False][0]
    assert torch.allclose(outs[True][1], outs[False][1], atol=1e-3)


# (rows per block, one-slice keys, merge as a block of rows, fewest keys per slice)
@pytest.mark.parametrize("tiling", [(64, 0, False, 512), (32, 1024, False, 512), (16, 1024, False, 512),
                                    (64, 0, True, 512), (64, 0, True, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# (8, 4, 80, 8192): 13 key slices (16 in the merge), as an 8k upper pass of 80 rows has
@pytest.mark.parametrize("kv_heads,g,m,n", [(8, 4, 278, 4096), (2, 4, 37, 700), (1, 1, 5, 130), (2, 2, 300, 2048),
                                            (8, 4, 80, 8192)])
def test_subset_kernel_matches_dense_softmax(dtype, kv_heads, g, m, n, tiling, monkeypatch):
    """The split-key kernel for a pass of m tokens at sorted positions over n cached keys (strided
    slices of a larger slot, as the layers see them) matches a dense masked softmax; the last
    row sits past the keys (a graph's padding row) and sees all of them. Also with smaller row
    blocks and one key slice (no merge) up to 1k keys, and with the block merge (flash_tile.
    merge_rows) over slices of 512 or 256 keys."""
    from workers import subset_attention as sa
    monkeypatch.setattr(sa, "BLOCK_M", tiling[0])
    monkeypatch.setattr(sa, "ONE_SPLIT_KEYS", tiling[1])
    monkeypatch.setattr(sa, "ONE_SPLIT_PROGRAMS", 0 if tiling[1] else sa.ONE_SPLIT_PROGRAMS)
    monkeypatch.setattr(sa, "MERGE_BLOCK", tiling[2])
    monkeypatch.setattr(sa, "MIN_KEYS_PER_SPLIT", tiling[3])
    torch.manual_seed(0)
    d, cap = 64, n + 100
    pos = torch.sort(torch.randperm(n)[:m]).values.cuda()
    pos[-1] = cap - 1
    kc = torch.randn(kv_heads, cap, d, device="cuda", dtype=dtype)
    vc = torch.randn(kv_heads, cap, d, device="cuda", dtype=dtype)
    k, v = kc[:, :n], vc[:, :n]
    qf = torch.randn(kv_heads, g * m, d, device="cuda", dtype=dtype)
    out = sa.attend_subset(qf, k, v, pos, d ** -0.5)
    allowed = torch.arange(n, device="cuda")[None, :] <= pos.repeat(g)[:, None]
    sc = (qf.float() @ k.float().transpose(1, 2)) * d ** -0.5
    want = torch.softmax(sc.masked_fill(~allowed[None], float("-inf")), -1) @ v.float()
    tol = 2e-4 if dtype == torch.float32 else 3e-2
    assert (out.float() - want).abs().max() < tol
    # token-major output ([m, H*d], what the o projection reads) holds the same values
    tm = sa.attend_subset(qf, k, v, pos, d ** -0.5, token_major=True)
    assert torch.equal(tm, out.reshape(kv_heads * g, m, d).transpose(0, 1).reshape(m, -1))


@pytest.mark.parametrize("mode", ["dhd", "cacheblend"])
def test_graphed_check_matches_eager(mode):
    """dhd/cacheblend with layers 0..c and the scoring replayed as one graph over the pool
    (workers/graphed_check.py) choose the eager engine's tokens and give its logits, stored
    segment and DHD decode steps; with and without an exact prefix, one graph per shape bucket."""
    eager, pooled, new = _eager_and_pooled(_runner(False, subset=True), list(range(100, 130)) + list(range(300, 306)))
    spans = [ReuseSpan(0, "d", 0, 100), ReuseSpan(130, "d", 130, 170), ReuseSpan(306, "d", 306, 194)]
    st = ReuseSettings(mode=mode, recompute_ratio=0.2, decode_recompute=2)
    for prefix, keep in ((100, True), (0, False)):
        plan = ReusePlan(500, spans, prefix_len=prefix)
        a, la = eager.prefill(new, plan, st, max_tokens=4, keep_segment=keep)
        b, lb = pooled.prefill(new, plan, st, max_tokens=4, keep_segment=keep)
        assert (a.stats.reused_tokens, a.stats.recomputed_tokens, a.stats.computed_tokens) == \
            (b.stats.reused_tokens, b.stats.recomputed_tokens, b.stats.computed_tokens)
        assert a.stats.flops_fraction == pytest.approx(b.stats.flops_fraction)
        assert torch.allclose(la, lb, atol=2e-3), (prefix, (la - lb).abs().max())
        if mode == "dhd":  # the same tokens left stale, the same deviations and layer-c input
            assert torch.equal(a.stale, b.stale)
            assert torch.allclose(a.deviation, b.deviation, rtol=1e-3, atol=1e-3)
            assert torch.allclose(a.hidden_c, b.hidden_c, atol=2e-3)
        assert_same_segment_and_decode(eager, pooled, a, b, la, keep, atol=2e-3)
        if mode == "dhd":
            assert a.decode_recomputed == b.decode_recomputed == 6
    assert len(pooled._check_graphs.graphs) == 2  # one per shape bucket: the two runs differ in k_pre


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qkv_kernel_matches_torch_ops(dtype):
    """RoPE + K/V write + pre-RoPE keys in one kernel (workers/qkv_write.py) give the torch ops'
    q, cache rows and segment keys, and touch no other slot or layer."""
    from dataclasses import replace

    from workers import qkv_write
    from workers.rope import Rope, apply_rope
    H, Hkv, d, m, cap = 32, 8, 128, 70, 300  # an 8B model's heads
    x = torch.randn(m, (H + 2 * Hkv) * d, device="cuda").to(dtype)
    pos = torch.sort(torch.randperm(cap - 1, device="cuda")[:m]).values
    rope = Rope(replace(SPEC, num_heads=H, num_kv_heads=Hkv, head_dim=d), torch.device("cuda"))
    cos, sin = rope.compute(pos, dtype)
    ck = torch.zeros(3, Hkv, cap, d, dtype=dtype, device="cuda")
    cv, kp = torch.zeros_like(ck), torch.zeros_like(ck)
    q = qkv_write.write_qkv(x, cos, sin, pos, ck[1], cv[1], H, Hkv, kp[1])
    qk = x[:, :(H + Hkv) * d].view(m, H + Hkv, d).transpose(0, 1)
    rot = apply_rope(qk.float(), cos.float(), sin.float()).to(dtype).float()
    assert q.shape == (H, m, d) and q.is_contiguous()
    assert torch.allclose(q.float(), rot[:H], rtol=2 ** -7, atol=1e-3)
    assert torch.allclose(ck[1][:, pos].float(), rot[H:], rtol=2 ** -7, atol=1e-3)
    assert torch.equal(cv[1][:, pos], x[:, (H + Hkv) * d:].view(m, Hkv, d).transpose(0, 1))
    assert torch.equal(kp[1][:, pos], qk[H:])
    others = torch.ones(cap, dtype=torch.bool, device="cuda")
    others[pos] = False
    assert ck[[0, 2]].abs().sum() == 0 and ck[1][:, others].abs().sum() == 0 and cv[1][:, others].abs().sum() == 0


@pytest.mark.parametrize("options", [(), ("fused.COMPILED_QKV_NORM", "fused.SILU_KERNEL",
                                          "subset_attention.TOKEN_MAJOR_OUT")])
def test_graphs_with_the_qkv_kernel_match_eager(options, monkeypatch):
    """With the q/k/v kernel inside the graphs (graphed check, upper pass with pre-RoPE keys kept,
    one-token decode steps), the pooled engine gives the eager engine's results; also with the
    attention norm compiled, the SiLU kernel and the attention written token-major."""
    from benchmarks.variants import module_setting
    for key in options:
        monkeypatch.setattr(*module_setting(key), True)
    r = _runner(False, subset=True)
    r.qkv_kernel = True
    eager, pooled, new = _eager_and_pooled(r, range(100, 130))
    plan = ReusePlan(500, [ReuseSpan(0, "d", 0, 100), ReuseSpan(130, "d", 130, 370)], prefix_len=100)
    st = ReuseSettings(mode="dhd", recompute_ratio=0.2, decode_recompute=0)
    a, la = eager.prefill(new, plan, st, max_tokens=4, keep_segment=True)
    b, lb = pooled.prefill(new, plan, st, max_tokens=4, keep_segment=True)
    assert a.stats.recomputed_tokens == b.stats.recomputed_tokens
    assert torch.allclose(la, lb, atol=2e-3)
    assert_same_segment_and_decode(eager, pooled, a, b, la, True, atol=2e-3)
    assert pooled._check_graphs.graphs and pooled._layer_graphs.graphs and pooled._graph.graphs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,inter", [(1, 64), (70, 14336), (3, 1500), (0, 128)])
def test_silu_mul_kernel_matches_torch(dtype, m, inter):
    """workers/swiglu.py: SiLU(gate) * up from the gate/up projection's output, as eager torch
    computes it (within bf16 rounding)."""
    from workers.swiglu import silu_mul, supports
    x = (torch.randn(m, 2 * inter, device="cuda") * 3).to(dtype)
    assert supports(x)
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(silu_mul(x), torch.nn.functional.silu(gate) * up)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_graph_step_gemv_kernel_matches_cublas(dtype, bias):
    """One-token graph steps with the GEMV kernel (workers/gemv.py: norm, SiLU x up and residual
    folded in) against cuBLAS and separate kernels: same greedy tokens (float32), and the prefix
    hit's logits (from the graph step) agree; a q/k/v bias and tied embeddings on one of them."""
    from dataclasses import replace
    spec = replace(SPEC, qkv_bias=True, tie_embeddings=True) if bias else SPEC
    r = random_runner(spec, "cuda", dtype, seed=5, std=0.1)
    ids = torch.randint(0, spec.vocab_size, (400,)).tolist()
    outs = {}
    for kernel in (False, True):
        r.gemv_kernel = kernel
        store = InMemorySegmentStore()
        eng = ReuseEngine(r, store, static_tokens=1024)
        res, seq = eng.generate(ids, None, 10, settings=ReuseSettings(mode="full"), keep_segment=True)
        store.put(eng.segment_of(seq, "d"))
        plan = ReusePlan(400, [ReuseSpan(0, "d", 0, 400)], prefix_len=400)
        hit, _ = eng.generate(ids, plan, 1, settings=ReuseSettings(mode="prefix"))
        assert hit.cached_tokens == 399
        outs[kernel] = (res.token_ids, hit.first_logits.float())
    scale = outs[False][1].abs().max().item()
    if dtype == torch.float32:
        assert outs[True][0] == outs[False][0]
        assert (outs[True][1] - outs[False][1]).abs().max().item() <= 1e-4 * scale
    else:  # bf16: the fused norm rounds once instead of twice
        assert (outs[True][1] - outs[False][1]).abs().max().item() <= 3e-2 * scale
