"""Tensor-parallel shards (workers/tensor_parallel.py) and the Ray worker group (workers/tp_group.py).

The equivalence tests run t real processes over gloo (torch.multiprocessing, spawn): each rank
loads the full model, keeps its shard and runs the reuse engine in lock step; the parent runs the
unsharded model and compares (float32).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time

import pytest
import torch
import torch.multiprocessing as mp

from index_service.align import align
from workers.engine import ReuseEngine, ReuseSettings
from workers.model_loader import random_runner
from workers.model_spec import ModelSpec
from workers.segments import InMemorySegmentStore
from workers.tensor_parallel import (TensorParallelError, all_reduce_fn, check_tp, free_port, init_distributed,
                                     load_shard, local_spec, shard_runner, valid_sizes)

# GQA (8 query heads over 2 KV heads), t = 2 -> 4 query heads over 1 KV head per rank
TINY_LLAMA = ModelSpec(vocab_size=257, hidden_size=64, num_layers=4, num_heads=8, num_kv_heads=2,
                       head_dim=8, intermediate_size=96, max_position=512, eos_token_ids=(1,))
# Qwen2: q/k/v biases, tied embeddings
TINY_QWEN2 = dataclasses.replace(TINY_LLAMA, num_heads=4, head_dim=16, qkv_bias=True, tie_embeddings=True,
                                 rope_theta=1e6)
SETTINGS = {"dhd": ReuseSettings(mode="dhd", recompute_ratio=0.3, check_layer=1, decode_recompute=2),
            "cacheblend": ReuseSettings(mode="cacheblend", recompute_ratio=0.3)}
TOL = 1e-4


def _build(name: str):
    if name == "smollm2":
        from workers.model_loader import load_runner
        return load_runner("smollm2-135m", dtype="float32", device="cpu")
    spec, seed = (TINY_LLAMA, 1) if name == "llama" else (TINY_QWEN2, 2)
    return random_runner(spec, "cpu", torch.float32, seed=seed, std=0.2, name=f"tiny-{name}")


def _random_prompts(seed: int) -> tuple[list[int], list[int]]:
    """A donor of three "documents" and a question; the new prompt has the documents reordered."""
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(2, 257, (n,), generator=g).tolist() for n in (24, 20, 28)]
    q = torch.randint(2, 257, (8,), generator=g).tolist()
    return docs[0] + docs[1] + docs[2] + q, docs[2] + docs[0] + docs[1] + q


def _run(runner, case: dict) -> dict:
    """Full-prefill logits, the donor's stored KV, and greedy generation with reuse per mode."""
    donor, new = case["donor"], case["new"]
    out = {"fingerprint": runner.fingerprint,
           "logits": runner.prefill_logits(torch.tensor(new, device=runner.device)).cpu()}
    engine = ReuseEngine(runner, InMemorySegmentStore())
    _, dseq = engine.generate(donor, None, max_tokens=0, settings=ReuseSettings(mode="full"), keep_segment=True)
    seg = engine.segment_of(dseq, "donor")
    engine.store.put(seg)
    out["donor_k"], out["donor_v"] = seg.keys.cpu(), seg.values.cpu()
    plan = align(new, [("donor", donor)])
    for mode in case["modes"]:
        st = SETTINGS[mode]
        res, seq = engine.generate(new, plan, max_tokens=case["max_tokens"], settings=st)
        out[mode] = {"tokens": res.token_ids, "reused": res.reused_tokens, "recomputed": res.recomputed_tokens,
                     "decode_recomputed": res.decode_recomputed, "first_logits": res.first_logits,
                     "stale": None if seq.stale is None else seq.stale.cpu()}
    return out


