"""Minimum recompute budget of DHD / CacheBlend (``ReuseSettings.min_recompute``): a long exact
prefix leaves few candidates, and r alone then recomputes almost none of them."""
import pytest
import torch

from index_service.align import align
from kvcluster.config import ConfigError, config_from_dict, load_config
from workers.dhd import recompute_budget, select_cacheblend_tokens, select_dhd_tokens, top_ratio
from workers.engine import ReuseEngine, ReuseSettings
from workers.errors import InvalidParameterError
from workers.segments import InMemorySegmentStore
from workers.worker_actor import WorkerOptions
from tests.workers.conftest import TINY


def _ids(n, seed=0):
    return torch.randint(2, TINY.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# ---- the budget rule ------------------------------------------------------------------------

@pytest.mark.parametrize("m, r, floor, want", [
    (16, 0.15, 0, 2),      # the reworded chat turn of the quality benchmark: 2 of 16
    (16, 0.15, 16, 16),    # the floor covers all 16
    (6, 0.15, 16, 6),      # never more than the candidates
    (200, 0.15, 16, 30),   # r dominates once r * m > floor
    (100, 0.15, 16, 16),   # floor dominates below 16 / r
    (0, 0.15, 16, 0),      # no candidates, nothing to recompute
    (10, 0.0, 3, 3),       # r = 0 with a floor
    (10, 1.0, 3, 10),
    (7, 0.5, 0, 4),
])
def test_recompute_budget(m, r, floor, want):
    assert recompute_budget(m, r, floor) == want


def test_selection_takes_the_top_scores_up_to_the_floor():
    scores = torch.tensor([0.1, 5.0, 0.3, 4.0, 0.2, 3.0, 0.0, 2.0])
    assert top_ratio(scores, 0.15).tolist() == [1]  # round(1.2) = 1
    assert sorted(top_ratio(scores, 0.15, 4).tolist()) == [1, 3, 5, 7]
    assert sorted(top_ratio(scores, 0.15, 100).tolist()) == list(range(8))
    dev = torch.tensor([1.0, 1.0, 1.0, 1.0])
    attn = torch.tensor([0.4, 0.1, 0.3, 0.2])
    assert sorted(select_dhd_tokens(attn, dev, 0.0, 2).tolist()) == [0, 2]  # attention x deviation
    assert sorted(select_cacheblend_tokens(torch.tensor([3.0, 1.0, 2.0]), 0.0, 2).tolist()) == [0, 2]
    assert top_ratio(torch.empty(0), 0.5, 4).numel() == 0


# ---- in the engine ----------------------------------------------------------------------------

def _case(runner):
    """A 70-token exact prefix, then 3 new tokens, 30 reused tokens (the candidates), 2 new."""
    eng = ReuseEngine(runner, InMemorySegmentStore())
    donor = _ids(100, seed=11)
    _, seq = eng.generate(donor, None, max_tokens=0, settings=ReuseSettings(mode="full"), keep_segment=True)
    eng.store.put(eng.segment_of(seq, "d"))
    new = donor[:70] + _ids(3, seed=12) + donor[70:] + _ids(2, seed=13)
    plan = align(new, [("d", donor)], min_run=4)
    assert plan.prefix_len == 70 and plan.reused_tokens == 100
    return eng, new, plan


@pytest.mark.parametrize("mode", ["dhd", "cacheblend"])
def test_floor_raises_the_recompute_count_after_a_long_prefix(tiny_runner, mode):
    eng, new, plan = _case(tiny_runner)
    counts = {}
    for floor in (0, 10, 30, 500):
        st = ReuseSettings(mode=mode, recompute_ratio=0.15, decode_recompute=0, min_recompute=floor)
        res, _ = eng.generate(new, plan, 1, settings=st)
        assert res.reused_tokens == 100
        counts[floor] = res.recomputed_tokens
    # 30 candidates (the prefix is not one): r alone gives round(4.5) = 4; the floor lifts it
    assert counts == {0: 4, 10: 10, 30: 30, 500: 30}


@pytest.mark.parametrize("mode", ["dhd", "cacheblend"])
def test_floor_covering_every_candidate_equals_full_compute(tiny_runner, mode):
    eng, new, plan = _case(tiny_runner)
    ref, _ = eng.generate(new, None, 8, settings=ReuseSettings(mode="full"))
    st = ReuseSettings(mode=mode, recompute_ratio=0.05, decode_recompute=0, min_recompute=64)
    res, _ = eng.generate(new, plan, 8, settings=st)
    assert res.cached_tokens == 70  # only the exact prefix stays cached
    assert res.token_ids == ref.token_ids
    assert torch.allclose(res.first_logits, ref.first_logits, atol=1e-4)


def test_floor_does_not_touch_other_modes(tiny_runner):
    eng, new, plan = _case(tiny_runner)
    for mode in ("naive", "prefix"):
        a, _ = eng.generate(new, plan, 1, settings=ReuseSettings(mode=mode, min_recompute=0))
        b, _ = eng.generate(new, plan, 1, settings=ReuseSettings(mode=mode, min_recompute=50))
        assert (a.recomputed_tokens, a.cached_tokens) == (b.recomputed_tokens, b.cached_tokens)


# ---- validation and config ----------------------------------------------------------------------

@pytest.mark.parametrize("bad", [-1, 1.5, True, "8"])
def test_bad_min_recompute_is_refused(tiny_runner, bad):
    with pytest.raises(InvalidParameterError, match="min_recompute"):
        ReuseSettings(mode="dhd", min_recompute=bad).validate(TINY.num_layers)
    with pytest.raises(InvalidParameterError, match="min_recompute"):
        ReuseEngine(tiny_runner, InMemorySegmentStore()).prefill(
            _ids(10), None, ReuseSettings(mode="dhd", min_recompute=bad))


def test_min_recompute_in_the_config_tree():
    assert config_from_dict({}).reuse.min_recompute == ReuseSettings().min_recompute
    cfg = load_config(None, env={"KVCLUSTER_REUSE__MIN_RECOMPUTE": "16"})
    assert cfg.reuse.min_recompute == 16
    with pytest.raises(ConfigError, match="reuse.min_recompute"):
        config_from_dict({"reuse": {"min_recompute": -2}})
    opts = WorkerOptions.from_config(cfg)
    assert opts.reuse["min_recompute"] == 16
    assert ReuseSettings(**opts.reuse).min_recompute == 16
