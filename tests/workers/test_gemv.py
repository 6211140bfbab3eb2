"""The one-token GEMV kernel (workers/gemv.py) against torch ops: plain, with the RMSNorm
prologue, the SiLU x up and residual epilogues, a bias, and shapes that do not fill its tiles.
CUDA only; on a CPU the same tests run in Triton's interpreter with TRITON_INTERPRET=1 (float32)."""
import os

import pytest
import torch
import torch.nn.functional as F

from workers import gemv

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(gemv.triton is None or not (torch.cuda.is_available() or INTERPRET),
                                 reason="needs Triton on CUDA (or its interpreter)")]
DTYPES = [torch.float32] + ([torch.bfloat16] if DEV == "cuda" else [])
TILINGS = [None, gemv.DEFAULT_TILING, gemv.GemvTiling(block_n=4, block_k=128, warps=2, stages=3)]  # None: per shape


def _reference(x, w, norm_w=None, eps=1e-5, glu=False, residual=None, bias=None):
    if norm_w is not None:
        x = F.rms_norm(x, (x.shape[-1],), norm_w, eps)
    y = F.linear(x, w, bias)
    if glu:
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    return residual + y if residual is not None else y


def _tensors(k, n, dtype, seed=0, m=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(DEV, dtype)
    w = (torch.randn(n, k, generator=g) * k ** -0.5).to(DEV, dtype)
    return x, w, g


def _close(got, want, dtype):
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert got.shape == want.shape and got.dtype == want.dtype
    err = (got.float() - want.float()).abs().max().item()
    assert err <= tol * max(1.0, want.float().abs().max().item()), err


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tiling", TILINGS)
@pytest.mark.parametrize("k,n", [(512, 64), (320, 100), (1024, 24)])
def test_plain_gemv(dtype, tiling, k, n):
    x, w, _ = _tensors(k, n, dtype)
    _close(gemv.gemv(x, w, tiling=tiling), _reference(x, w), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tiling", TILINGS)
def test_norm_glu_matches_norm_linear_silu_mul(dtype, tiling):
    x, w, g = _tensors(384, 2 * 72, dtype, seed=1)
    x = x * 3.0  # the norm has something to undo
    nw = (1 + 0.1 * torch.randn(384, generator=g)).to(DEV, dtype)
    got = gemv.gemv(x, w, norm_w=nw, eps=1e-5, glu=True, tiling=tiling)
    _close(got, _reference(x, w, norm_w=nw, glu=True), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_residual_and_bias(dtype):
    x, w, g = _tensors(256, 96, dtype, seed=2)
    res = torch.randn(1, 96, generator=g).to(DEV, dtype)
    b = torch.randn(96, generator=g).to(DEV, dtype)
    _close(gemv.gemv(x, w, residual=res), _reference(x, w, residual=res), dtype)
    nw = torch.rand(256, generator=g).to(DEV, dtype) + 0.5
    _close(gemv.gemv(x, w, norm_w=nw, eps=1e-6, bias=b), _reference(x, w, norm_w=nw, eps=1e-6, bias=b), dtype)


def test_glu_with_bias_uses_each_half_of_the_bias():
    x, w, g = _tensors(128, 2 * 40, torch.float32, seed=3)
    b = torch.randn(80, generator=g).to(DEV)
    _close(gemv.gemv(x, w, glu=True, bias=b), _reference(x, w, glu=True, bias=b), torch.float32)


def test_shapes_that_do_not_fit_are_refused():
    x, w, _ = _tensors(128, 33, torch.float32)
    with pytest.raises(ValueError, match="even row count"):
        gemv.gemv(x, w, glu=True)
    with pytest.raises(ValueError, match="residual"):
        gemv.gemv(x, w, residual=torch.zeros(1, 32, device=DEV))
    with pytest.raises(ValueError, match="norm weight"):
        gemv.gemv(x, w, norm_w=torch.ones(64, device=DEV))
    assert not gemv.supports(torch.zeros(2, 128, device=DEV), w)  # one row unless asked for more
    assert gemv.supports(torch.zeros(16, 128, device=DEV), w, max_rows=16)
    assert not gemv.supports(torch.zeros(17, 128, device=DEV), w, max_rows=32)
    with pytest.raises(ValueError, match="1..16"):
        gemv.gemv(torch.zeros(17, 128, device=DEV), w)
    with pytest.raises(ValueError, match=r"residual .* \[3, 33\]"):
        gemv.gemv(torch.zeros(3, 128, device=DEV), w, residual=torch.zeros(1, 33, device=DEV))


def test_tiling_per_shape():
    """The measured tilings of the 8B model's linears; one tiling for all when PER_SHAPE is off."""
    assert gemv.tiling_for(14336, 4096, glu=True).block_n == 16
    assert gemv.tiling_for(4096, 4096, glu=False).block_n == 4
    assert gemv.tiling_for(4096, 14336, glu=False).block_k == 1024
    assert gemv.tiling_for(6144, 4096, glu=False) == gemv.GemvTiling(8, 512, 4, 3)
    try:
        gemv.PER_SHAPE = False
        assert gemv.tiling_for(4096, 4096, glu=False) == gemv.DEFAULT_TILING
    finally:
        gemv.PER_SHAPE = True


@pytest.mark.parametrize("k,n,norm,glu,res", [(576, 2 * 1536, True, True, False), (1536, 576, False, False, True),
                                              (576, 960, True, False, False)])
def test_smollm2_shapes(k, n, norm, glu, res):
    """SmolLM2-135M's linears (hidden 576, not a multiple of the K slices; intermediate 1536), with
    the per-shape tiling the engine picks."""
    x, w, g = _tensors(k, n, torch.float32, seed=4)
    nw = (torch.rand(k, generator=g) + 0.5).to(DEV) if norm else None
    h = torch.randn(1, n // 2 if glu else n, generator=g).to(DEV) if res else None
    got = gemv.gemv(x, w, norm_w=nw, eps=1e-5, glu=glu, residual=h)
    _close(got, _reference(x, w, norm_w=nw, glu=glu, residual=h), torch.float32)


ROWS_TILINGS = [None, gemv.GemvTiling(16, 64, 4, 2), gemv.GemvTiling(32, 128, 4, 3)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [2, 5, 16])
@pytest.mark.parametrize("tiling", ROWS_TILINGS)
def test_few_rows_plain_and_with_norm_glu(dtype, m, tiling):
    """2..16 rows (a batched decode step) through the few-row kernel: each weight read once."""
    x, w, g = _tensors(320, 2 * 72, dtype, seed=5, m=m)  # K = 320: not a multiple of the K slices
    _close(gemv.gemv(x, w, tiling=tiling), _reference(x, w), dtype)
    x = x * 3.0
    nw = (1 + 0.1 * torch.randn(320, generator=g)).to(DEV, dtype)
    _close(gemv.gemv(x, w, norm_w=nw, eps=1e-5, glu=True, tiling=tiling), _reference(x, w, norm_w=nw, glu=True), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [3, 8])
def test_few_rows_residual_and_bias(dtype, m):
    x, w, g = _tensors(256, 96, dtype, seed=6, m=m)
    res = torch.randn(m, 96, generator=g).to(DEV, dtype)
    b = torch.randn(96, generator=g).to(DEV, dtype)
    _close(gemv.gemv(x, w, residual=res), _reference(x, w, residual=res), dtype)
    nw = torch.rand(256, generator=g).to(DEV, dtype) + 0.5
    _close(gemv.gemv(x, w, norm_w=nw, eps=1e-6, bias=b), _reference(x, w, norm_w=nw, eps=1e-6, bias=b), dtype)
