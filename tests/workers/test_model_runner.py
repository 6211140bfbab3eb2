"""The runner must compute what transformers computes on the same weights."""
import pytest
import torch

from workers.model_loader import hf_model_from_runner_folder, runner_from_state_dict
from workers.model_spec import ModelSpec


def _compare(hf_model, runner, ids):
    with torch.no_grad():
        ref = hf_model(ids[None]).logits[0].float()
    ours = runner.prefill_logits(ids).float()
    return (ref - ours).abs().max().item()


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2):
    runner, tok = smollm2
    hf = hf_model_from_runner_folder("smollm2-135m")
    ids = torch.tensor(tok("The capital of France is Paris. Rome is the capital of")["input_ids"])
    assert _compare(hf, runner, ids) <= 1e-3
    assert runner.spec.num_layers == 30 and runner.spec.num_kv_heads == 3


def _tiny_hf(cls_name, **kw):
    import transformers
    cfg_cls = getattr(transformers, cls_name + "Config")
    model_cls = getattr(transformers, cls_name + "ForCausalLM")
    cfg = cfg_cls(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **kw)
    torch.manual_seed(0)
    model = model_cls(cfg).eval()
    with torch.no_grad():  # random non-trivial biases and norms so their handling is tested
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return cfg, model


@pytest.mark.parametrize("arch,extra", [
    ("Qwen2", {}),
    ("Llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
               "rope_theta": 500000.0}),
    ("Mistral", {}),
])
def test_tiny_random_models_match_transformers(arch, extra):
    cfg, model = _tiny_hf(arch, **extra)
    spec = ModelSpec.from_hf_config(cfg)
    assert spec.qkv_bias == (arch == "Qwen2")
    if arch == "Llama":
        assert spec.rope_scaling and spec.rope_scaling["rope_type"] == "llama3"
    runner = runner_from_state_dict(spec, model.state_dict(), "cpu", torch.float32)
    ids = torch.randint(0, 300, (200,), generator=torch.Generator().manual_seed(1))
    assert _compare(model, runner, ids) <= 1e-4


def test_subset_forward_matches_full(tiny_runner):
    """Computing the last tokens against the cached KV of the rest equals a full pass."""
    r = tiny_runner
    ids = torch.randint(0, r.spec.vocab_size, (40,), generator=torch.Generator().manual_seed(2))
    full = r.prefill_logits(ids)
    cache = r.new_cache(40)
    cache.length = 30
    r.forward(ids[:30], torch.arange(30), cache, "causal")
    cache.length = 40
    h = r.forward(ids[30:], torch.arange(30, 40), cache, "tail")
    assert torch.allclose(r.logits(h), full[30:], atol=1e-4)
    # scattered positions under a causal mask by position give the same answer
    cache2 = r.new_cache(40)
    cache2.length = 40
    r.forward(ids, torch.arange(40), cache2, "causal")
    sel = torch.tensor([3, 17, 25, 39])
    h2 = r.forward(ids[sel], sel, cache2, "mask")
    assert torch.allclose(r.logits(h2), full[sel], atol=1e-4)


def test_share_kv_validation(tiny_runner):
    with pytest.raises(ValueError):
        tiny_runner.share_kv([0, 2, 2, 3])  # layer 1 -> later layer
    with pytest.raises(ValueError):
        tiny_runner.share_kv([0, 1])
    fp = tiny_runner.fingerprint
    tiny_runner.share_kv([0, 0, 2, 2])
    assert tiny_runner.kv_layers == (0, 2) and tiny_runner.fingerprint != fp
    assert tiny_runner.new_cache(8).k.shape[0] == 2


def test_by_position_block_mask_matches_brute_force():
    """The FlexAttention block mask built from sorted query positions marks exactly the blocks
    with some allowed (query, key) pair, and as full exactly those where every pair is allowed."""
    import numpy as np
    from workers.model_runner import by_position_block_mask
    rng = np.random.default_rng(1)
    for m, n, block in ((300, 1000, 128), (128, 256, 128), (77, 900, 64), (500, 500, 128)):
        pos = torch.as_tensor(np.sort(rng.choice(n, size=m, replace=False)))
        pos[-1] = n - 1
        bm = by_position_block_mask(pos, n, block)
        allowed = torch.arange(n)[None, :] <= pos[:, None]
        qb, kb = -(-m // block), -(-n // block)
        pad = torch.zeros(qb * block, kb * block, dtype=torch.bool)
        pad[:m, :n] = allowed
        valid = torch.zeros_like(pad)
        valid[:m, :n] = True
        tiles = pad.view(qb, block, kb, block)
        any_ = tiles.any(dim=(1, 3))
        full = (tiles | ~valid.view(qb, block, kb, block)).all(dim=(1, 3)) & any_
        got_full = torch.zeros(qb, kb, dtype=torch.bool)
        got_part = torch.zeros(qb, kb, dtype=torch.bool)
        for i in range(qb):
            got_full[i, bm.full_kv_indices[0, 0, i, :bm.full_kv_num_blocks[0, 0, i]].long()] = True
            got_part[i, bm.kv_indices[0, 0, i, :bm.kv_num_blocks[0, 0, i]].long()] = True
        assert not (got_full & got_part).any()
        assert torch.equal(got_full | got_part, any_), (m, n)
        assert not (got_full & ~full).any(), (m, n)  # a block marked full must be wholly allowed
