"""The batched decode step's few-row path (workers/paged_decode.py ``_few_row_layers``: linears by
the GEMV kernels, K/V into the blocks by the q/k/v kernel, attention by the paged kernel) gives the
logits and block contents of the op-by-op step, with and without a KVSharer map, at 1, 4 and 16
rows. CUDA only; on a CPU it runs in Triton's interpreter with TRITON_INTERPRET=1 (float32)."""
import os

import pytest
import torch

from workers import gemv, paged_decode
from workers.block_manager import BlockManager
from workers.engine import ReuseEngine, ReuseSettings
from workers.model_loader import random_runner
from workers.model_spec import ModelSpec

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(gemv.triton is None or not (torch.cuda.is_available() or INTERPRET),
                                 reason="needs Triton on CUDA (or its interpreter)")]
SPEC = ModelSpec(vocab_size=300, hidden_size=128, num_layers=4, num_heads=8, num_kv_heads=2,
                 head_dim=16, intermediate_size=256, max_position=4096)


@pytest.mark.parametrize("kv_source", [None, [0, 0, 2, 2]])
@pytest.mark.parametrize("batch", [1, 4, 16])
def test_few_row_step_matches_the_op_by_op_step(kv_source, batch, monkeypatch):
    monkeypatch.setattr(paged_decode, "kernel_available", lambda t: True)  # the paged kernel on CPU too
    monkeypatch.setattr(paged_decode, "PAGED_GEMV_ROWS", 16)
    r = random_runner(SPEC, DEV, torch.float32, seed=3, std=0.1)
    if kv_source:
        r.share_kv(kv_source)
    r.gemv_kernel = r.qkv_kernel = r.fuse = True  # as inside a graph capture on CUDA
    eng = ReuseEngine(r, settings=ReuseSettings(mode="full"))
    ref, fast = BlockManager(r, 4 * batch + 4, 16), BlockManager(r, 4 * batch + 4, 16)
    g = torch.Generator().manual_seed(batch)
    lens = [int(x) for x in torch.randint(1, 45, (batch,), generator=g)]
    for i, n in enumerate(lens):
        seq, _ = eng.prefill(torch.randint(2, 300, (n,), generator=g).tolist(), max_tokens=0, keep_segment=False)
        for bm in (ref, fast):
            bm.allocate(i, n)
            bm.write(i, seq.cache.k[:, :, :n], seq.cache.v[:, :, :n])
    sids = list(range(batch))
    for t in range(3):
        toks = [(7 * t + 3 * i) % SPEC.vocab_size for i in sids]
        want = paged_decode.paged_decode_step(r, ref, sids, toks)  # not fusing: op by op
        with r.fusing():
            assert r.few_row_kernels(batch)
            got = paged_decode.paged_decode_step(r, fast, sids, toks)
        torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-5)
    for i in sids:
        for a, b in zip(fast.read(i), ref.read(i)):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def test_more_rows_than_the_kernel_takes_stay_op_by_op():
    r = random_runner(SPEC, DEV, torch.float32, seed=3, std=0.1)
    r.gemv_kernel = r.qkv_kernel = r.fuse = True
    with r.fusing():
        assert r.few_row_kernels(16) and not r.few_row_kernels(17)
    assert not r.few_row_kernels(4)  # outside a capture


def test_a_failed_few_row_capture_turns_the_path_off_once(monkeypatch):
    r = random_runner(SPEC, DEV, torch.float32, seed=3, std=0.1)
    r.gemv_kernel = r.qkv_kernel = r.fuse = True
    monkeypatch.setattr(paged_decode, "PAGED_GEMV_ROWS", 16)
    assert paged_decode._drop_few_rows(r, 4, RuntimeError("no kernel"))
    assert paged_decode.PAGED_GEMV_ROWS == 0
    assert not paged_decode._drop_few_rows(r, 4, RuntimeError("out of memory"))  # not the kernels: give up
