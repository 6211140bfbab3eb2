"""Continuous batching over paged KV blocks: requests of different lengths decoded together give
the tokens each gives alone (ReuseEngine.generate), reuse stats survive, requests join and leave
mid-batch, block exhaustion waits (or swaps out) instead of failing, cancellation frees blocks, and
the worker (in process and as a Ray actor) batches concurrent requests."""
from __future__ import annotations

import threading

import pytest
import torch

from index_service.align import align
from workers.block_manager import BlockManager, OutOfBlocksError
from workers.continuous_batcher import BatchRequest, ContinuousBatcher
from workers.engine import ReuseEngine, ReuseSettings
from workers.model_loader import random_runner
from workers.model_spec import ModelSpec
from workers.paged_decode import paged_decode_step
from workers.segments import InMemorySegmentStore
from tests.workers.one_thread import one_torch_thread  # noqa: F401 (autouse: one torch thread)

SPEC = ModelSpec(vocab_size=257, hidden_size=64, num_layers=6, num_heads=4, num_kv_heads=2,
                 head_dim=16, intermediate_size=128, max_position=1024, eos_token_ids=(1,))
MAP = [0, 0, 2, 2, 4, 2]  # KVSharer: layers 1, 3, 5 read the KV of layers 0, 2, 2
FULL = ReuseSettings(mode="full")



def tiny(kv_source=None, dtype=torch.float64):
    r = random_runner(SPEC, "cpu", dtype, seed=3, std=0.15)
    if kv_source:
        r.share_kv(kv_source)
    return r


