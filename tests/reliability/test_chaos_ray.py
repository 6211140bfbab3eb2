"""Worker actors killed (os._exit inside the actor at random phases, plus ray.kill from outside) on a
local Ray cluster while a bounded request loop runs: the short version of
benchmarks/chaos_worker_kill.py (which runs 1,000 requests; its result is in
benchmarks/results/chaos_worker_kill.json)."""
from __future__ import annotations

import asyncio
import shutil
from argparse import Namespace

import pytest

pytestmark = [pytest.mark.chaos, pytest.mark.slow]


def test_worker_kills_lose_and_duplicate_nothing(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed")
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "chaos_worker_kill.py"
    spec = importlib.util.spec_from_file_location("chaos_worker_kill", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    args = Namespace(requests=120, workers=3, concurrency=6, max_tokens=6, kill_p=0.05, external_kills=2,
                     max_minutes=10, seed=1, client_retry_s=60.0, redis_outage=False,
                     out=str(tmp_path / "chaos.json"))
    res = asyncio.run(mod.run(args))
    assert res["lost"] == 0 and res["duplicated"] == 0, res
    assert res["kills_total"] >= 3 and res["requests_retried"] >= 1
