import numpy as np
import torch

from transport.checksum import _words, device_checksums, strided_runs


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


def _one_by_one(ts):
    return [_torch_sums(t) for t in ts]


def test_blocks_of_one_buffer_are_summed_as_one_run_with_the_same_sums():
    slab = torch.randn(5, 2, 3, 64, 8).to(torch.bfloat16)  # a GPU tier's slab: [block, k/v, ...]
    ts = [slab[i, j] for i in range(5) for j in range(2)]
    assert strided_runs(ts) == [(0, 10, 3 * 64 * 8 // 4)]
    assert device_checksums(ts) == _one_by_one(ts)
    keys_then_values = [slab[i, 0] for i in range(5)] + [slab[i, 1] for i in range(5)]
    assert [r[:2] for r in strided_runs(keys_then_values)] == [(0, 5), (5, 10)]
    assert device_checksums(keys_then_values) == _one_by_one(keys_then_values)


def test_irregular_lists_fall_back_to_runs_that_still_give_each_tensors_sums():
    buf = torch.randn(4096)
    other = torch.randn(64)
    ts = [buf[0:64], buf[64:128], buf[200:264], buf[264:328],  # the distance changes at the third
          other, buf[0:64],                                      # another storage; back to the start
          buf[1:65], buf[33:97],                                 # overlapping: never one view
          buf[::2][:64],                                         # not contiguous
          buf[512:1024].to(torch.float16), buf[1024:1536].half(),  # other storages, other dtype
          torch.zeros(0)]
    runs = strided_runs(ts)
    assert runs[0] == (0, 2, 32)  # 64 float32 = 32 eight-byte words
    assert all(b - a == 1 for a, b, _ in runs[2:])
    assert device_checksums(ts) == _one_by_one(ts)


def test_a_flipped_bit_in_one_block_of_a_run_changes_only_its_sums():
    slab = torch.randn(8, 2, 2, 16, 8).to(torch.bfloat16)
    ts = [slab[i, j] for i in range(8) for j in range(2)]
    ref = device_checksums(ts)
    slab[5, 1].view(-1).view(torch.uint8)[7] ^= 4
    now = device_checksums(ts)
    assert [i for i in range(16) if now[i] != ref[i]] == [11]


def test_a_run_from_an_unaligned_start_is_refused_not_summed_from_a_copy():
    import pytest

    from transport.checksum import run_sums
    buf = torch.randn(1024)
    assert [x & (2**64 - 1) for x in run_sums(buf[1:65])[0].tolist()] == _torch_sums(buf[1:65])  # one: copied
    with pytest.raises(ValueError, match="word-aligned"):
        run_sums(buf[1:65], 2, 32)
