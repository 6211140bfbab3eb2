"""Checks shared by the tests that compare a pooled (graphed) engine with an eager one."""
import torch


def assert_same_segment_and_decode(eager, pooled, a, b, first_logits: torch.Tensor, keep_segment: bool,
                                   atol: float, steps: int = 3) -> None:
    """Sequences ``a`` (eager) and ``b`` (pooled) after the same prefill: the same stored segment
    (when kept) and the same logits over ``steps`` greedy decode steps."""
    if keep_segment:
        sa, sb = eager.segment_of(a, "x"), pooled.segment_of(b, "y")
        assert torch.allclose(sa.keys, sb.keys, atol=atol) and torch.allclose(sa.values, sb.values, atol=atol)
    tok = int(first_logits.argmax())
    for _ in range(steps):
        da, db = eager.decode_step(a, tok), pooled.decode_step(b, tok)
        assert torch.allclose(da, db, atol=max(atol, 1e-4))
        tok = int(da.argmax())
