"""The worker on CUDA runs its engine over a static KV pool with CUDA-graph replay
(``cuda_graph_tokens`` > 0, the default) and gives the tokens and reuse counts of the eager engine
(``cuda_graph_tokens=0``): unbatched and batched; full, prefix, naive, cacheblend and dhd (whose
DHD decode recomputation decodes alone, off the pool); a prompt longer than the pool; concurrent
requests, with one too large for the batcher's paged pool taking the unbatched path beside it;
the batched paged decode step replayed from CUDA graphs against the eager step.
Skipped without a GPU; run on a GPU machine with `pytest tests/workers/test_worker_cuda_graphs.py`."""
from __future__ import annotations

import threading

import pytest
import torch

from index_service.align import align
from workers.model_loader import random_runner
from workers.model_spec import ModelSpec
from workers.scheduler import plan_to_wire

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SPEC = ModelSpec(vocab_size=1000, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=2,
                 head_dim=32, intermediate_size=512, max_position=4096)
POOL = 512  # graph pool tokens of the graphed worker; the 700-token prompt does not fit it


def _worker(name: str, graph_tokens: int, batching: bool, **kw):
    from workers.worker_actor import Worker
    r = random_runner(SPEC, "cuda", torch.float32, seed=3, std=0.1)
    opts = dict(channel="inproc", host_bytes=64 << 20, gpu_bytes=64 << 20, batching=batching,
                cuda_graph_tokens=graph_tokens, **kw)
    return Worker(name, opts, runner=r)


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(2, SPEC.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _requests() -> list[dict]:
    """A donor written as a segment, then prompts reusing it in every mode, then a long prompt."""
    doc = _ids(300, 1)
    reordered = doc[150:] + _ids(20, 2) + doc[:150] + _ids(9, 3)
    prefixed = doc[:260] + _ids(30, 4)
    reqs = [{"request_id": "donor", "token_ids": doc, "max_tokens": 12, "mode": "full", "segment_id": "doc"}]
    for i, (prompt, mode) in enumerate([(reordered, "dhd"), (reordered, "cacheblend"), (reordered, "naive"),
                                        (prefixed, "prefix"), (prefixed, "dhd")]):
        reqs.append({"request_id": f"r{i}", "token_ids": prompt, "max_tokens": 12, "mode": mode,
                     "plan": plan_to_wire(align(prompt, [("doc", doc)]))})
    reqs.append({"request_id": "long", "token_ids": _ids(700, 5), "max_tokens": 6, "mode": "full"})
    return reqs


def _same(got: dict, want: dict) -> None:
    assert got["token_ids"] == want["token_ids"], got["prefill"]
    for k in ("prompt_tokens", "reused_tokens", "recomputed_tokens", "cached_tokens"):
        assert got["prefill"][k] == want["prefill"][k], k


@pytest.mark.parametrize("batching", [False, True])
def test_graphed_worker_gives_the_eager_tokens_in_every_mode(batching):
    eager = _worker("eager", 0, batching)
    graphed = _worker("graphed", POOL, batching)
    try:
        assert eager.engine._pool is None and graphed.engine._pool is not None
        for req in _requests():
            want, got = eager.generate(dict(req)), graphed.generate(dict(req))
            _same(got, want)
            if req["request_id"] == "r0":  # dhd reuses and recomputes, and decode recomputes too
                assert 0 < got["prefill"]["recomputed_tokens"] < got["prefill"]["reused_tokens"]
                assert got["done"]["decode_recomputed"] == want["done"]["decode_recomputed"] > 0
        assert graphed.engine._graph.graphs, "the one-token step never ran as a graph"
        if batching:
            b = graphed.stats()["batching"]
            assert b["blocks_free"] == b["blocks_total"]
    finally:
        eager.shutdown()
        graphed.shutdown()


def test_concurrent_requests_beside_an_unbatched_one_share_the_pool_safely():
    """Four reuse requests meet in the batcher (whose thread owns the graph pool) while a request
    too large for the paged pool runs unbatched in its own cache at the same time."""
    eager = _worker("eager", 0, False)
    graphed = _worker("graphed", POOL, True, kv_pool_bytes=2 << 20)  # room for ~1k tokens
    try:
        reqs = _requests()
        for w in (eager, graphed):
            w.generate(dict(reqs[0]))  # the donor segment
        calls = reqs[1:5] + [dict(reqs[-1], request_id="big", token_ids=_ids(1500, 6), max_tokens=20)]
        want = [eager.generate(dict(q)) for q in calls]
        assert not graphed._batcher.fits(1500, 20)
        got: dict[int, dict] = {}
        go = threading.Barrier(len(calls))

        def call(i):
            go.wait()
            got[i] = graphed.generate(dict(calls[i]))

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(calls))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        for i, w in enumerate(want):
            _same(got[i], w)
        st = graphed.stats()["batching"]
        assert st["prefills"] == 5  # the donor and the four
        assert st["graph_steps"] > 0 and st["graph_steps"] == st["decode_steps"]  # batched steps replayed
    finally:
        eager.shutdown()
        graphed.shutdown()


