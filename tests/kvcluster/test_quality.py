"""Tests for kvcluster.quality: known values, edge cases, numpy/torch inputs."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest

from kvcluster.quality import (
    PrefixMatch,
    _lcs_python,
    exact_match_prefix,
    kl_divergence,
    lcs_length,
    rouge_l,
    top1_agreement,
)


def test_rouge_l_known_text_value():
    # LCS("the cat sat on the mat", "the cat lay on the mat") = 5 of 6 each way -> F1 = 5/6.
    assert rouge_l("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(5 / 6)


def test_rouge_l_unequal_lengths():
    # candidate 2 tokens, reference 4, LCS 2: P = 1, R = 0.5, F1 = 2/3.
    assert rouge_l([1, 2], [1, 5, 2, 7]) == pytest.approx(2 / 3)
    assert rouge_l([1, 5, 2, 7], [1, 2]) == pytest.approx(2 / 3)


def test_rouge_l_identical_disjoint_and_empty():
    assert rouge_l([3, 1, 4, 1, 5], [3, 1, 4, 1, 5]) == 1.0
    assert rouge_l("a b c", "x y z") == 0.0
    assert rouge_l([], []) == 1.0
    assert rouge_l([], [1]) == 0.0


def test_rouge_l_is_subsequence_not_substring():
    # Reordered tokens: LCS of [1,2,3,4] and [3,4,1,2] is 2.
    assert rouge_l([1, 2, 3, 4], [3, 4, 1, 2]) == pytest.approx(0.5)


def test_rouge_l_accepts_numpy_and_torch():
    a, b = np.array([5, 6, 7, 8]), np.array([5, 6, 0, 8])
    assert rouge_l(a, b) == pytest.approx(0.75)
    torch = pytest.importorskip("torch")
    assert rouge_l(torch.tensor([5, 6, 7, 8]), torch.tensor([5, 6, 0, 8])) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        rouge_l(np.zeros((2, 2), dtype=int), [1])


def test_lcs_matches_python_reference():
    rng = random.Random(0)
    for _ in range(200):
        a = [rng.randrange(6) for _ in range(rng.randrange(0, 70))]
        b = [rng.randrange(6) for _ in range(rng.randrange(0, 70))]
        assert lcs_length(a, b) == _lcs_python(a, b)
    words = "the cat sat on the mat".split()
    assert lcs_length(words, "a cat on a mat".split()) == 3


def test_rouge_l_is_fast_for_64_tokens():
    import time

    rng = random.Random(1)
    pairs = [([rng.randrange(50) for _ in range(64)], [rng.randrange(50) for _ in range(64)])
             for _ in range(1000)]
    t = time.perf_counter()
    for a, b in pairs:
        rouge_l(a, b)
    assert time.perf_counter() - t < 1.0  # ~1 ms budget per pair, in practice far less


def test_exact_match_prefix():
    assert exact_match_prefix([1, 2, 3, 4], [1, 2, 9, 4]) == PrefixMatch(0.5, False)
    assert exact_match_prefix([1, 2, 3], [1, 2, 3]) == (1.0, True)
    frac, exact = exact_match_prefix([1, 2], [1, 2, 3, 4])  # a short run is not a full match
    assert frac == 0.5 and not exact
    assert exact_match_prefix("a b c", "x b c") == (0.0, False)
    assert exact_match_prefix([], []) == (1.0, True)


def test_kl_identical_is_zero():
    x = np.random.default_rng(0).normal(size=(4, 50)) * 5
    assert kl_divergence(x, x) == 0.0
    assert kl_divergence(x, x + 3.0) == pytest.approx(0.0, abs=1e-12)  # softmax is shift-free


def test_kl_known_two_outcome_case():
    # p = softmax([0, 0]) = (1/2, 1/2); q = softmax([ln 3, 0]) = (3/4, 1/4).
    # KL = 1/2 ln(2/3) + 1/2 ln(2) = 1/2 ln(4/3).
    got = kl_divergence([0.0, 0.0], [math.log(3.0), 0.0])
    assert got == pytest.approx(0.5 * math.log(4 / 3), rel=1e-12)
    # And the other direction differs (KL is not symmetric): 3/4 ln(3/2) + 1/4 ln(1/2).
    back = kl_divergence([math.log(3.0), 0.0], [0.0, 0.0])
    assert back == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), rel=1e-12)


def test_kl_stable_for_huge_logits_and_masks():
    big = np.array([1000.0, 0.0, -1000.0])
    assert kl_divergence(big, big) == 0.0
    assert math.isfinite(kl_divergence(big, big[::-1].copy()))
    masked = np.array([0.0, 0.0, -np.inf])  # p gives the last outcome 0: no nan
    assert kl_divergence(masked, np.zeros(3)) == pytest.approx(math.log(1.5), rel=1e-12)
    assert kl_divergence(np.zeros(3), masked) == math.inf  # q misses mass that p has


def test_kl_reductions_and_shapes():
    rng = np.random.default_rng(1)
    p, q = rng.normal(size=(3, 5, 10)), rng.normal(size=(3, 5, 10))
    per = kl_divergence(p, q, reduction="none")
    assert per.shape == (3, 5) and (per >= 0).all()
    assert kl_divergence(p, q) == pytest.approx(per.mean())
    assert kl_divergence(p, q, reduction="sum") == pytest.approx(per.sum())
    with pytest.raises(ValueError):
        kl_divergence(p, q[:, :4])
    with pytest.raises(ValueError):
        kl_divergence(p, q, reduction="max")


def test_kl_torch_bfloat16_matches_numpy():
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(4, 32, generator=g), torch.randn(4, 32, generator=g)
    p16, q16 = p.to(torch.bfloat16), q.to(torch.bfloat16)
    want = kl_divergence(p16.float().numpy(), q16.float().numpy())
    assert kl_divergence(p16, q16) == pytest.approx(want, rel=1e-12)
    ref = torch.nn.functional.kl_div(
        torch.log_softmax(q.double(), -1), torch.log_softmax(p.double(), -1),
        log_target=True, reduction="none").sum(-1).mean().item()
    assert kl_divergence(p, q) == pytest.approx(ref, rel=1e-9)


def test_top1_agreement():
    p = np.array([[0.0, 1.0], [2.0, 0.0], [0.0, 3.0]])
    q = np.array([[0.0, 2.0], [0.0, 1.0], [0.0, 9.0]])
    assert top1_agreement(p, q) == pytest.approx(2 / 3)