def ids(n, seed):
    return torch.randint(2, SPEC.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def alone(eng, prompt, max_tokens, **kw):
    kw.setdefault("stop_ids", ())
    kw.setdefault("settings", FULL)
    return eng.generate(prompt, max_tokens=max_tokens, **kw)[0]


def batched(eng, reqs, **kw):
    b = ContinuousBatcher(eng, **kw)
    tickets = [b.submit(r) for r in reqs]
    b.run()
    return b, [t.result() for t in tickets]


# ---- the block pool ---------------------------------------------------------------------------
def test_block_manager_allocates_appends_frees_and_refuses_clearly():
    r = tiny(MAP)
    bm = BlockManager(r, num_blocks=5, block_size=4)
    assert bm.k.shape == (len(r.kv_layers), 5, 2, 4, 16) and len(r.kv_layers) == 3
    assert bm.allocate(7, 6) == [0, 1] and bm.free_blocks == 3
    assert bm.append(7) == (1, 2) and bm.append(7) == (1, 3)
    assert bm.append(7) == (2, 0) and bm.free_blocks == 2  # crossed into a new block
    with pytest.raises(OutOfBlocksError, match="needs 3 blocks"):
        bm.allocate(8, 9)
    assert bm.can_allocate(8) and not bm.can_allocate(9)
    bm.free(7)
    assert bm.free_blocks == 5
    k = torch.randn(3, 2, 9, 16, dtype=r.dtype)
    v = torch.randn(3, 2, 9, 16, dtype=r.dtype)
    bm.allocate(8, 8)
    bm.append(8)
    bm.write(8, k, v)
    k2, v2 = bm.read(8)
    assert torch.equal(k2, k) and torch.equal(v2, v)
    kk, _ = bm.gather(1, bm.table_tensor([8]))
    assert torch.equal(kk[0, :, :9], k[1])
    bm.free(8)
    assert bm.free_blocks == 5 and not bm.tables
    bm.allocate(9, 1)
    with pytest.raises(OutOfBlocksError, match="none is free"):
        for _ in range(5 * 4):
            bm.append(9)
    assert bm.lengths[9] == 20 and bm.free_blocks == 0


@pytest.mark.parametrize("kv_source", [None, MAP])
def test_paged_step_logits_match_single_sequence_decode(kv_source):
    r = tiny(kv_source)
    eng = ReuseEngine(r, settings=FULL)
    bm = BlockManager(r, 64, 8)
    prompts = [ids(n, s) for n, s in ((5, 1), (17, 2), (8, 3), (30, 4))]
    seqs = []
    for i, p in enumerate(prompts):
        seq, _ = eng.prefill(p, max_tokens=4)
        bm.allocate(i, len(p))
        bm.write(i, seq.cache.k[:, :, :len(p)], seq.cache.v[:, :, :len(p)])
        seqs.append(seq)
    for step in range(3):
        toks = [11 + step + i for i in range(len(seqs))]
        got = paged_decode_step(r, bm, list(range(len(seqs))), toks)
        for i, seq in enumerate(seqs):
            assert torch.allclose(got[i], eng.decode_step(seq, toks[i]), atol=1e-10)


def test_scratch_block_leaves_the_pool_once_and_only_before_any_sequence():
    r = tiny()
    bm = BlockManager(r, num_blocks=4, block_size=4)
    s = bm.reserve_scratch()
    assert bm.reserve_scratch() == s and bm.num_blocks == 3 and bm.free_blocks == 3
    assert s not in bm.allocate(1, 12)  # every other block goes to sequences, never the scratch one
    with pytest.raises(OutOfBlocksError):
        bm.append(1)
    late = BlockManager(r, 4, 4)
    late.allocate(1, 1)
    with pytest.raises(RuntimeError, match="before any sequence"):
        late.reserve_scratch()
    with pytest.raises(OutOfBlocksError, match="one block"):
        BlockManager(r, 1, 4).reserve_scratch()


def test_graph_buckets_pad_rows_and_widths_to_few_shapes():
    from workers.paged_decode import batch_bucket, width_bucket
    assert [batch_bucket(b) for b in (1, 2, 3, 5, 8, 9, 16, 17, 33)] == [1, 2, 4, 8, 8, 16, 16, 24, 40]
    # widths in blocks of 16 tokens: 256, 512, 1024 tokens, then multiples of 1024
    assert [width_bucket(n, 16) for n in (1, 16, 17, 33, 64, 65, 128, 129)] == [16, 16, 32, 64, 64, 128, 128, 192]
    assert width_bucket(1, 64) == 4 and width_bucket(17, 64) == 32  # 1,088 tokens -> 2,048


def test_capture_buckets_asks_for_every_row_and_width_bucket_within_the_limits(monkeypatch):
    from workers.paged_decode import GraphedPagedStep
    r = tiny()
    step = GraphedPagedStep(r, BlockManager(r, 300, 16), max_batch=20, max_tokens=3000)
    asked = []
    monkeypatch.setattr(step, "_graph", lambda rows, width: asked.append((rows, width)) or step.graphs.setdefault((rows, width), None))
    assert step.capture_buckets(2000) == 6 * 4  # rows 1, 2, 4, 8, 16, 24; 256, 512, 1,024, 2,048 tokens
    assert sorted(asked) == [(r_, w) for r_ in (1, 2, 4, 8, 16, 24) for w in (16, 32, 64, 128)]
    asked.clear()
    step.capture_buckets(10**6)  # never past the step's own width limit (3,072 tokens)
    assert max(w for _, w in asked) == step.max_width == 192


def test_a_bucket_whose_capture_fails_runs_eager_and_is_tried_again_later(monkeypatch):
    """A failed capture bars only its bucket, for 10 s, then 20 s, and for good after 3 failures;
    capture_buckets logs a failing bucket and goes on with the others."""
    from workers import paged_decode
    r = tiny()
    bm = BlockManager(r, 64, 16)
    step = paged_decode.GraphedPagedStep(r, bm, max_batch=4, max_tokens=500)
    bm.allocate(0, 20)
    bm.allocate(1, 300)
    clock = [1000.0]
    monkeypatch.setattr(paged_decode.time, "monotonic", lambda: clock[0])
    small = step._bucket([0])

    def capture(rows, width):
        if (rows, width) == small:
            raise RuntimeError("CUDA out of memory")
        return "graph"
    monkeypatch.setattr(step, "_capture", capture)
    assert step.capture_buckets(500) == len(step.graphs) == 3 * 2 - 1  # rows 1, 2, 4 x 2 widths
    assert step.fits([1]) and step.fits([0, 1]) and not step.fits([0])
    for wait, said in ((10, "again in 20 s"), (20, "from now on")):
        clock[0] += wait - 0.1
        assert not step.fits([0])
        clock[0] += 0.1
        assert step.fits([0])
        with pytest.raises(paged_decode.GraphCaptureError, match=said):
            step([0], [5])
    clock[0] += 10**6
    assert not step.fits([0]) and step.failed[small][0] == paged_decode.CAPTURE_TRIES


def test_a_failed_capture_runs_that_step_eager_and_keeps_the_graphs(monkeypatch):
    from workers.paged_decode import GraphCaptureError
    eng = ReuseEngine(tiny(dtype=torch.float32), settings=FULL)
    prompt = ids(9, 4)
    want = alone(eng, prompt, 6).token_ids

    class Failing:  # a graphed step whose captures fail (as after an out-of-memory)
        tries = 0

        def fits(self, sids):
            return True

        def __call__(self, sids, tokens):
            self.tries += 1
            raise GraphCaptureError("capturing the paged decode step failed: out of memory")

    b = ContinuousBatcher(eng, blocks=BlockManager(eng.runner, 16, 16))
    b.graphed = g = Failing()
    t = b.submit(BatchRequest(prompt, 6, stop_ids=()))
    b.run()
    assert t.result().token_ids == want
    assert b.graphed is g and g.tries == b.stats["capture_failures"] == b.stats["decode_steps"] > 0


def test_the_batcher_graphs_nothing_on_cpu():
    b = ContinuousBatcher(ReuseEngine(tiny(), settings=FULL), blocks=BlockManager(tiny(), 8, 4))
    assert b.graphed is None and b.blocks.scratch is None and b.blocks.num_blocks == 8


# ---- batching = each request alone ------------------------------------------------------------
@pytest.mark.parametrize("kv_source", [None, MAP])
def test_different_lengths_join_and_leave_mid_batch_and_match_alone(kv_source):
    r = tiny(kv_source, torch.float32)
    eng = ReuseEngine(r, settings=FULL)
    lens, mts = (5, 40, 17, 9, 63, 2, 30), (12, 3, 25, 1, 8, 20, 0)
    prompts = [ids(n, 10 + n) for n in lens]
    want = [alone(eng, p, m).token_ids for p, m in zip(prompts, mts)]
    b, got = batched(eng, [BatchRequest(p, m, stop_ids=()) for p, m in zip(prompts, mts)], max_batch=3,
                     blocks=BlockManager(r, 64, 16))
    assert [g.token_ids for g in got] == want
    assert [g.prompt_tokens for g in got] == list(lens)
    assert b.stats["max_batch_seen"] == 3 and len(b.stats["batch_sizes"]) >= 2  # sizes changed
    assert b.blocks.free_blocks == 64 and not b.running and not b.waiting


def test_stop_ids_end_a_request_early_and_free_its_blocks():
    r = tiny()
    eng = ReuseEngine(r, settings=FULL)
    prompts = [ids(12, 1), ids(20, 2)]
    free_run = [alone(eng, p, 10).token_ids for p in prompts]
    stop = free_run[0][4]
    want = [alone(eng, p, 10, stop_ids=(stop,)) for p in prompts]
    b, got = batched(eng, [BatchRequest(p, 10, stop_ids=(stop,)) for p in prompts])
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert got[0].finish_reason == "stop" and got[0].token_ids[-1] == stop
    assert b.blocks.used_blocks == 0


def test_sampling_is_per_request_and_seeded_like_alone():
    r = tiny()
    eng = ReuseEngine(r, settings=FULL)
    cases = [(ids(9, 1), 0.8, 0.9, 5), (ids(21, 2), 1.2, 1.0, 6), (ids(14, 3), 0.0, 1.0, None)]
    want = [alone(eng, p, 12, temperature=t, top_p=tp, seed=s).token_ids for p, t, tp, s in cases]
    _, got = batched(eng, [BatchRequest(p, 12, temperature=t, top_p=tp, seed=s, stop_ids=())
                           for p, t, tp, s in cases])
    assert [g.token_ids for g in got] == want


def test_streaming_events_and_token_callback():
    r = tiny()
    eng = ReuseEngine(r, settings=FULL)
    seen: list[int] = []
    b = ContinuousBatcher(eng)
    t = b.submit(BatchRequest(ids(10, 4), 5, stop_ids=(), on_token=seen.append))
    b.run()
    events = list(t.stream(timeout=1))
    assert [k for k, _ in events] == ["prefill", "token", "token", "token", "token", "token", "done"]
    assert [v for k, v in events if k == "token"] == seen == t.token_ids
    assert events[0][1].prompt_tokens == 10 and events[-1][1] == "length"


# ---- blocks run out ---------------------------------------------------------------------------
def test_block_exhaustion_waits_then_admits_and_frees_everything():
    r = tiny()
    eng = ReuseEngine(r, settings=FULL)
    prompts = [ids(n, n) for n in (20, 25, 18, 30)]
    want = [alone(eng, p, 12).token_ids for p in prompts]
    # 12 blocks of 4 tokens: two prompts at a time at most, not four
    b, got = batched(eng, [BatchRequest(p, 12, stop_ids=()) for p in prompts],
                     blocks=BlockManager(r, 12, 4), max_batch=8)
    assert [g.token_ids for g in got] == want
    assert b.stats["max_batch_seen"] < 4
    assert b.blocks.free_blocks == 12 and not b.blocks.tables


def test_decode_out_of_blocks_swaps_the_newest_out_and_back_exactly():
    r = tiny()
    eng = ReuseEngine(r, settings=FULL)
    prompts = [ids(15, 1), ids(15, 2), ids(15, 3)]
    want = [alone(eng, p, 20).token_ids for p in prompts]
    # each prompt takes 4 of 4-token blocks and grows by 5 more: all three fit at admission, not later
    b, got = batched(eng, [BatchRequest(p, 20, stop_ids=()) for p in prompts],
                     blocks=BlockManager(r, 16, 4), max_batch=8)
    assert [g.token_ids for g in got] == want
    assert b.stats["preempted"] >= 1
    assert b.blocks.free_blocks == 16


def test_a_request_larger_than_the_pool_is_refused_at_submit():
    r = tiny()
    b = ContinuousBatcher(ReuseEngine(r, settings=FULL), blocks=BlockManager(r, 4, 4))
    assert b.fits(10, 7) and not b.fits(10, 8)  # the last new token's KV is never needed
    assert b.fits(100, 1)  # one token comes from the prefill: no blocks at all
    with pytest.raises(OutOfBlocksError, match="the KV pool has 4"):
        b.submit(BatchRequest(ids(10, 1), 8))


def test_zero_or_one_new_token_needs_no_blocks_and_stop_fails_what_is_left():
    r = tiny()
    eng = ReuseEngine(r, settings=FULL)
    b = ContinuousBatcher(eng, blocks=BlockManager(r, 4, 4))
    p = ids(40, 1)  # more than the pool holds
    t0 = b.submit(BatchRequest(p, 0))
    t1 = b.submit(BatchRequest(p, 1, stop_ids=()))
    b.run()
    assert t0.result().token_ids == [] and t0.result().prompt_tokens == 40
    assert t1.result().token_ids == alone(eng, p, 1).token_ids
    t2 = b.submit(BatchRequest(p[:5], 3))
    b.stop()
    with pytest.raises(RuntimeError, match="stopped"):
        t2.result(timeout=1)


def test_cancel_running_and_waiting_requests_frees_their_blocks():
    r = tiny()
    eng = ReuseEngine(r, settings=FULL)
    b = ContinuousBatcher(eng, blocks=BlockManager(r, 32, 4), max_batch=2)
    t = [b.submit(BatchRequest(ids(10 + i, i), 30, stop_ids=(), request_id=f"r{i}")) for i in range(3)]
    for _ in range(3):
        b.step()
    assert len(b.running) == 2 and len(b.waiting) == 1 and b.blocks.used_blocks > 0
    b.cancel("r0")
    b.cancel("r2")  # still waiting
    b.step()
    assert t[0].finish_reason == "cancelled" and t[2].finish_reason == "cancelled"
    assert t[2].token_ids == [] and len(t[0].token_ids) == 4
    assert len(b.running) == 1 and b.blocks.used_blocks == b.blocks.blocks_for(11 + 4)
    b.run()
    assert t[1].result().token_ids == alone(eng, ids(11, 1), 30).token_ids
    assert b.blocks.free_blocks == 32


# ---- reuse ------------------------------------------------------------------------------------
def _with_donor(r):
    eng = ReuseEngine(r, InMemorySegmentStore(), settings=FULL)
    donor = ids(120, 7)
    _, seq = eng.generate(donor, None, 0, settings=FULL, keep_segment=True)
    eng.store.put(eng.segment_of(seq, "d"))
    return eng, donor


def test_reuse_plans_keep_their_stats_and_tokens_and_dhd_decode_runs_alone_then_joins():
    r = tiny(dtype=torch.float32)
    eng, donor = _with_donor(r)
    news = [donor[60:] + donor[:60], donor[:40] + ids(10, 9) + donor[40:], donor[30:] + donor[:30], ids(33, 5)]
    cases = [(news[0], ReuseSettings(mode="dhd", recompute_ratio=0.2, decode_recompute=0), 10),
             (news[1], ReuseSettings(mode="cacheblend", recompute_ratio=0.15), 14),
             (news[2], ReuseSettings(mode="dhd", recompute_ratio=0.2, decode_recompute=3), 16),
             (news[0], ReuseSettings(mode="naive"), 6),
             (news[3], FULL, 9)]
    plans = [align(p, [("d", donor)]) for p, _, _ in cases]
    want = [alone(eng, p, m, plan=plan, settings=st) for (p, st, m), plan in zip(cases, plans)]
    b, got = batched(eng, [BatchRequest(p, m, plan=plan, settings=st, stop_ids=())
                           for (p, st, m), plan in zip(cases, plans)])
    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids
        assert (g.reused_tokens, g.recomputed_tokens, g.cached_tokens) == \
            (w.reused_tokens, w.recomputed_tokens, w.cached_tokens)
        assert g.decode_recomputed == w.decode_recomputed
    assert got[0].reused_tokens > 100 and got[2].decode_recomputed > 0
    # the DHD-decode request ran alone while it had stale tokens, then moved into the batch
    assert b.stats["solo_steps"] > 0
    assert b.blocks.free_blocks == b.blocks.num_blocks


def test_background_thread_serves_concurrent_callers():
    r = tiny(dtype=torch.float32)
    eng = ReuseEngine(r, settings=FULL)
    prompts = [ids(n, n) for n in (7, 19, 33, 12)]
    want = [alone(eng, p, 40).token_ids for p in prompts]
    b = ContinuousBatcher(eng).start()
    got: dict[int, list[int]] = {}
    go = threading.Barrier(len(prompts))

    def client(i):
        go.wait()
        got[i] = b.submit(BatchRequest(prompts[i], 40, stop_ids=())).result(timeout=60).token_ids

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert b.wait_idle(10)
    b.stop()
    assert [got[i] for i in range(len(prompts))] == want
    assert b.stats["max_batch_seen"] >= 2
    assert b.blocks.free_blocks == b.blocks.num_blocks


def test_a_failing_prefill_fails_only_its_request():
    r = tiny()
    eng = ReuseEngine(r, settings=FULL)

    def boom():
        raise RuntimeError("prefill exploded")

    b = ContinuousBatcher(eng)
    bad = b.submit(BatchRequest(ids(5, 1), 4, prefill_fn=boom))
    good = b.submit(BatchRequest(ids(6, 2), 4, stop_ids=()))
    b.run()
    with pytest.raises(RuntimeError, match="exploded"):
        bad.result()
    assert good.result().token_ids == alone(eng, ids(6, 2), 4).token_ids


# ---- SmolLM2 ----------------------------------------------------------------------------------
def _chat(tok, text):
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                   tokenize=True, return_dict=True)["input_ids"]