def _rank_main(rank: int, world: int, port: int, cases: list[dict], out_dir: str) -> None:
    torch.set_num_threads(1)
    pg, _ = init_distributed(rank, world, "127.0.0.1", port, "gloo", timeout_s=120)
    res = {}
    for case in cases:
        t0 = time.perf_counter()
        if case["name"] == "smollm2":  # only this rank's slices are read from the weights file
            shard = load_shard("smollm2-135m", rank, world, reduce=all_reduce_fn(pg), spec=case["spec"])
        else:
            shard = shard_runner(_build(case["name"]), rank, world, all_reduce_fn(pg))
        t1 = time.perf_counter()
        res[case["name"]] = _run(shard, case)
        if os.environ.get("TP_TIMING"):
            print(f"rank {rank} {case['name']}: load {t1 - t0:.1f} s, run {time.perf_counter() - t1:.1f} s", flush=True)
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def _spawn_ranks(world: int, cases: list[dict], out_dir, timeout_s: float = 240) -> list[dict]:
    ctx = mp.start_processes(_rank_main, args=(world, free_port("127.0.0.1"), cases, str(out_dir)),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"tensor-parallel ranks did not finish in {timeout_s} s")
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]


def _compare(name: str, ref: dict, ranks: list[dict], spec: ModelSpec, modes) -> None:
    t = len(ranks)
    hk = spec.num_kv_heads // t
    fps = {r["fingerprint"] for r in ranks} | {ref["fingerprint"]}
    assert len(fps) == t + 1, f"{name}: fingerprints must differ per rank and from the unsharded model"
    for r, got in enumerate(ranks):
        assert f"-tp{r}of{t}-" in got["fingerprint"]
        diff = (got["logits"] - ref["logits"]).abs().max().item()
        assert diff <= TOL, f"{name} rank {r}: logits differ by {diff}"
        assert torch.equal(got["logits"], ranks[0]["logits"]), f"{name}: ranks disagree on the logits"
        # a rank stores exactly its own KV heads of the unsharded KV
        for kv in ("donor_k", "donor_v"):
            want = ref[kv][:, r * hk:(r + 1) * hk]
            assert got[kv].shape == want.shape
            assert (got[kv] - want).abs().max().item() <= TOL, f"{name} rank {r}: {kv} differs"
        for mode in modes:
            g, w = got[mode], ref[mode]
            assert g["tokens"] == w["tokens"], f"{name} {mode} rank {r}: {g['tokens']} vs {w['tokens']}"
            assert (g["reused"], g["recomputed"], g["decode_recomputed"]) == \
                   (w["reused"], w["recomputed"], w["decode_recomputed"]), f"{name} {mode} rank {r}"
            assert w["reused"] > 0 and w["recomputed"] > 0
            # the same tokens were recomputed (prefill selection and DHD decode recomputes)
            if w["stale"] is not None:
                assert torch.equal(g["stale"], w["stale"]), f"{name} {mode} rank {r}: another selection"
            assert (g["first_logits"] - w["first_logits"]).abs().max().item() <= TOL


# ---- without processes: the split itself ------------------------------------------------------

