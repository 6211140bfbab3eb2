"""The engine's kernel options that diag_reuse_profile.py --ab times against each other in one
process, and that reuse_gpu_bench.py --variant N runs the whole benchmark with.

Each variant: (label, runner attributes, module settings as "module.NAME", lower part graphed).
"""
from __future__ import annotations

import importlib

# buckets of graphed passes without those where more rows took less time (224 vs 256 rows,
# benchmarks/results/diag/reuse_1k_h200_2026-12-04.md)
FEWER_BUCKETS = (16, 32, 64, 80, 96, 112, 128, 144, 160, 176, 192, 256, 320, 384, 448, 512, 640, 768, 896, 1024)
AB_VARIANTS = (
    ("default", {}, {}, True),
    ("layers 0..c and scoring eager", {}, {}, False),
    ("q/k/v kernel in graphs", {"qkv_kernel": True}, {}, True),
    ("subset kernel, 3 pipeline stages", {}, {"subset_attention.NUM_STAGES": 3}, True),
    ("subset kernel, one key slice <= 1k keys", {}, {"subset_attention.ONE_SPLIT_KEYS": 1024}, True),
    ("subset kernel, 4 merge rows per program", {}, {"subset_attention.MERGE_ROWS": 4}, True),
    ("token buckets of FEWER_BUCKETS", {}, {"cuda_graph.M_BUCKETS": FEWER_BUCKETS}, True),
    ("all five above", {"qkv_kernel": True}, {"subset_attention.NUM_STAGES": 3,
     "subset_attention.ONE_SPLIT_KEYS": 1024, "subset_attention.MERGE_ROWS": 4,
     "cuda_graph.M_BUCKETS": FEWER_BUCKETS}, True),
    ("subset kernel, 32-row blocks, one key slice <= 1k keys", {}, {"subset_attention.BLOCK_M": 32,
     "subset_attention.ONE_SPLIT_KEYS": 1024, "subset_attention.ONE_SPLIT_PROGRAMS": 0}, True),
    ("subset kernel, 16-row blocks, one key slice <= 1k keys", {}, {"subset_attention.BLOCK_M": 16,
     "subset_attention.ONE_SPLIT_KEYS": 1024, "subset_attention.ONE_SPLIT_PROGRAMS": 0}, True),
    ("subset kernel, 32-row blocks", {}, {"subset_attention.BLOCK_M": 32}, True),
    ("last residual add in the down projection (addmm)", {}, {"fused.ADDMM_RESIDUAL": True}, True),
    ("q/k/v kernel + 32-row blocks, one slice + addmm", {"qkv_kernel": True}, {"subset_attention.BLOCK_M": 32,
     "subset_attention.ONE_SPLIT_KEYS": 1024, "subset_attention.ONE_SPLIT_PROGRAMS": 0,
     "fused.ADDMM_RESIDUAL": True}, True),
    ("no split-key kernel: FlexAttention from 8k keys", {"subset_kernel": False}, {}, True),
    ("dense mask (SDPA) only", {"subset_kernel": False, "use_flex": False}, {}, True),
    # the q/k/v kernel is the default since 2026-12-07 (variant 2 then equals 0): this is the path before
    ("no q/k/v kernel: inductor's RoPE and index_put scatters", {"qkv_kernel": False}, {}, True),
    ("attention norm compiled with the q/k/v projection", {}, {"fused.COMPILED_QKV_NORM": True}, True),
    ("SiLU x up by workers/swiglu.py's kernel", {}, {"fused.SILU_KERNEL": True}, True),
    ("attention written token-major by the subset kernel", {}, {"subset_attention.TOKEN_MAJOR_OUT": True}, True),
    ("16 + 17 + 18", {}, {"fused.COMPILED_QKV_NORM": True, "fused.SILU_KERNEL": True,
                          "subset_attention.TOKEN_MAJOR_OUT": True}, True),
    ("16 + 17 + 18 + addmm", {}, {"fused.COMPILED_QKV_NORM": True, "fused.SILU_KERNEL": True,
                                  "subset_attention.TOKEN_MAJOR_OUT": True, "fused.ADDMM_RESIDUAL": True}, True),
    # 16-18 are the defaults since 2026-12-07 (so 16-19 then equal 0): this is the path before
    ("none of 16-18 (the defaults before 2026-12-07)", {}, {"fused.COMPILED_QKV_NORM": False,
     "fused.SILU_KERNEL": False, "subset_attention.TOKEN_MAJOR_OUT": False}, True),
    # the block merge with slices from 256 keys is the default since 2026-12-07 afternoon (it was
    # variant 23, block merge with 512-key slices variant 22): these are the paths before
    ("subset kernel, merge as a loop over rows, slices of >= 512 keys", {},
     {"subset_attention.MERGE_BLOCK": False, "subset_attention.MIN_KEYS_PER_SPLIT": 512}, True),
    ("subset kernel, block merge, slices of >= 512 keys", {}, {"subset_attention.MIN_KEYS_PER_SPLIT": 512}, True),
    ("subset kernel, block merge, slices of >= 128 keys", {}, {"subset_attention.MIN_KEYS_PER_SPLIT": 128}, True),
    # the one-token GEMV kernel (workers/gemv.py) is the default since 2026-12-07 (11:40 UTC): the path before
    ("one-token steps through cuBLAS + small kernels (no GEMV kernel)", {"gemv_kernel": False}, {}, True),
    ("GEMV kernel, one tiling for every linear", {}, {"gemv.PER_SHAPE": False}, True),
    ("one-token attention, slices from 128 keys, up to 64", {}, {"decode_attention.MIN_KEYS_PER_SPLIT": 128,
                                                                  "decode_attention.MAX_SPLITS": 64}, True),
)


def apply_variant(runner, index: int) -> str:
    """Set variant ``index`` on ``runner`` and the worker modules (before any graph is captured);
    returns its label."""
    label, r_attrs, m_attrs, graphed = AB_VARIANTS[index]
    if not graphed:
        raise ValueError(f"variant {index} ({label}) changes the engine, not the kernels")
    set_settings(runner, r_attrs, m_attrs)
    return label


def module_setting(key: str) -> tuple[object, str]:
    """"module.NAME" -> (the workers module, NAME)."""
    module, name = key.split(".")
    return importlib.import_module("workers." + module), name


def set_settings(runner, r_attrs: dict, m_attrs: dict) -> None:
    for k, val in r_attrs.items():
        setattr(runner, k, val)
    for k, val in m_attrs.items():
        setattr(*module_setting(k), val)
