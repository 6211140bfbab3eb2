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
                                    "kvsharer_gpu_bench", "tp_gpu_check", "transport_bench"])
def test_gpu_benchmark_imports_without_service_packages(module):
    code = ("import sys\n"
            f"for m in {ABSENT!r}: sys.modules[m] = None\n"
            f"import benchmarks.{module}\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
