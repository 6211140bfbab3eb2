import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from index_service.align import align
from index_service.plan import ReusePlan


def toks(n, seed=0, vocab=32000):
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


def check_valid(plan: ReusePlan, new, donors, min_run=4):
    """Every reused position points at an in-range donor token equal to the new token."""
    d = dict(donors)
    assert plan.n_tokens == len(new)
    for s in plan.spans:
        assert s.length >= min_run
        don = d[s.donor_id]
        assert 0 <= s.donor_start and s.donor_start + s.length <= len(don)
        assert list(new[s.new_start:s.new_end]) == list(don[s.donor_start:s.donor_start + s.length])
    # the prefix, when claimed, is a same-position match from 0
    if plan.prefix_len:
        first = plan.spans[0]
        assert first.new_start == 0 and first.donor_start == 0 and first.length >= plan.prefix_len


def test_identical():
    a = toks(4096)
    plan = align(a, [("d", a)])
    assert plan.reuse_rate == 1.0 and plan.prefix_len == 4096 and plan.source == "prefix"
    check_valid(plan, a, [("d", a)])


def test_reorder_halves_swapped():
    a = toks(4096)
    new = a[2048:] + a[:2048]
    plan = align(new, [("d", a)])
    assert plan.reuse_rate >= 0.95
    assert plan.prefix_len == 0 and plan.source == "semantic"
    check_valid(plan, new, [("d", a)])


def test_reorder_many_documents():
    docs = [toks(300, seed=i) for i in range(10)]
    donor = sum(docs, [])
    perm = np.random.default_rng(1).permutation(10)
    new = sum((docs[i] for i in perm), [])
    plan = align(new, [("d", donor)])
    assert plan.reuse_rate >= 0.99
    check_valid(plan, new, [("d", donor)])


def test_insert():
    a = toks(1000)
    new = a[:500] + toks(20, seed=9) + a[500:]
    plan = align(new, [("d", a)])
    assert plan.reused_tokens == 1000 and plan.prefix_len == 500
    check_valid(plan, new, [("d", a)])


def test_delete():
    a = toks(1000)
    new = a[:400] + a[450:]
    plan = align(new, [("d", a)])
    assert plan.reused_tokens == 950 and plan.prefix_len == 400
    assert [(s.new_start, s.donor_start, s.length) for s in plan.spans] == [(0, 0, 400), (400, 450, 550)]


def test_replace():
    a = toks(1000)
    new = a[:300] + toks(10, seed=5) + a[310:]
    plan = align(new, [("d", a)])
    assert plan.reused_tokens == 990
    check_valid(plan, new, [("d", a)])


def test_short_inplace_run_recovered_by_gap_diff():
    # an edit that leaves a 5-token island: shorter than the m-gram (8), found by the gap diff
    a = toks(400)
    new = a[:100] + [1, 2, 3] + a[103:108] + [4, 5, 6] + a[111:]
    plan = align(new, [("d", a)], min_run=4)
    assert any(s.new_start == 103 and s.length == 5 and s.donor_start == 103 for s in plan.spans)
    assert align(new, [("d", a)], min_run=4, gap_diff=False).reused_tokens == plan.reused_tokens - 5
    check_valid(plan, new, [("d", a)])


def test_several_donors_cover_different_parts():
    x, y, z = toks(500, 1), toks(500, 2), toks(500, 3)
    new = y + x + z
    donors = [("dx", x + toks(50, 7)), ("dy", toks(30, 8) + y), ("dz", z)]
    plan = align(new, donors)
    assert plan.reuse_rate == 1.0
    assert plan.donor_ids == ["dy", "dx", "dz"]
    check_valid(plan, new, donors)


def test_first_donor_gets_first_pick():
    a = toks(600)
    plan = align(a[100:], [("first", a), ("second", a[100:] + [7])])
    # the second donor is an exact prefix hit, which wins; otherwise priority decides
    assert plan.prefix_len == 500 and plan.donor_ids == ["second"]
    plan = align([9] + a[100:], [("first", a), ("second", [1] + a[100:])])
    assert plan.donor_ids == ["first"] and plan.prefix_len == 0