def test_a_lone_request_decodes_on_the_graph_then_joins_the_batch_when_another_arrives():
    from workers.block_manager import BlockManager
    from workers.continuous_batcher import BatchRequest, ContinuousBatcher
    from workers.engine import ReuseEngine, ReuseSettings
    full = ReuseSettings(mode="full")
    mk = lambda: random_runner(SPEC, "cuda", torch.float32, seed=3, std=0.1)  # noqa: E731
    eager = ReuseEngine(mk(), settings=full)
    graphed = ReuseEngine(r := mk(), settings=full, static_tokens=POOL)
    a, b = _ids(200, 7), _ids(150, 8)
    want = [eager.generate(p, max_tokens=m, stop_ids=())[0].token_ids for p, m in ((a, 120), (b, 20))]
    batcher = ContinuousBatcher(graphed, BlockManager(r, 64, 16)).start()
    try:
        ta = batcher.submit(BatchRequest(a, 120, stop_ids=()))
        seen = 0
        for kind, _ in ta.stream(timeout=60):
            seen += kind == "token"
            if seen == 8:
                break
        tb = batcher.submit(BatchRequest(b, 20, stop_ids=()))
        assert [ta.result(60).token_ids, tb.result(60).token_ids] == want
        st = batcher.snapshot()
        assert st["solo_steps"] >= 7 and st["migrated"] == 1 and st["max_batch_seen"] == 2
        assert graphed._graph.graphs and st["blocks_free"] == st["blocks_total"]
    finally:
        batcher.stop()


@pytest.mark.parametrize("kv_source", [None, [0, 0, 2, 2]])
def test_graphed_paged_step_matches_the_eager_step_as_batch_and_widths_change(kv_source):
    from workers.block_manager import BlockManager
    from workers.engine import ReuseEngine, ReuseSettings
    from workers.paged_decode import GraphedPagedStep, paged_decode_step
    r = random_runner(SPEC, "cuda", torch.float32, seed=3, std=0.1)
    if kv_source:
        r.share_kv(kv_source)
    eng = ReuseEngine(r, settings=ReuseSettings(mode="full"))
    eager, paged = BlockManager(r, 200, 16), BlockManager(r, 201, 16)
    step = GraphedPagedStep(r, paged, max_batch=8, max_tokens=1024)
    assert paged.num_blocks == 200 and step.scratch == 200
    lens = (5, 245, 31, 600, 16)  # 245 crosses the 256-token width bucket once the 600 has left
    for i, n in enumerate(lens):
        seq, _ = eng.prefill(_ids(n, 20 + i), max_tokens=0, keep_segment=False)
        for bm in (eager, paged):
            bm.allocate(i, n)
            bm.write(i, seq.cache.k[:, :, :n], seq.cache.v[:, :, :n])
    sids = list(range(len(lens)))
    for t in range(12):
        if t == 6:  # a sequence leaves: 4 rows instead of 8
            for bm in (eager, paged):
                bm.free(3)
            sids.remove(3)
        toks = [(7 * t + 3 * i) % SPEC.vocab_size for i in sids]
        want = paged_decode_step(r, eager, sids, toks)
        assert step.fits(sids)
        got = step(sids, toks)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    for i in sids:
        assert step.scratch not in paged.tables[i]
        for a, b in zip(paged.read(i), eager.read(i)):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
    assert set(step.graphs) == {(8, 64), (4, 16), (4, 32)}  # 1,024-token width, then 256, then 512
    long_ = 1100
    paged.allocate(9, long_)
    assert not step.fits([9])  # past max_tokens: the batcher runs the eager step