def test_smollm2_concurrent_requests_match_each_alone(smollm2):
    from kvcluster.workloads import heldout_paragraphs
    runner, tok = smollm2
    eng = ReuseEngine(runner, settings=FULL)
    texts = heldout_paragraphs(5, offset=40)
    prompts = [_chat(tok, "Summarize: " + t[:c]) for t, c in zip(texts, (120, 500, 260, 800, 60))]
    mts = [20, 7, 28, 12, 16]
    want = [alone(eng, p, m).token_ids for p, m in zip(prompts, mts)]
    b, got = batched(eng, [BatchRequest(p, m, stop_ids=()) for p, m in zip(prompts, mts)], max_batch=3)
    assert len({len(p) for p in prompts}) == 5
    assert [g.token_ids for g in got] == want
    assert b.stats["max_batch_seen"] == 3 and b.blocks.used_blocks == 0


def test_smollm2_reuse_requests_batched_keep_reuse(smollm2):
    runner, tok = smollm2
    eng = ReuseEngine(runner, InMemorySegmentStore(), settings=FULL)
    docs = ["Document A: The Eiffel Tower is a wrought-iron tower in Paris, completed in 1889.",
            "Document B: The Colosseum is an ancient amphitheatre in the centre of Rome, Italy.",
            "Document C: The Great Wall of China is a series of fortifications in northern China."]
    q = " Question: In which city is the Eiffel Tower?"
    donor = _chat(tok, " ".join(docs) + q)
    _, seq = eng.generate(donor, None, 0, settings=FULL, keep_segment=True)
    eng.store.put(eng.segment_of(seq, "donor"))
    news = [_chat(tok, " ".join([docs[2], docs[0], docs[1]]) + q),
            _chat(tok, " ".join([docs[1], docs[2], docs[0]]) + " Question: Where is the Colosseum?")]
    cases = [(news[0], ReuseSettings(mode="dhd", recompute_ratio=0.3, decode_recompute=0)),
             (news[1], ReuseSettings(mode="cacheblend")),
             (news[1], ReuseSettings(mode="dhd", recompute_ratio=0.15, decode_recompute=2))]
    plans = [align(p, [("donor", donor)]) for p, _ in cases]
    want = [alone(eng, p, 10, plan=pl, settings=st) for (p, st), pl in zip(cases, plans)]
    _, got = batched(eng, [BatchRequest(p, 10, plan=pl, settings=st, stop_ids=())
                           for (p, st), pl in zip(cases, plans)])
    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids
        assert (g.reused_tokens, g.recomputed_tokens, g.decode_recomputed) == \
            (w.reused_tokens, w.recomputed_tokens, w.decode_recomputed)
        assert g.cached_tokens > 0.4 * g.prompt_tokens


