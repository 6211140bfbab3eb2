"""CUDA-only paths (FlexAttention, the CUDA-graph step, fused RoPE) agree with the eager ones.
Skipped without a GPU; run on a GPU machine with `pytest tests/workers/test_gpu_paths.py`."""
import pytest
import torch

from index_service.plan import ReusePlan, ReuseSpan
from workers.engine import ReuseEngine, ReuseSettings
from workers.model_loader import random_runner
from workers.model_spec import ModelSpec
from workers.segments import InMemorySegmentStore

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SPEC = ModelSpec(vocab_size=1000, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=2,
                 head_dim=32, intermediate_size=512, max_position=4096)


def _runner(flex: bool):
    r = random_runner(SPEC, "cuda", torch.float32, seed=3, std=0.1)
    r.use_flex = flex
    return r


def test_flex_matches_dense_mask():
    ids = torch.randint(0, SPEC.vocab_size, (700,), device="cuda")
    sel = torch.tensor(sorted(set(torch.randint(0, 700, (150,)).tolist()) | {699}), device="cuda")
    outs = []
    for flex in (False, True):
        r = _runner(flex)
        cache = r.new_cache(700)
        cache.length = 700
        r.forward(ids, torch.arange(700, device="cuda"), cache, "causal")
        outs.append(r.logits(r.forward(ids[sel], sel, cache, "mask")))
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
