"""The RoPE position table gives what computing cos/sin gives, and is used only within bounds."""
import torch

from workers.model_spec import ModelSpec
from workers.rope import Rope

SPEC = ModelSpec(vocab_size=100, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=16, intermediate_size=128, max_position=512)


def test_table_lookup_equals_computed():
    rope = Rope(SPEC, torch.device("cpu"))
    pos = torch.tensor([0, 1, 7, 300, 511])
    for dtype in (torch.float32, torch.bfloat16):
        got = rope.cos_sin(pos, dtype, bound=512)
        want = rope.compute(pos, dtype)
        assert all(torch.allclose(g.float(), w.float(), atol=1e-6) for g, w in zip(got, want))
        assert got[0].dtype == dtype and got[0].shape == (5, 16)


def test_positions_past_the_table_are_computed_not_looked_up():
    rope = Rope(SPEC, torch.device("cpu"))
    pos = torch.tensor([10, 600, 1000])
    got = rope.cos_sin(pos, torch.float32, bound=1001)  # beyond max_position: no table, no error
    assert torch.equal(got[0], rope.compute(pos, torch.float32)[0])
    assert rope.cos_sin(pos, torch.float32)[1].shape == (3, 16)  # no bound: computed


def test_reserve_extends_the_table_and_keeps_the_old_one_alive():
    rope = Rope(SPEC, torch.device("cpu"))
    rope.cos_sin(torch.tensor([3]), torch.float32, bound=4)
    old = rope._tables[torch.float32][0]
    rope.reserve(1024)
    assert rope.table_positions == 1024 and any(t[0] is old for t in rope._retired)
    got = rope.cos_sin(torch.tensor([1000]), torch.float32, bound=1024)
    assert torch.allclose(got[0], rope.compute(torch.tensor([1000]), torch.float32)[0], atol=1e-6)
    rope.reserve(100)  # never shrinks
    assert rope.table_positions == 1024
