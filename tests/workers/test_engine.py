"""Reuse engine: reuse that should be exact is exact; bad input is refused with typed errors."""
import numpy as np
import pytest
import torch

from index_service.align import align
from index_service.plan import ReusePlan, ReuseSpan
from workers.engine import MODES, ReuseEngine, ReuseSettings
from workers.errors import (DonorMissingError, DonorShapeError, EmptyPromptError,
                            FingerprintMismatchError, InvalidParameterError, PromptTooLongError,
                            TokenOutOfVocabError)
from workers.model_loader import random_runner
from workers.segments import InMemorySegmentStore
from tests.workers.conftest import TINY


def _engine(runner):
    return ReuseEngine(runner, InMemorySegmentStore())


def _store_donor(eng, ids, sid="d"):
    _, seq = eng.generate(ids, None, max_tokens=0, settings=ReuseSettings(mode="full"), keep_segment=True)
    eng.store.put(eng.segment_of(seq, sid))


def _ids(n, seed=0):
    return torch.randint(2, TINY.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("mode", MODES)
def test_identical_prompt_gives_identical_output(tiny_runner, mode):
    eng = _engine(tiny_runner)
    ids = _ids(60)
    _store_donor(eng, ids)
    ref, _ = eng.generate(ids, None, 12, settings=ReuseSettings(mode="full"))
    plan = align(ids, [("d", ids)])
    res, _ = eng.generate(ids, plan, 12, settings=ReuseSettings(mode=mode))
    assert res.token_ids == ref.token_ids
    assert torch.allclose(res.first_logits, ref.first_logits, atol=1e-4)
    if mode != "full":
        assert res.reused_tokens == 59  # everything but the last token


def test_exact_prefix_donor_is_exact(tiny_runner):
    eng = _engine(tiny_runner)
    donor = _ids(50)
    _store_donor(eng, donor)
    new = donor[:40] + _ids(15, seed=3)
    plan = align(new, [("d", donor)])
    assert plan.prefix_len == 40
    ref, _ = eng.generate(new, None, 10, settings=ReuseSettings(mode="full"))
    for mode in ("prefix", "naive", "dhd"):
        res, _ = eng.generate(new, plan, 10, settings=ReuseSettings(mode=mode, decode_recompute=0))
        assert res.cached_tokens >= 40
        assert res.token_ids == ref.token_ids
        assert torch.allclose(res.first_logits, ref.first_logits, atol=1e-4)


@pytest.mark.parametrize("mode", ["dhd", "cacheblend"])
def test_any_donor_with_full_recompute_ratio_equals_full(tiny_runner, mode):
    eng = _engine(tiny_runner)
    donor = _ids(80, seed=5)
    _store_donor(eng, donor)
    new = donor[40:] + _ids(7, seed=6) + donor[:40]  # halves swapped, something inserted
    plan = align(new, [("d", donor)], min_run=4)
    assert plan.reused_tokens > 60
    ref, _ = eng.generate(new, None, 12, settings=ReuseSettings(mode="full"))
    res, _ = eng.generate(new, plan, 12, settings=ReuseSettings(mode=mode, recompute_ratio=1.0))
    assert res.recomputed_tokens == res.reused_tokens
    assert res.token_ids == ref.token_ids
    assert torch.allclose(res.first_logits, ref.first_logits, atol=1e-4)


def test_dhd_recomputes_the_ratio_and_decode_recompute_progresses(tiny_runner):
    eng = _engine(tiny_runner)
    donor = _ids(100, seed=7)
    _store_donor(eng, donor)
    new = donor[50:] + donor[:50]
    plan = align(new, [("d", donor)])
    res, seq = eng.generate(new, plan, 8, settings=ReuseSettings(mode="dhd", recompute_ratio=0.2,
                                                                 decode_recompute=3),
                            keep_segment=True)
    assert res.recomputed_tokens == round(0.2 * res.reused_tokens)
    assert res.decode_recomputed == 3 * 7  # 3 per decode step after the first token
    assert 0 < res.flops_fraction < 1
    # the stored segment of a reused prompt holds the prompt's KV before RoPE
    seg = eng.segment_of(seq, "new")
    assert seg.keys.shape[2] == len(new)


def test_naive_and_epic_counts(tiny_runner):
    eng = _engine(tiny_runner)
    donor = _ids(100, seed=8)
    _store_donor(eng, donor)
    new = donor[50:] + donor[:50]
    plan = align(new, [("d", donor)])
    naive, _ = eng.generate(new, plan, 1, settings=ReuseSettings(mode="naive"))
    epic, _ = eng.generate(new, plan, 1, settings=ReuseSettings(mode="epic", epic_tokens=8))
    assert naive.recomputed_tokens == 0
    assert epic.recomputed_tokens == 8 * len(plan.spans)


def test_bad_prompts_are_refused(tiny_runner):
    eng = _engine(tiny_runner)
    with pytest.raises(EmptyPromptError):
        eng.generate([], None, 4)
    with pytest.raises(TokenOutOfVocabError):
        eng.generate([1, 2, TINY.vocab_size], None, 4)
    with pytest.raises(TokenOutOfVocabError):
        eng.generate([1, -3], None, 4)
    with pytest.raises(PromptTooLongError):
        eng.generate(_ids(500), None, 100)
    with pytest.raises(InvalidParameterError):
        eng.generate("not tokens", None, 4)
    with pytest.raises(InvalidParameterError, match=r"\['input_ids'\]"):  # a tokenizer's output as is
        eng.generate({"input_ids": [1, 2], "attention_mask": [1, 1]}, None, 4)
    for bad in (-0.1, 1.5):
        with pytest.raises(InvalidParameterError):
            eng.generate(_ids(10), None, 4, settings=ReuseSettings(recompute_ratio=bad))
    with pytest.raises(InvalidParameterError):
        eng.generate(_ids(10), None, 4, settings=ReuseSettings(mode="bogus"))
    with pytest.raises(InvalidParameterError):
        eng.generate(_ids(10), ReusePlan(9), 4)


def test_bad_donors_are_refused_never_used(tiny_runner):
    eng = _engine(tiny_runner)
    ids = _ids(30)
    plan = ReusePlan(30, [ReuseSpan(0, "d", 0, 29)], prefix_len=29)
    with pytest.raises(DonorMissingError):
        eng.generate(ids, plan, 2)
    other = random_runner(TINY, "cpu", torch.float32, seed=99, std=0.2)
    other_eng = _engine(other)
    _, seq = other_eng.generate(ids, None, 0, settings=ReuseSettings(mode="full"), keep_segment=True)
    eng.store.put(other_eng.segment_of(seq, "d"))
    with pytest.raises(FingerprintMismatchError):
        eng.generate(ids, plan, 2)
    _store_donor(eng, ids)
    seg = eng.store.get("d")
    seg.keys = seg.keys[:, :1]  # wrong shape
    with pytest.raises(DonorShapeError):
        eng.generate(ids, plan, 2)
    _store_donor(eng, ids)
    wrong_tokens = list(ids)
    wrong_tokens[5] = (ids[5] + 1) % TINY.vocab_size
    with pytest.raises(DonorShapeError):  # plan claims tokens match where they do not
        eng.generate(wrong_tokens, plan, 2)


@pytest.mark.slow
def test_smollm2_reordered_documents_reuse(smollm2):
    runner, tok = smollm2
    eng = ReuseEngine(runner, InMemorySegmentStore())
    docs = ["Document A: The Eiffel Tower is a wrought-iron tower in Paris, completed in 1889.",
            "Document B: The Colosseum is an ancient amphitheatre in the centre of Rome, Italy.",
            "Document C: The Great Wall of China is a series of fortifications in northern China."]
    q = " Question: In which city is the Eiffel Tower?"

    def chat(text):
        return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                       tokenize=True, return_dict=True)["input_ids"]
    donor = chat(" ".join(docs) + q)
    new = chat(" ".join([docs[2], docs[0], docs[1]]) + q)
    _, seq = eng.generate(donor, None, 0, settings=ReuseSettings(mode="full"), keep_segment=True)
    eng.store.put(eng.segment_of(seq, "donor"))
    plan = align(new, [("donor", donor)])
    assert plan.reuse_rate > 0.8
    ref, _ = eng.generate(new, None, 8, settings=ReuseSettings(mode="full"))
    res, _ = eng.generate(new, plan, 8, settings=ReuseSettings(mode="dhd", recompute_ratio=0.3))
    assert res.cached_tokens > 0.5 * len(new)
    # a 135M model's continuation may drift after reordering (the quality benchmark measures
    # how much); the first token must agree
    assert res.token_ids[0] == ref.token_ids[0]


