"""Static-batch decode: same greedy tokens as single-sequence ReuseEngine.generate, with and
without a KVSharer map. (The same check on SmolLM2's real weights is in test_kvsharer.py, which
loads that model once for the module.)"""
from __future__ import annotations

import pytest
import torch

from workers.batch_decode import (BatchKV, GraphedBatchStep, attend_matmul, batch_decode_step,
                                  batch_generate, batch_prefill, kv_bytes_per_token)
from workers.engine import ReuseEngine, ReuseSettings
from workers.model_loader import random_runner
from workers.model_spec import ModelSpec
from tests.workers.one_thread import one_torch_thread  # noqa: F401 (autouse: one torch thread)


SPEC = ModelSpec(vocab_size=256, hidden_size=64, num_layers=6, num_heads=4, num_kv_heads=2,
                 head_dim=16, intermediate_size=128, max_position=512)
MAP = [0, 0, 2, 2, 4, 2]  # layers 1, 3, 5 use the KV of layers 0, 2, 2


def runner(kv_source=None, dtype=torch.float64):
    r = random_runner(SPEC, "cpu", dtype, std=0.1)
    if kv_source:
        r.share_kv(kv_source)
    return r


def prompts(b=3, t=20, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, SPEC.vocab_size, (b, t), generator=g)


def engine_tokens(r, ids, n, stop_ids=()):
    eng = ReuseEngine(r, settings=ReuseSettings(mode="full"))
    return [eng.generate(row.tolist(), max_tokens=n, stop_ids=stop_ids)[0].token_ids for row in ids]


@pytest.mark.parametrize("kv_source", [None, MAP])
def test_batch_generate_matches_engine(kv_source):
    r = runner(kv_source)
    ids = prompts()
    assert batch_generate(r, ids, 12, stop_ids=()) == engine_tokens(r, ids, 12)


def test_batch_logits_match_single_sequence():
    r = runner(MAP)
    ids = prompts(2, 9)
    cache, logits = batch_prefill(r, ids, 3)
    assert cache.k.shape == (len(r.kv_layers), 2, 2, 12, 16) and cache.length == 9
    for b in range(2):
        ref = r.prefill_logits(ids[b])[-1]
        assert torch.allclose(logits[b], ref, atol=1e-10)
    nxt = logits.argmax(-1)
    step = batch_decode_step(r, cache, nxt)
    for b in range(2):
        full = torch.cat([ids[b], nxt[b:b + 1]])
        assert torch.allclose(step[b], r.prefill_logits(full)[-1], atol=1e-10)


def test_kv_source_override_equals_shared_runner():
    plain, shared = runner(), runner(MAP)
    ids = prompts(2, 10)
    _, a = batch_prefill(plain, ids, kv_source=MAP)
    _, b = batch_prefill(shared, ids)
    assert torch.allclose(a, b, atol=1e-10)
    with pytest.raises(ValueError, match="unshared"):
        batch_prefill(shared, ids, kv_source=MAP)
    with pytest.raises(ValueError, match="earlier owner"):
        batch_prefill(plain, ids, kv_source=[0, 0, 1, 3, 4, 5])


def test_stop_tokens_cut_like_engine():
    r = runner()
    ids = prompts(3, 12)
    free = engine_tokens(r, ids, 10)
    stop = (free[0][3],)  # a token sequence 0 emits at step 3
    got = batch_generate(r, ids, 10, stop_ids=stop)
    assert got == engine_tokens(r, ids, 10, stop_ids=stop)
    assert got[0][-1] == stop[0] and len(got[0]) <= 4


def test_bytes_and_errors():
    plain, shared = runner(), runner(MAP)
    assert kv_bytes_per_token(plain) == 6 * 2 * 2 * 16 * 8
    assert kv_bytes_per_token(shared) == 3 * 2 * 2 * 16 * 8
    c = BatchKV.empty(shared, 4, 32)
    assert c.nbytes == kv_bytes_per_token(shared) * 4 * 32
    with pytest.raises(ValueError):
        batch_prefill(plain, [[1, 2, 3], [1, 2]])
    with pytest.raises(ValueError):
        batch_prefill(plain, [[1, 999]])
    cache, logits = batch_prefill(plain, prompts(1, 4), 1)
    batch_decode_step(plain, cache, logits.argmax(-1))
    with pytest.raises(ValueError, match="full"):
        batch_decode_step(plain, cache, logits.argmax(-1))


def test_matmul_decode_attention_equals_sdpa():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*shape, generator=g, dtype=torch.float64)
               for shape in ((3, 2, 4, 16), (3, 2, 37, 16), (3, 2, 37, 16)))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.25)
    assert torch.allclose(attend_matmul(q, k, v, 0.25), ref, atol=1e-6)


@pytest.mark.parametrize("kv_source, attn", [(None, "auto"), (MAP, "auto"), (MAP, "matmul")])
def test_static_step_equals_plain_step(kv_source, attn):
    """The graph-capturable step (run eagerly here: no CUDA) gives the plain step's logits and KV."""
    r = runner(kv_source)
    ids = prompts(3, 10)
    c1, logits = batch_prefill(r, ids, 6)
    c2 = c1.clone()
    step = GraphedBatchStep(r, c2, attn=attn)
    assert not step.use_graph
    tok = logits.argmax(-1)
    for _ in range(6):
        a = batch_decode_step(r, c1, tok)
        b = step(tok)
        assert torch.allclose(a, b, atol=1e-10)
        tok = a.argmax(-1)
    assert c1.length == c2.length == 16
    assert torch.allclose(c1.k, c2.k) and torch.allclose(c1.v, c2.v)
    with pytest.raises(ValueError, match="full"):
        step(tok)
