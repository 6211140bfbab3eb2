"""Bucket arithmetic of the graphed check (the graph itself runs in tests/workers/test_gpu_paths.py)
and the weighted attention-received it uses, on the CPU."""
import torch

from workers.graphed_check import MAX_ROWS, ROW_BUCKET, must_bucket, row_bucket
from workers.model_loader import random_runner
from workers.model_spec import ModelSpec


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
