import numpy as np
import torch

from transport.checksum import _words, device_checksums


def _torch_sums(t):  # the formula the CUDA path runs, evaluated with torch on CPU
    w = _words(t)
    return [int(w.sum(dtype=torch.int64)) & (2**64 - 1), int(w[1::2].sum(dtype=torch.int64)) & (2**64 - 1)]


def test_numpy_path_equals_torch_formula():
    for n, dt in ((4096, torch.float32), (999, torch.bfloat16), (3, torch.float16), (5, torch.int8)):
        t = torch.randn(n).to(dt) if dt != torch.int8 else torch.randint(-100, 100, (n,), dtype=dt)
        assert device_checksums([t])[0] == _torch_sums(t)


def test_every_single_bit_flip_detected():
    rng = np.random.default_rng(0)
    t = torch.randn(2, 3, 64, 8).to(torch.bfloat16)
    ref = device_checksums([t])[0]
    raw = t.view(torch.uint8).view(-1)
    for bit in rng.choice(raw.numel() * 8, size=2000, replace=False):
        raw[bit // 8] ^= 1 << (bit % 8)
        assert device_checksums([t])[0] != ref
        raw[bit // 8] ^= 1 << (bit % 8)
    assert device_checksums([t])[0] == ref