def test_epic_leaves_the_exact_prefix_alone(tiny_runner):
    eng = _engine(tiny_runner)
    donor = _ids(90, seed=9)
    _store_donor(eng, donor)
    new = donor[:40] + donor[60:] + donor[40:60]  # exact prefix, then two moved runs
    plan = align(new, [("d", donor)])
    assert plan.prefix_len >= 40
    res, _ = eng.generate(new, plan, 1, settings=ReuseSettings(mode="epic", epic_tokens=8))
    moved_runs = len([s for s in plan.spans if s.new_end > plan.prefix_len])
    assert res.recomputed_tokens <= 8 * moved_runs


@pytest.mark.parametrize("check_layer", [0, 1, 2])
def test_check_layer_keeps_fresh_kv_and_its_input_for_decode(tiny_runner, check_layer):
    """Layers 0..c-1 and layer c's K/V are fresh for every token; the rest of layer c runs only
    for the recomputed tokens, so DHD decode restarts stale tokens from layer c's input, which
    must be what a plain forward pass gives there."""
    eng = _engine(tiny_runner)
    donor = _ids(90, seed=11)
    _store_donor(eng, donor)
    new = donor[45:] + donor[:45]
    plan = align(new, [("d", donor)])
    st = ReuseSettings(mode="dhd", recompute_ratio=0.1, check_layer=check_layer, decode_recompute=3)
    seq, _ = eng.prefill(new, plan, st, max_tokens=8)
    full, _ = eng.prefill(new, None, ReuseSettings(mode="full"), max_tokens=8)
    n, r = len(new), tiny_runner
    for l in range(check_layer + 1):
        assert torch.allclose(seq.cache.k[l, :, :n], full.cache.k[l, :, :n], atol=1e-4)
        assert torch.allclose(seq.cache.v[l, :, :n], full.cache.v[l, :, :n], atol=1e-4)
    cache = r.new_cache(n)
    cache.length = n
    h = r.embed(torch.tensor(new))
    p = r.positions(torch.arange(n), "causal", n)
    with torch.inference_mode():
        for l in range(check_layer):
            h = r.layer(l, h, p, cache)
    assert seq.hidden_offset == 0
    assert torch.allclose(seq.hidden_c, h, atol=1e-4)
    before = int(seq.stale.sum())
    eng.decode_step(seq, 5)
    assert seq.decode_recomputed == 3 and int(seq.stale.sum()) == before - 3