# ---- the worker -------------------------------------------------------------------------------
def test_worker_batches_concurrent_generate_calls_like_unbatched():
    from workers.worker_actor import Worker
    r = tiny(dtype=torch.float32)
    opts = {"host_bytes": 16 << 20, "channel": "inproc", "reuse": {"mode": "full"}}
    w_b = Worker("wb", dict(opts, kv_pool_bytes=8 << 20), runner=r)
    w_1 = Worker("w1", dict(opts, batching=False), runner=r)
    reqs = [{"request_id": f"q{i}", "token_ids": ids(10 + 7 * i, i), "max_tokens": 60 - 9 * i, "stop_ids": [],
             "segment_id": f"seg{i}"} for i in range(4)]
    try:
        want = [w_1.generate(q) for q in reqs]
        got: dict[int, dict] = {}
        go = threading.Barrier(len(reqs))

        def call(i):
            go.wait()
            got[i] = w_b.generate(reqs[i])

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(reqs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for i, w in enumerate(want):
            g = got[i]
            assert g["token_ids"] == w["token_ids"]
            assert g["done"]["segment_id"] == f"seg{i}" and g["done"]["completion_tokens"] == len(w["token_ids"])
            assert g["prefill"]["prompt_tokens"] == w["prefill"]["prompt_tokens"]
        st = w_b.stats()
        assert st["batching"]["max_batch_seen"] >= 2 and st["batching"]["blocks_free"] == st["batching"]["blocks_total"]
        assert st["counters"]["requests"] == 4 and st["counters"]["segments_written"] == 4
        assert w_1.stats()["batching"] is None
        # the written segment is reusable: a follow-up with a plan reuses it
        q = reqs[3]["token_ids"]
        plan = align(q, [("seg3", q)])
        wire = {"n_tokens": plan.n_tokens, "prefix_len": plan.prefix_len, "source": plan.source,
                "spans": [[s.new_start, s.donor_id, s.donor_start, s.length] for s in plan.spans]}
        out = w_b.generate({"token_ids": q, "max_tokens": 3, "plan": wire, "mode": "naive", "stop_ids": []})
        assert out["prefill"]["reused_tokens"] == len(q) - 1
        assert out["token_ids"] == want[3]["token_ids"][:3]
    finally:
        w_b.shutdown()
        w_1.shutdown()


def test_worker_warms_up_every_path_at_start_and_counts_from_zero(caplog):
    from workers.worker_actor import Worker
    r = tiny(dtype=torch.float32)
    calls = []
    real = r.logits
    r.logits = lambda h: (calls.append(h.shape[0]), real(h))[1]  # which passes ran: 1 row alone, 2 batched
    opts = {"host_bytes": 16 << 20, "channel": "inproc", "kv_pool_bytes": 1 << 20}
    with caplog.at_level("INFO", logger="workers.worker_actor"):
        w = Worker("warm", opts, runner=r)
    try:
        assert 1 in calls and 2 in calls, calls  # the engine's own decode and a batched step of two
        assert "warmed up" in caplog.text
        b = w.stats()["batching"]
        assert b["prefills"] == b["decode_steps"] == b["tokens"] == 0 and b["blocks_free"] == b["blocks_total"]
        assert w.stats()["counters"]["requests"] == 0 and w.generate({"token_ids": ids(9, 1), "max_tokens": 2})
    finally:
        w.shutdown()
    calls.clear()
    w = Worker("cold", dict(opts, warmup=False), runner=r)
    w.shutdown()
    assert calls == []
    with pytest.raises(RuntimeError, match="before the batcher starts"):
        b = ContinuousBatcher(ReuseEngine(r, settings=FULL), blocks=BlockManager(r, 8, 4)).start()
        try:
            b.warm_up([2, 3])
        finally:
            b.stop()


def test_worker_cancel_stops_a_batched_request_and_frees_blocks():
    from workers.worker_actor import Worker
    r = tiny(dtype=torch.float32)
    w = Worker("wc", {"host_bytes": 16 << 20, "channel": "inproc", "reuse": {"mode": "full"}}, runner=r)
    try:
        it = w.generate_stream({"request_id": "c1", "token_ids": ids(12, 1), "max_tokens": 1000, "stop_ids": []})
        assert next(it)["type"] == "prefill"
        assert next(it)["type"] == "token"
        w.cancel("c1")
        events = list(it)
        assert events[-1]["type"] == "done" and events[-1]["finish_reason"] == "cancelled"
        assert len(events) < 1000
        assert w._batcher.wait_idle(10)
        snap = w.stats()["batching"]
        assert snap["blocks_free"] == snap["blocks_total"] and snap["cancelled"] == 1
        # a reader that walks away also frees its blocks
        it = w.generate_stream({"request_id": "c2", "token_ids": ids(12, 2), "max_tokens": 1000, "stop_ids": []})
        next(it), next(it)
        it.close()
        assert w._batcher.wait_idle(10)
        assert w.stats()["batching"]["blocks_free"] == snap["blocks_total"]
    finally:
        w.shutdown()


def test_ray_worker_actor_batches_two_concurrent_requests():
    ray = pytest.importorskip("ray")
    from tests.reliability.harness import tiny_model_dir
    from workers.worker_actor import ACTOR_OPTIONS, WorkerActor

    model = str(tiny_model_dir())
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False,
             object_store_memory=200 << 20)
    try:
        w = WorkerActor.options(num_cpus=1, **ACTOR_OPTIONS).remote(
            "wr", {"model": model, "host_bytes": 16 << 20, "num_threads": 1, "reuse": {"mode": "full"}})
        assert ray.get(w.ping.remote(), timeout=120)
        reqs = [{"token_ids": list(range(100, 140)), "max_tokens": 200, "stop_ids": []},
                {"token_ids": list(range(300, 321)), "max_tokens": 150, "stop_ids": []}]
        together = ray.get([w.generate.remote(q) for q in reqs], timeout=300)
        snap = ray.get(w.stats.remote())["batching"]
        assert snap["batch_sizes"].get(2, 0) > 0  # both decoded in the same steps
        one_by_one = [ray.get(w.generate.remote(q), timeout=300) for q in reqs]
        for a, b in zip(together, one_by_one):
            assert a["token_ids"] == b["token_ids"] and len(a["token_ids"]) == b["done"]["completion_tokens"]
        assert ray.get(w.stats.remote())["batching"]["blocks_free"] == snap["blocks_total"]
    finally:
        ray.shutdown()