def test_bad_shard_count_is_a_clear_error(smollm2):
    runner, _ = smollm2
    with pytest.raises(TensorParallelError, match=r"num_heads=9.*num_kv_heads=3.*\[1, 3\]"):
        shard_runner(runner, 0, 2)
    with pytest.raises(TensorParallelError, match="num_kv_heads=2"):
        check_tp(TINY_LLAMA, 4)  # 8 heads split 4 ways, but not 2 KV heads
    with pytest.raises(TensorParallelError, match=">= 1"):
        check_tp(TINY_LLAMA, 0)
    with pytest.raises(TensorParallelError, match="rank"):
        shard_runner(random_runner(TINY_LLAMA, "cpu", torch.float32), 2, 2)
    assert valid_sizes(runner.spec) == [1, 3] and valid_sizes(TINY_LLAMA) == [1, 2]
    assert local_spec(runner.spec, 3).num_kv_heads == 1 and local_spec(runner.spec, 3).intermediate_size == 512
    assert shard_runner(runner, 0, 1) is runner  # one shard is the model itself (same fingerprint)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_shards_sum_to_the_full_layer(name):
    """Without any process group: row-parallel partial outputs summed over the shards give the
    full o-proj and MLP outputs (checks the head split and the fused [gate; up] layout)."""
    full, t = _build(name), 2
    shards = [shard_runner(full, r, t) for r in range(t)]
    h = torch.randn(5, full.spec.hidden_size, generator=torch.Generator().manual_seed(0))
    for layer in (0, full.spec.num_layers - 1):
        mlp = sum(s.mlp(layer, h) for s in shards)
        assert (mlp - full.mlp(layer, h)).abs().max() <= 1e-5
        p = full.positions(torch.arange(5), "causal", 5)
        q, k, v = full.qkv(layer, h, p)
        d = full.spec.head_dim
        attn = torch.randn(5, full.spec.q_size, generator=torch.Generator().manual_seed(1))
        o_full = torch.nn.functional.linear(attn, full.layers[layer].w_o)
        hq, hk = full.spec.num_heads // t, full.spec.num_kv_heads // t
        o_sum = 0
        for r, s in enumerate(shards):
            qs, ks, vs = s.qkv(layer, h, s.positions(torch.arange(5), "causal", 5))
            assert torch.allclose(qs, q[r * hq:(r + 1) * hq], atol=1e-6)
            assert torch.allclose(ks, k[r * hk:(r + 1) * hk], atol=1e-6)
            assert torch.allclose(vs, v[r * hk:(r + 1) * hk], atol=1e-6)
            o_sum = o_sum + torch.nn.functional.linear(attn[:, r * hq * d:(r + 1) * hq * d], s.layers[layer].w_o)
        assert (o_sum - o_full).abs().max() <= 1e-5


# ---- t processes over gloo ----------------------------------------------------------------------

def test_tp_smollm2_three_ranks(smollm2, tmp_path):
    """Real weights: SmolLM2-135M (9 heads, 3 KV heads) over 3 ranks, one KV head each."""
    runner, tok = smollm2
    donor = tok("Document 1: The Loire is the longest river in France, flowing to the Atlantic. "
                "Document 2: Mount Etna is an active volcano on the east coast of Sicily. "
                "Document 3: The Danube passes through ten countries on its way to the Black Sea. "
                "Question: which river reaches the Black Sea?")["input_ids"]
    new = tok("Document 3: The Danube passes through ten countries on its way to the Black Sea. "
              "Document 1: The Loire is the longest river in France, flowing to the Atlantic. "
              "Document 2: Mount Etna is an active volcano on the east coast of Sicily. "
              "Question: which river reaches the Black Sea?")["input_ids"]
    # dhd only here (3 processes on a small CPU are slow to step); the tiny models run cacheblend too
    case = {"name": "smollm2", "donor": donor, "new": new, "max_tokens": 8, "modes": ["dhd"], "spec": runner.spec}
    ranks = _spawn_ranks(3, [case], tmp_path)
    ref = _run(runner, case)
    _compare("smollm2", ref, [r["smollm2"] for r in ranks], runner.spec, case["modes"])
    # the ranks read their slices from the file; the same shards as splitting the loaded model
    assert [r["smollm2"]["fingerprint"] for r in ranks] == [shard_runner(runner, r, 3).fingerprint for r in range(3)]


def test_tp_tiny_llama_and_qwen2_two_ranks(tmp_path):
    cases = []
    for i, name in enumerate(("llama", "qwen2")):
        donor, new = _random_prompts(i)
        cases.append({"name": name, "donor": donor, "new": new, "max_tokens": 10, "modes": list(SETTINGS)})
    ranks = _spawn_ranks(2, cases, tmp_path)
    for case in cases:
        full = _build(case["name"])
        _compare(case["name"], _run(full, case), [r[case["name"]] for r in ranks], full.spec, case["modes"])


# ---- the Ray worker group ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             object_store_memory=100 << 20)
    yield ray
    ray.shutdown()


