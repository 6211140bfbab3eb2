"""write_qkv refuses shapes its kernel would read or write out of bounds (checked before launch,
so this runs on CPU; the kernel itself is tested in test_gpu_paths.py)."""
import pytest
import torch

from workers.qkv_write import write_qkv

H, HKV, D, M, CAP = 4, 2, 16, 5, 20


def _args(**over):
    a = dict(x=torch.zeros(M, (H + 2 * HKV) * D), cos=torch.zeros(M, D), sin=torch.zeros(M, D),
             pos=torch.arange(M), cache_k=torch.zeros(HKV, CAP, D), cache_v=torch.zeros(HKV, CAP, D),
             heads=H, kv_heads=HKV)
    a.update(over)
    return a


@pytest.mark.parametrize("over", [
    {"cos": torch.zeros(M, D // 2)},  # rope tables of another head size (read past their end)
    {"sin": torch.zeros(M + 1, D)},
    {"pos": torch.arange(M - 1)},
    {"x": torch.zeros(M, (H + HKV) * D)},  # no V heads in the projection
    {"kv_heads": HKV + 1},
    {"cache_v": torch.zeros(HKV, CAP, D // 2)},
    {"k_pre_out": torch.zeros(HKV, CAP, D // 2)},
])
def test_wrong_shapes_raise_before_the_kernel(over):
    with pytest.raises(ValueError, match="write_qkv"):
        write_qkv(**_args(**over))