# ---- the CUDA-graph pool option (its CUDA behaviour: tests/workers/test_worker_cuda_graphs.py) ----
def test_cuda_graph_tokens_comes_from_config_and_env_and_is_checked(monkeypatch):
    from kvcluster.config import load_config
    from workers.errors import InvalidParameterError
    from workers.worker_actor import Worker, WorkerOptions
    assert WorkerOptions.from_config(load_config()).cuda_graph_tokens == 8192
    monkeypatch.setenv("KVCLUSTER_MODEL__CUDA_GRAPH_TOKENS", "0")
    assert WorkerOptions.from_config(load_config()).cuda_graph_tokens == 0
    with pytest.raises(InvalidParameterError, match="cuda_graph_tokens"):
        Worker("w", {"cuda_graph_tokens": -5, "channel": "inproc", "batching": False}, runner=tiny())
    w = Worker("w", {"channel": "inproc", "batching": False}, runner=tiny())  # on CPU: no pool, eager
    try:
        assert w.engine._pool is None and w.options.cuda_graph_tokens == 8192
    finally:
        w.shutdown()


def test_fusing_is_per_thread_and_the_runner_still_pickles():
    import copy
    import pickle
    r = tiny()
    r.fuse = True  # as on CUDA
    seen = {}
    inside, done = threading.Event(), threading.Event()

    def capture_thread():
        with r.fusing():
            seen["capturing"] = r._fusing
            inside.set()
            done.wait(10)

    t = threading.Thread(target=capture_thread)
    t.start()
    inside.wait(10)
    seen["other"] = r._fusing  # another thread, running eager meanwhile
    done.set()
    t.join()
    assert seen == {"capturing": True, "other": False} and not r._fusing
    for twin in (copy.copy(r), pickle.loads(pickle.dumps(r))):
        assert not twin._fusing and twin.spec == r.spec