def test_empty_donor_and_empty_donor_list():
    a = toks(100)
    plan = align(a, [("d", [])])
    assert plan.spans == [] and plan.source == "miss" and plan.n_tokens == 100
    plan = align(a, [])
    assert plan.spans == [] and plan.prefix_len == 0


def test_min_run_respected():
    a = toks(200)
    new = toks(50, 3) + a[10:16] + toks(50, 4) + a[100:103] + toks(50, 5)  # runs of 6 and 3
    for m in (3, 4, 6, 7):
        plan = align(new, [("d", a)], min_run=m, gram=m)
        assert all(s.length >= m for s in plan.spans)
        check_valid(plan, new, [("d", a)], min_run=m)
    assert align(new, [("d", a)], min_run=4, gram=4).reused_tokens == 6
    assert align(new, [("d", a)], min_run=3, gram=3).reused_tokens == 9
    assert align(new, [("d", a)], min_run=7, gram=7).reused_tokens == 0


def test_repetitive_tokens_bounded_and_correct():
    a = [5] * 3000
    new = [5] * 2000 + [6] + [5] * 2000
    plan = align(new, [("d", a)])
    assert plan.reuse_rate > 0.99
    check_valid(plan, new, [("d", a)])


def test_numpy_inputs():
    a = np.array(toks(300), dtype=np.int32)
    plan = align(a[::-1].copy(), [("d", a)])
    check_valid(plan, a[::-1].tolist(), [("d", a.tolist())])


@pytest.mark.parametrize(
    "new, donors, exc",
    [
        ([], [], ValueError),
        ("abc", [], TypeError),
        ([1.5, 2.0], [], TypeError),
        ([[1, 2]], [], TypeError),
        ([1, -2], [], ValueError),
        ([1, 2], [("d", "xyz")], TypeError),
        ([1, 2], [(3, [1, 2])], TypeError),
        ([1, 2], [("d",)], TypeError),
        ([1, 2], [("d", [1]), ("d", [2])], ValueError),
        ([1, 2], "d", TypeError),
        ({"input_ids": [1, 2]}, [], TypeError),
        ([1, 2], [("d", {"input_ids": [1, 2]})], TypeError),
    ],
)
def test_bad_input(new, donors, exc):
    with pytest.raises(exc):
        align(new, donors)


def test_bad_min_run():
    with pytest.raises(ValueError):
        align([1, 2], [], min_run=0)
    with pytest.raises(ValueError):
        align([1, 2], [], min_run=4, gram=3)


small_tokens = st.lists(st.integers(0, 6), min_size=1, max_size=300)


@st.composite
def related(draw):
    """A donor plus a new prompt made of pieces of it (moved, edited) and fresh tokens."""
    donor = draw(st.lists(st.integers(0, 50), min_size=0, max_size=400))
    pieces = []
    for _ in range(draw(st.integers(1, 6))):
        if donor and draw(st.booleans()):
            a = draw(st.integers(0, len(donor) - 1))
            b = draw(st.integers(a, len(donor)))
            pieces += donor[a:b]
        else:
            pieces += draw(st.lists(st.integers(0, 50), max_size=30))
    if not pieces:
        pieces = [0]
    return pieces, donor


@settings(max_examples=150, deadline=None)
@given(related(), small_tokens, st.integers(1, 8))
def test_property_plan_valid(pair, other, min_run):
    new, donor = pair
    donors = [("a", donor), ("b", other)]
    plan = align(new, donors, min_run=min_run)
    check_valid(plan, new, donors, min_run=min_run)
    pos = plan.donor_arrays()[1]
    assert ((pos >= 0).sum()) == plan.reused_tokens


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 1000), min_size=16, max_size=500), st.integers(1, 15))
def test_property_rotation_reused(a, cut):
    cut = min(cut * len(a) // 16, len(a) - 1)
    new = a[cut:] + a[:cut]
    plan = align(new, [("d", a)], min_run=4)
    check_valid(plan, new, [("d", a)])