def test_check_layer_runs_only_qkv_for_tokens_not_recomputed(tiny_runner):
    eng = _engine(tiny_runner)
    donor = _ids(100, seed=12)
    _store_donor(eng, donor)
    new = donor[50:] + donor[:50]
    plan = align(new, [("d", donor)])
    seq, _ = eng.prefill(new, plan, ReuseSettings(mode="dhd", recompute_ratio=0.2, decode_recompute=0))
    s, L, n = seq.stats, TINY.num_layers, len(new)
    sel = s.computed_tokens + s.recomputed_tokens
    share = tiny_runner.qkv_flop_share()
    assert 0 < share < 0.5
    assert s.flops_fraction == pytest.approx(((1 + share) * n + (L - 1) * sel) / (L * n))


def test_sequence_keeps_its_own_copy_of_an_array_prompt(tiny_runner):
    eng = _engine(tiny_runner)
    arr = np.asarray(_ids(20), dtype=np.int64)
    seq, _ = eng.prefill(arr, None, ReuseSettings(mode="full"))
    want = arr.copy()
    arr[:] = 0  # a caller reusing its buffer
    assert (seq.prompt == want).all() and seq.token_ids == want.tolist()


def test_serving_code_never_syncs_the_whole_device():
    """A device-wide sync (torch.cuda.synchronize) from one thread invalidates a CUDA graph that
    another thread is capturing, in any capture mode: a request running beside the batcher would
    make its capture fail (seen on an H100). Serving code waits on its own stream instead."""
    import re
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    hits = [f"{p.relative_to(root)}:{i}" for pkg in ("kvcluster", "workers", "index_service", "transport")
            for p in sorted((root / pkg).rglob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if re.search(r"torch\.cuda\.synchronize\(", line.split("#")[0])]
    assert not hits, f"device-wide syncs in serving code: {hits}"