def test_tp_worker_group_answers_like_one_worker(ray_local):
    from workers.scheduler import plan_to_wire
    from workers.tp_group import TPWorkerGroup
    from workers.worker_actor import Worker

    ray = ray_local
    make = functools.partial(random_runner, TINY_LLAMA, "cpu", torch.float32, seed=1, std=0.2, name="tiny-llama")
    opts = {"host_bytes": 64 << 20, "num_threads": 1,
            "reuse": {"mode": "dhd", "recompute_ratio": 0.3, "decode_recompute": 2}}
    group = TPWorkerGroup("w0", opts, tp_size=2, runner_fn=make, num_cpus=1)
    try:
        single = Worker("w0", opts, runner=make())
        info = group.info
        assert info["tp_size"] == 2 and len(set(info["tp_fingerprints"])) == 2
        assert info["fingerprint"] != single.fingerprint
        donor, new = _random_prompts(0)
        first = {"token_ids": donor, "max_tokens": 6, "segment_id": "d1", "request_id": "r1"}
        a, b = group.generate(first), single.generate(first)
        assert a["token_ids"] == b["token_ids"] and len(a["token_ids"]) == 6
        assert a["done"]["segment_id"] == "d1"
        follow = {"token_ids": new, "max_tokens": 8, "mode": "dhd",
                  "plan": plan_to_wire(align(new, [("d1", donor)]))}
        a, b = group.generate(follow), single.generate(follow)
        assert a["token_ids"] == b["token_ids"]
        for key in ("reused_tokens", "recomputed_tokens"):
            assert a["prefill"][key] == b["prefill"][key] > 0, key
        assert a["done"]["decode_recomputed"] == b["done"]["decode_recomputed"] > 0
        # a cancel reaches the leader only; every rank stops at the same step (no rank left waiting)
        ray.get(group.leader.cancel.remote("c1"))
        a = group.generate(dict(follow, request_id="c1"))
        assert a["done"]["finish_reason"] == "cancelled" and a["token_ids"] == []
        assert group.generate(dict(follow, request_id="c1"))["token_ids"] == b["token_ids"]
        # a donor that one rank lacks is dropped on every rank: the prompt is computed in full
        follower = ray.get(group.leader.followers.remote())[0]
        assert ray.get(follower.drop_segment.remote("d1"))
        a = group.generate(follow)
        full = single.generate(dict(follow, plan=None))
        assert a["prefill"]["reused_tokens"] == 0 and a["prefill"]["fetch"]["dropped"] == ["d1"]
        assert a["token_ids"] == full["token_ids"]
        single.shutdown()
    finally:
        group.shutdown()


@pytest.mark.slow
def test_ray_cluster_runs_tensor_parallel_workers(smollm2, ray_local):
    """model.tensor_parallel_size = 3: the cluster's one worker is a group of 3 SmolLM2 shards; the
    router and scheduler see one worker and get the unsharded model's tokens."""
    import asyncio

    from kvcluster.ray_client import RayCluster
    from workers.scheduler import RouterRequest

    runner, tok = smollm2
    ids = tok("The three primary colours of light are")["input_ids"]
    want, _ = ReuseEngine(runner).generate(ids, None, max_tokens=8, settings=ReuseSettings(mode="full"))
    cluster = None
    try:
        cfg = {"model": {"device": "cpu", "tensor_parallel_size": 3}, "reuse": {"mode": "full"},
               "cluster": {"num_workers": 1}}
        cluster = RayCluster(cfg, worker_num_cpus=0.5)  # 3 ranks in ray_local's 2 CPUs
        info = cluster.infos["w0"]
        assert info["tp_size"] == 3 and cluster.scheduler.workers == ["w0"]
        out = asyncio.run(cluster.router.generate(RouterRequest(token_ids=ids, max_tokens=8, write_back=False)))
        assert out["token_ids"] == want.token_ids
    finally:
        if cluster is not None:
            cluster.shutdown()
