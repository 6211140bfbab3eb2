"""The graphed check on the CPU: bucket arithmetic, the weighted attention-received it uses, and
its body run eagerly through the engine (the captured graph runs in tests/workers/test_gpu_paths.py)."""
import pytest
import torch

from index_service.plan import ReusePlan, ReuseSpan
from workers.engine import ReuseEngine, ReuseSettings
from workers.graphed_check import MAX_ROWS, ROW_BUCKET, CheckGraphs, must_bucket, row_bucket
from workers.model_loader import random_runner
from workers.model_spec import ModelSpec
from workers.segments import InMemorySegmentStore

from tests.workers.pooled_checks import assert_same_segment_and_decode


def test_buckets():
    assert row_bucket(1) == ROW_BUCKET and row_bucket(ROW_BUCKET) == ROW_BUCKET
    assert row_bucket(ROW_BUCKET + 1) == 2 * ROW_BUCKET
    assert row_bucket(MAX_ROWS) == MAX_ROWS
    assert [must_bucket(m) for m in (0, 1, 16, 17, 100, 128, 129)] == [16, 16, 16, 32, 128, 128, 256]


def test_weighted_attention_received_drops_padding_rows():
    """Rows weighted 0 add nothing: the result equals the unweighted one over the other rows."""
    spec = ModelSpec(vocab_size=100, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=16, intermediate_size=128, max_position=256)
    r = random_runner(spec, "cpu", torch.float32, seed=0)
    q = torch.randn(4, 6, 16)
    k = torch.randn(2, 40, 16)
    pos = torch.tensor([3, 9, 10, 20, 30, 39])
    keep = torch.tensor([0, 2, 5])
    weight = torch.zeros(6)
    weight[keep] = 1.0
    for chunk in (256, 4):
        got = r.attention_received(q, k, pos, 40, chunk=chunk, row_weight=weight)
        want = r.attention_received(q[:, keep], k, pos[keep], 40, chunk=chunk)
        assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(r.attention_received(q, k, pos, 40, row_weight=torch.ones(6)),
                          r.attention_received(q, k, pos, 40), atol=1e-6)


class _EagerCheck(CheckGraphs):
    """The graph's body run eagerly on the CPU (no capture): replay() recomputes it into the
    buffers the first run returned, as a replayed graph would."""

    def _capture(self, mode, c, tb, mb, keys, k_pre_out):
        inp = torch.zeros(3 * tb + 2 * mb + 1, dtype=torch.long)
        inp[tb:2 * tb] = self.pool.capacity - 1
        out = self._body(mode, c, tb, mb, keys, inp, k_pre_out)
        body = self._body

        class Replay:
            def replay(self):
                for buf, new in zip(out, body(mode, c, tb, mb, keys, inp, k_pre_out)):
                    buf.copy_(new)
        return Replay(), inp, out


@pytest.mark.parametrize("mode,shared", [("dhd", False), ("cacheblend", False), ("dhd", True)])
def test_check_graph_body_matches_the_eager_engine(mode, shared):
    """What the graphed check computes (padded rows, weighted scoring rows, top-k by rank with k
    as data), run eagerly through the engine's pooled path, chooses the eager engine's tokens and
    gives its logits, deviations, stored segment and DHD decode steps; also when the check layer
    attends over an earlier layer's KV (KVSharer)."""
    spec = ModelSpec(vocab_size=500, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
                     head_dim=16, intermediate_size=128, max_position=2048)
    r = random_runner(spec, "cpu", torch.float32, seed=3, std=0.1)
    if shared:
        r.share_kv([0, 0, 2, 3])  # layer 1, the check layer, uses layer 0's KV
    store = InMemorySegmentStore()
    ids = torch.randint(0, spec.vocab_size, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    eager, pooled = ReuseEngine(r, store), ReuseEngine(r, store)
    pooled._pool = r.new_cache(640)
    pooled._check_graphs = _EagerCheck(r, pooled._pool)
    seq, _ = eager.prefill(ids, None, ReuseSettings(mode="full"), keep_segment=True)
    store.put(eager.segment_of(seq, "d"))
    new = list(ids)
    for i in list(range(60, 80)) + list(range(200, 204)):
        new[i] = (new[i] + 1) % spec.vocab_size
    spans = [ReuseSpan(0, "d", 0, 60), ReuseSpan(80, "d", 80, 120), ReuseSpan(204, "d", 204, 96)]
    st = ReuseSettings(mode=mode, recompute_ratio=0.2, decode_recompute=2)
    for prefix, keep in ((60, True), (0, False)):
        plan = ReusePlan(300, spans, prefix_len=prefix)
        a, la = eager.prefill(new, plan, st, max_tokens=4, keep_segment=keep)
        b, lb = pooled.prefill(new, plan, st, max_tokens=4, keep_segment=keep)
        assert b.cache is pooled._pool
        assert (a.stats.reused_tokens, a.stats.recomputed_tokens, a.stats.computed_tokens) == \
            (b.stats.reused_tokens, b.stats.recomputed_tokens, b.stats.computed_tokens)
        assert b.stats.recomputed_tokens == round(0.2 * (a.stats.reused_tokens - prefix))
        assert torch.allclose(la, lb, atol=1e-4), (prefix, (la - lb).abs().max())
        if mode == "dhd":
            assert torch.equal(a.stale, b.stale)
            assert torch.allclose(a.deviation, b.deviation, atol=1e-4)
            assert torch.allclose(a.hidden_c, b.hidden_c, atol=1e-5)
        assert_same_segment_and_decode(eager, pooled, a, b, la, keep, atol=1e-5)
    assert len(pooled._check_graphs.graphs) == 2  # one per bucket: the two runs differ in k_pre
