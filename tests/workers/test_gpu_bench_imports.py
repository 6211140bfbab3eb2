"""The GPU benchmarks import with what the lent GPU machines have (torch, numpy, msgpack, xxhash):
no rapidfuzz, Redis, Ray, Qdrant or UCX. A missing import there costs a whole device call."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ABSENT = ["rapidfuzz", "rapidfuzz.distance", "redis", "hiredis", "ray", "qdrant_client",
          "sentence_transformers", "ucxx", "transformers"]


@pytest.mark.parametrize("module", ["reuse_gpu_bench", "diag_reuse_profile", "qps_gpu_bench",
                                    "kvsharer_gpu_bench", "tp_gpu_check", "transport_bench", "pick_variant",
                                    "diag_small_pass", "diag_skinny_gemm", "diag_gemv", "diag_gemv_rows",
                                    "diag_linear_orientation", "worker_gpu_bench", "diag_worker_reuse", "diag_worker_burst",
                                    "paged_decode_gpu_bench"])
def test_gpu_benchmark_imports_without_service_packages(module):
    code = ("import sys\n"
            f"for m in {ABSENT!r}: sys.modules[m] = None\n"
            f"import benchmarks.{module}\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_every_variant_applies_to_a_runner_and_names_real_settings():
    """Each kernel option of the A/B sets attributes that exist (a typo would silently time the
    defaults), and --variant N applies it before any graph is captured."""
    import torch

    from benchmarks.variants import AB_VARIANTS, apply_variant, module_setting
    from workers.model_loader import random_runner
    from workers.model_spec import ModelSpec
    spec = ModelSpec(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                     intermediate_size=64, max_position=128)
    for i, (label, r_attrs, m_attrs, graphed) in enumerate(AB_VARIANTS):
        runner = random_runner(spec, "cpu", torch.float32)
        for k in r_attrs:
            assert hasattr(runner, k), (label, k)
        saved = {}
        for k in m_attrs:
            mod, name = module_setting(k)
            assert hasattr(mod, name), (label, k)
            saved[(mod, name)] = getattr(mod, name)
        try:
            if graphed:
                assert apply_variant(runner, i) == label
                assert all(getattr(runner, k) == v for k, v in r_attrs.items())
            else:
                with pytest.raises(ValueError):
                    apply_variant(runner, i)
        finally:
            for (mod, name), v in saved.items():
                setattr(mod, name, v)


def test_pick_variant_keeps_the_defaults_unless_one_is_faster_everywhere():
    from benchmarks.pick_variant import pick

    def run(**ms):
        return {"variants": {k.lstrip("v"): {"ms": t} for k, t in ms.items()}}
    a = run(v0=10.0, v2=9.5, v6=9.9, v8=9.0)
    b = run(v0=10.0, v2=9.6, v6=9.7, v8=10.1)
    assert pick([a, b], 0.02) == (2, pytest.approx(0.955))  # 8 is slower in b
    assert pick([a, b], 0.05)[0] == 0  # 2 is within the margin
    assert pick([run(v2=1.0)], 0.02) == (0, 1.0)  # no default timed: keep it