def test_the_few_row_step_takes_every_row_count_unless_told_fewer(monkeypatch):
    """KVCLUSTER_PAGED_GEMV_ROWS (default 16): the GEMV step beat cuBLAS at 1-16 rows on an H100
    (benchmarks/results/paged_decode_gpu.json); 1 keeps it to one row, 0 turns it off; a failed
    capture that may have been its kernels turns it off."""
    import os

    from workers import paged_decode
    if "KVCLUSTER_PAGED_GEMV_ROWS" not in os.environ:
        assert paged_decode.PAGED_GEMV_ROWS == 16
    r = random_runner(SPEC, "cpu", torch.float32, seed=0)
    r.gemv_kernel = r.qkv_kernel = r.fuse = True  # as on CUDA
    with r.fusing():
        for limit, takes in ((1, [1]), (16, list(range(1, 17))), (0, [])):
            monkeypatch.setattr(paged_decode, "PAGED_GEMV_ROWS", limit)
            assert [b for b in range(1, 18) if paged_decode.few_rows(r, b)] == takes
    monkeypatch.setattr(paged_decode, "PAGED_GEMV_ROWS", 1)
    assert not paged_decode.few_rows(r, 1)  # outside a capture: op by op
    assert not paged_decode._drop_few_rows(r, 4, RuntimeError("x"))  # 4 rows never took it
    assert paged_decode._drop_few_rows(r, 1, RuntimeError("x")) and paged_decode.PAGED_GEMV_ROWS == 0
    assert paged_decode._rows_setting("4") == 4 and paged_decode._rows_setting("-1") == 0
    with pytest.raises(ValueError, match="KVCLUSTER_PAGED_GEMV_ROWS must be a row count"):
        paged_decode._rows_setting("yes")