def test_captured_buckets_serve_a_burst_without_new_captures():
    """After ``capture_buckets`` every batch and width a burst reaches is already a graph, and the
    replayed steps give the eager step's logits."""
    from workers.block_manager import BlockManager
    from workers.engine import ReuseEngine, ReuseSettings
    from workers.paged_decode import GraphedPagedStep, paged_decode_step
    r = random_runner(SPEC, "cuda", torch.float32, seed=3, std=0.1)
    eng = ReuseEngine(r, settings=ReuseSettings(mode="full"))
    eager, paged = BlockManager(r, 200, 16), BlockManager(r, 201, 16)
    step = GraphedPagedStep(r, paged, max_batch=6, max_tokens=1024)
    assert step.capture_buckets(600) == 12  # rows 1, 2, 4, 8 x widths 256, 512, 1,024 tokens
    held = dict(step.graphs)
    for i, n in enumerate((40, 300, 520)):
        seq, _ = eng.prefill(_ids(n, 40 + i), max_tokens=0, keep_segment=False)
        for bm in (eager, paged):
            bm.allocate(i, n)
            bm.write(i, seq.cache.k[:, :, :n], seq.cache.v[:, :, :n])
    for t in range(4):
        sids = [0, 1, 2][: 3 - t % 3]
        toks = [(5 * t + i) % SPEC.vocab_size for i in sids]
        torch.testing.assert_close(step(sids, toks), paged_decode_step(r, eager, sids, toks), atol=2e-4, rtol=1e-4)
    assert step.graphs == held


def test_a_few_row_kernel_that_fails_to_capture_leaves_the_op_by_op_graph(monkeypatch):
    from workers import gemv, paged_decode
    from workers.block_manager import BlockManager
    from workers.engine import ReuseEngine, ReuseSettings
    r = random_runner(SPEC, "cuda", torch.float32, seed=3, std=0.1)
    if not r.gemv_kernel:
        pytest.skip("no GEMV kernel here")
    monkeypatch.setattr(paged_decode, "PAGED_GEMV_ROWS", 16)

    def broken(*a, **k):
        raise RuntimeError("this kernel does not build here")
    monkeypatch.setattr(gemv, "gemv", broken)
    eng = ReuseEngine(r, settings=ReuseSettings(mode="full"))
    eager, paged = BlockManager(r, 40, 16), BlockManager(r, 41, 16)
    step = paged_decode.GraphedPagedStep(r, paged, max_batch=4, max_tokens=256)
    for i, n in enumerate((30, 70)):
        seq, _ = eng.prefill(_ids(n, 60 + i), max_tokens=0, keep_segment=False)
        for bm in (eager, paged):
            bm.allocate(i, n)
            bm.write(i, seq.cache.k[:, :, :n], seq.cache.v[:, :, :n])
    got = step([0, 1], [5, 6])
    assert paged_decode.PAGED_GEMV_ROWS == 0 and step.graphs
    torch.testing.assert_close(got, paged_decode.paged_decode_step(r, eager, [0, 1], [5, 6]), atol=2e-4, rtol=1e-4)


def test_worker_warm_up_captures_the_batched_graphs_before_serving():
    w = _worker("warm", POOL, True, kv_pool_bytes=2 << 20, max_batch=4, warmup_graph_tokens=256)
    try:
        assert set(w._batcher.graphed.graphs) == {(1, 16), (2, 16), (4, 16)}
        assert w._batcher.snapshot()["prefills"] == 0  # the warm-up's counters are gone
    finally:
        w.shutdown()


@pytest.mark.parametrize("dtype,block_size,d", [(torch.float32, 16, 32), (torch.bfloat16, 16, 128),
                                                (torch.bfloat16, 64, 128)])
def test_paged_attention_kernel_matches_gathered_sdpa(dtype, block_size, d):
    import torch.nn.functional as F
    from workers.paged_attention import paged_attend
    g = torch.Generator(device="cuda").manual_seed(0)
    B, kv_heads, group, n_blocks, width = 5, 8, 4, 300, 40
    k = torch.randn(n_blocks, kv_heads, block_size, d, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(n_blocks, kv_heads, block_size, d, device="cuda", dtype=dtype, generator=g)
    table = torch.randperm(n_blocks, device="cuda", generator=g)[:B * width].view(B, width)
    pos = torch.tensor([0, 17, block_size * width - 1, 1000 % (block_size * width), 5 * block_size],
                       device="cuda")
    qf = torch.randn(B, kv_heads, group, d, device="cuda", dtype=dtype, generator=g)
    got = paged_attend(qf, k, v, table, pos, d ** -0.5)

    def gathered(x):  # [B, Hkv, width * block_size, d]
        return x[table].transpose(1, 2).reshape(B, kv_heads, width * block_size, d)
    keys = torch.arange(width * block_size, device="cuda")
    mask = (keys[None, :] <= pos[:, None])[:, None, None, :]
    want = F.scaled_dot_product_attention(qf.float(), gathered(k).float(), gathered(v).float(), attn_mask=mask,
                                          scale=d ** -0.5).reshape(B, -1)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
