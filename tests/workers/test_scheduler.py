"""The cache-aware scheduler: routing, queue order with aging, the dispatcher's retries, the router.

Unit tests use fakes (a fake clock, fake async workers); the integration test at the end runs
real workers (SmolLM2, in process, sharing one loaded model) behind the real index service.
"""
from __future__ import annotations

import asyncio
import math
import random

import pytest

from index_service.plan import ReusePlan, ReuseSpan
from workers.scheduler import (Dispatcher, Job, LocalIndexBackend, LocalWorkerBackend, NoWorkerError, Router,
                               RouterRequest, Scheduler)


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def job(prompt=100, **donors) -> Job:
    return Job(prompt_tokens=prompt, donors=dict(donors))


# ---- routing -------------------------------------------------------------------------------------

def test_routes_to_the_worker_holding_most_donor_tokens():
    s = Scheduler(["a", "b", "c"])
    s.record_segment("d1", "b")
    s.record_segment("d2", "c")
    assert s.route(job(d1=80, d2=10)) == "b"
    assert s.route(job(d1=10, d2=80)) == "c"
    s.record_segment("d2", "b")  # b now holds both
    assert s.route(job(d1=10, d2=80)) == "b"
    assert s.routed["locality"] == 3


def test_load_bound_sends_work_away_from_an_overloaded_holder():
    s = Scheduler(["a", "b"], load_bound=1.25, seed=1)
    s.record_segment("d", "a")
    placed = [s.submit(job(d=90)) for _ in range(6)]
    # bounded load: the holder never runs far ahead of the fair share
    assert placed.count("a") >= 3 and placed.count("b") >= 2
    assert abs(s.load("a") - s.load("b")) <= 2
    assert s.routed["p2c"] >= 2


def test_power_of_two_choices_without_donors_prefers_the_less_loaded():
    s = Scheduler(["a", "b"], seed=0)
    for _ in range(3):
        s._w["a"].queue.append(job())
    for _ in range(20):
        assert s.route(job()) == "b"  # with two workers the two choices are both: always the emptier


def test_pinned_and_down_workers():
    s = Scheduler(["a", "b"])
    j = job()
    j.pin = "b"
    assert s.route(j) == "b"
    s.mark_down("b")
    assert s.route(j) == "a"  # a pin to a down worker is ignored
    s.mark_down("a")
    with pytest.raises(NoWorkerError):
        s.route(job())


def test_round_robin_cycles_and_keeps_fifo_order():
    clock = Clock()
    s = Scheduler(["a", "b", "c"], policy="round_robin", clock=clock)
    s.record_segment("d", "c")
    assert [s.submit(job(d=100)) for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]
    q = [job(), job(d=99), job(d=50)]
    for j in q:
        j.pin = "a"
        s.submit(j)
    s._w["a"].queue = s._w["a"].queue[2:]  # drop the two earlier ones
    assert [s.next_job("a") for _ in range(3)] == q


def test_mark_down_returns_queued_jobs_and_forgets_held_segments():
    s = Scheduler(["a", "b"])
    s.record_segment("d", "a")
    j1, j2 = job(d=50), job(d=50)
    s.submit(j1)
    s.submit(j2)
    assert s.holders("d") == {"a"}
    back = s.mark_down("a")
    assert set(back) <= {j1, j2} and s.holders("d") == set()
    assert s.holder_for("d") is None
    s.mark_up("a")
    assert s.is_up("a") and s.holders("d") == set()


# ---- queue order -----------------------------------------------------------------------------------

def test_queue_orders_by_hit_rate_then_aging_lets_old_misses_through():
    clock = Clock()
    s = Scheduler(["a"], max_wait_s=5.0, clock=clock)
    miss = job(100)
    s.submit(miss)
    clock.t += 1
    hit = job(100, d=90)
    s.submit(hit)
    # fresh: the 90% hit goes first even though it came later
    assert s.next_job("a") is hit
    s.finish(hit, "a")
    clock.t += 1
    hit2 = job(100, d=95)
    s.submit(hit2)
    # miss has waited 2 s: priority 0 + 2/5 = 0.4 < 0.95
    assert s.next_job("a") is hit2
    s.finish(hit2, "a")
    clock.t += 3.5  # miss has waited 5.5 s >= max_wait_s: nothing younger may pass it
    hit3 = job(100, d=100)
    s.submit(hit3)
    assert s.next_job("a") is miss


def _simulate(max_wait_s: float, seed: int, rate: float = 0.85, steps: int = 2000) -> tuple[float, float]:
    """One worker, one job per 0.5 s of service, Poisson arrivals (``rate`` per service time), 20%
    misses: (worst wait of a miss, worst wait of a hit)."""
    clock = Clock()
    s = Scheduler(["a"], max_wait_s=max_wait_s, clock=clock)
    rng = random.Random(seed)
    worst = {True: 0.0, False: 0.0}
    for _ in range(steps):
        k, p = 0, rng.random()
        acc = term = math.exp(-rate)
        while p > acc:  # Poisson draw
            k += 1
            term *= rate / k
            acc += term
        for _ in range(k):
            miss = rng.random() < 0.2
            s.submit(Job(prompt_tokens=100, donors={} if miss else {"d": rng.randint(50, 100)}))
        j = s.next_job("a")
        if j is not None:
            worst[not j.donors] = max(worst[not j.donors], clock.t - j.created_at)
            s.finish(j, "a")
        clock.t += 0.5
    return worst[True], worst[False]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aging_bounds_how_long_a_miss_waits_behind_better_jobs(seed):
    """Pure hit-rate order starves misses; with aging a miss waits at most max_wait_s longer than
    the worst wait of any job (which the load alone sets)."""
    max_wait = 3.0
    miss_aged, hit_aged = _simulate(max_wait, seed)
    miss_pure, _ = _simulate(1e9, seed)
    assert miss_aged <= hit_aged + max_wait + 0.5
    assert miss_pure > miss_aged + max_wait  # without aging the same misses wait far longer


# ---- dispatcher --------------------------------------------------------------------------------------

class WorkerLost(Exception):
    pass


def test_dispatcher_retries_a_lost_worker_elsewhere_and_delivers_once():
    async def main():
        s = Scheduler(["a", "b"], policy="round_robin")
        runs: list[tuple[str, str]] = []
        dead = {"a"}

        async def call(worker, j):
            runs.append((worker, j.job_id))
            await asyncio.sleep(0.01)
            if worker in dead:
                raise WorkerLost(worker)
            return (worker, j.payload)

        d = Dispatcher(s, is_worker_lost=lambda e: isinstance(e, WorkerLost))
        jobs = [Job(payload=i) for i in range(8)]
        results = await asyncio.gather(*[d.run(j, call) for j in jobs])
        assert [p for _, p in results] == list(range(8))  # every job, once, in order of submission
        assert all(w == "b" for w, _ in results)
        assert not s.is_up("a") and d.workers_lost == 1
        assert all(sum(1 for w, jid in runs if jid == j.job_id and w == "b") == 1 for j in jobs)
        assert s.pending() == 0

    asyncio.run(main())


def test_dispatcher_passes_other_errors_through_without_retry():
    async def main():
        s = Scheduler(["a"])

        async def call(worker, j):
            raise ValueError("bad request")

        d = Dispatcher(s, is_worker_lost=lambda e: isinstance(e, WorkerLost))
        with pytest.raises(ValueError):
            await d.run(Job(), call)
        assert s.is_up("a") and d.retries == 0

    asyncio.run(main())


def test_dispatcher_runs_one_job_per_slot_and_cancels_queued_ones():
    async def main():
        s = Scheduler(["a"], slots=1)
        running = []
        gate = asyncio.Event()

        async def call(worker, j):
            running.append(j.payload)
            assert len([1 for _ in running]) - finished[0] <= 1
            await gate.wait()
            finished[0] += 1
            return j.payload

        finished = [0]
        d = Dispatcher(s)
        t1 = asyncio.create_task(d.run(Job(payload=1), call))
        t2 = asyncio.create_task(d.run(Job(payload=2), call))
        await asyncio.sleep(0.01)
        assert running == [1] and s.load("a") == 2
        t2.cancel()
        await asyncio.sleep(0.01)
        assert s.load("a") == 1
        gate.set()
        assert await t1 == 1
        assert running == [1]

    asyncio.run(main())


def test_all_workers_lost_fails_the_job():
    async def main():
        s = Scheduler(["a", "b"])

        async def call(worker, j):
            raise WorkerLost(worker)

        d = Dispatcher(s, is_worker_lost=lambda e: isinstance(e, WorkerLost), max_attempts=5)
        with pytest.raises((WorkerLost, NoWorkerError)):
            await d.run(Job(), call)
        assert s.up_workers() == []

    asyncio.run(main())


# ---- router with fake backends -----------------------------------------------------------------

class FakeWorker:
    """Emits prompt-length-dependent tokens; can be made to die after k tokens."""

    def __init__(self, name, die_after=None):
        self.name, self.die_after, self.requests, self.cancelled = name, die_after, [], []

    async def stream(self, request):
        self.requests.append(request)
        n = len(request["token_ids"])
        yield {"type": "prefill", "prompt_tokens": n, "reused_tokens": 0, "cached_tokens": 0}
        out = 0
        for i in range(request["max_tokens"]):
            if self.die_after is not None and out >= self.die_after:
                raise WorkerLost(self.name)
            await asyncio.sleep(0)
            yield {"type": "token", "token_id": 1000 + n + i}  # continues the sequence it was given
            out += 1
        yield {"type": "done", "finish_reason": "length", "completion_tokens": out,
               "segment_id": request["segment_id"], "fetched_donors": list(request["donor_locations"]),
               "missing_donors": []}

    async def cancel(self, rid):
        self.cancelled.append(rid)


class FakeIndex:
    def __init__(self, plan=None):
        self.plan, self.added, self.removed = plan, [], []

    async def lookup(self, tokens, text, tenant, fp, salt):
        return self.plan

    async def add(self, sid, tokens, text, tenant, scope, fp, salt):
        self.added.append((sid, tenant, scope, salt))
        return True

    async def remove(self, sid):
        self.removed.append(sid)


def test_router_resumes_after_a_lost_worker_without_losing_or_repeating_tokens():
    async def main():
        s = Scheduler(["a", "b"], policy="round_robin")
        a, b = FakeWorker("a", die_after=3), FakeWorker("b")
        ix = FakeIndex()
        r = Router(s, {"a": a, "b": b}, ix, "fp", is_worker_lost=lambda e: isinstance(e, WorkerLost))
        req = RouterRequest(token_ids=list(range(10)), text="t", max_tokens=8, tenant="acme")
        out = await r.generate(req)
        # a produced 1010, 1011, 1012 then died; b resumed from prompt + those 3 tokens
        assert out["token_ids"] == [1010, 1011, 1012] + [1000 + 13 + i for i in range(5)]
        assert len(b.requests) == 1 and b.requests[0]["token_ids"] == list(range(10)) + [1010, 1011, 1012]
        assert b.requests[0]["max_tokens"] == 5 and b.requests[0]["segment_id"] is None  # no write-back on resume
        assert out["done"]["attempts"] == 2 and out["done"]["workers"] == ["a", "b"]
        assert r.dispatcher.retries == 1 and not s.is_up("a")

    asyncio.run(main())


def test_router_records_write_back_and_indexes_it_with_the_tenant():
    async def main():
        s = Scheduler(["a", "b"])
        s.record_segment("donor", "b")
        plan = ReusePlan(10, [ReuseSpan(0, "donor", 0, 8)], prefix_len=0, source="semantic")
        a, b = FakeWorker("a"), FakeWorker("b")
        ix = FakeIndex(plan)
        r = Router(s, {"a": a, "b": b}, ix, "fp")
        out = await r.generate(RouterRequest(token_ids=list(range(10)), text="t", max_tokens=2, tenant="acme",
                                             cache_salt="s1"))
        assert out["done"]["worker"] == "b"  # locality
        assert b.requests[0]["donor_locations"] == {"donor": "b"}
        sid = out["done"]["segment_id"]
        assert ix.added == [(sid, "acme", "private", "s1")] and s.holders(sid) == {"b"}

    asyncio.run(main())


def test_router_skips_write_back_of_a_full_prefix_hit_and_forgets_missing_donors():
    async def main():
        s = Scheduler(["a"])
        plan = ReusePlan(10, [ReuseSpan(0, "gone", 0, 10)], prefix_len=10, source="prefix")

        class Missing(FakeWorker):
            async def stream(self, request):
                async for ev in super().stream(request):
                    if ev["type"] == "done":
                        ev = dict(ev, missing_donors=["gone"], fetched_donors=[])
                    yield ev

        ix = FakeIndex(plan)
        r = Router(s, {"a": Missing("a")}, ix, "fp")
        out = await r.generate(RouterRequest(token_ids=list(range(10)), max_tokens=1))
        assert out["done"]["segment_id"] is None and ix.added == []
        assert ix.removed == ["gone"]

    asyncio.run(main())


def test_router_looks_donors_up_again_when_a_job_waited():
    """A follow-up that arrived before its donor was indexed finds it when it finally starts."""
    async def main():
        s = Scheduler(["a"])
        plan = ReusePlan(10, [ReuseSpan(0, "donor", 0, 8)], source="semantic")

        class Late(FakeIndex):
            calls = 0

            async def lookup(self, *a):
                Late.calls += 1
                return None if Late.calls == 1 else plan

        w = FakeWorker("a")
        r = Router(s, {"a": w}, Late(), "fp", relookup_after_s=0.0)
        await r.generate(RouterRequest(token_ids=list(range(10)), max_tokens=1))
        assert w.requests[0]["plan"]["spans"] == [[0, "donor", 0, 8]]
        assert r.counters["relookups"] == 1 and r.counters["relookup_gains"] == 1
        r2 = Router(s, {"a": w}, Late(), "fp", relookup_after_s=None)
        Late.calls = 0
        await r2.generate(RouterRequest(token_ids=list(range(10)), max_tokens=1))
        assert w.requests[1]["plan"] is None and r2.counters["relookups"] == 0

    asyncio.run(main())


# ---- integration: real workers, real index ----------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2():
    import torch

    from workers.model_loader import load_runner, load_tokenizer
    torch.set_num_threads(2)
    return load_runner("smollm2-135m"), load_tokenizer("smollm2-135m")


@pytest.mark.slow
def test_integration_real_workers_cache_aware_routing_and_peer_fetch(smollm2):
    from index_service.service import IndexService
    from workers.worker_actor import Worker

    runner, tok = smollm2
    ws = {w: Worker(w, {"host_bytes": 256 << 20, "channel": "inproc"}, runner=runner) for w in ("w0", "w1")}
    for w in ws.values():
        w.set_peers(ws)
    index = IndexService(qdrant_path=":memory:", top_k=3, min_score=0.3)
    try:
        docs = ["The Amazon river carries more water than any other river on Earth, draining much of South America.",
                "Mount Everest, on the border of Nepal and China, is the highest mountain above sea level.",
                "The Great Barrier Reef off Queensland is the largest coral reef system in the world."]

        def prompt(order, q):
            return " ".join(docs[i] for i in order) + " Question: " + q

        async def main():
            s = Scheduler(list(ws), policy="cache_aware")
            r = Router(s, {w: LocalWorkerBackend(x) for w, x in ws.items()}, LocalIndexBackend(index),
                       runner.fingerprint)

            def req(text, **kw):
                return RouterRequest(token_ids=tok(text)["input_ids"], text=text, max_tokens=2, tenant="t1", **kw)

            first = await r.generate(req(prompt([0, 1, 2], "Which is the longest?")))
            home = first["done"]["worker"]
            assert first["prefill"]["reused_tokens"] == 0 and s.holders(first["done"]["segment_id"]) == {home}
            # a reordered version: the scheduler sends it where its donor lives, reused locally
            second = await r.generate(req(prompt([2, 0, 1], "Which is the highest?")))
            assert second["done"]["worker"] == home
            assert second["prefill"]["reused_tokens"] > 0.5 * second["prefill"]["prompt_tokens"]
            assert second["prefill"]["fetch"]["local"] and not second["prefill"]["fetch"]["fetched"]
            # pinned to the other worker: the donor crosses the channel, verified, and is reused
            other = next(w for w in ws if w != home)
            third = await r.generate(req(prompt([1, 2, 0], "Which is a reef?"), pin=other))
            f = third["prefill"]["fetch"]
            assert third["done"]["worker"] == other and f["fetched"] and f["peer_blocks"] > 0
            assert third["prefill"]["reused_tokens"] > 0.5 * third["prefill"]["prompt_tokens"]
            assert ws[other].stats()["tiers"]["peer"]["corrupt"] == 0
            # another tenant sees none of it
            fourth = await r.generate(RouterRequest(token_ids=tok(prompt([0, 1, 2], "Which?"))["input_ids"],
                                                    text=prompt([0, 1, 2], "Which?"), max_tokens=1, tenant="t2"))
            assert fourth["prefill"]["reused_tokens"] == 0

        asyncio.run(main())
    finally:
        index.close()
        for w in ws.values():
            w.shutdown()


@pytest.mark.slow
def test_worker_falls_back_to_recompute_on_a_corrupt_peer_block(smollm2):
    from workers.scheduler import plan_to_wire
    from workers.worker_actor import Worker

    runner, tok = smollm2
    a = Worker("a", {"host_bytes": 64 << 20}, runner=runner)
    b = Worker("b", {"host_bytes": 64 << 20}, runner=runner)
    try:
        ids = tok("A short text about rivers and mountains and the sea, repeated. " * 2)["input_ids"]
        a.generate({"token_ids": ids, "max_tokens": 1, "segment_id": "seg"})

        class Corrupting:
            """Flips a byte in every block a serves."""
            def export_encoded(self, keys):
                out = []
                for raw in a.export_encoded(keys):
                    if raw is not None and not keys[len(out)].endswith("manifest"):
                        raw = bytearray(raw)
                        raw[-1] ^= 0xFF
                    out.append(raw)
                return out

        b.set_peers({"a": a})
        b._peers["a"] = Corrupting()
        b._channels["a"] = Corrupting().export_encoded
        plan = ReusePlan(len(ids), [ReuseSpan(0, "seg", 0, len(ids) - 1)], prefix_len=len(ids) - 1, source="prefix")
        out = b.generate({"token_ids": ids, "max_tokens": 1, "plan": plan_to_wire(plan),
                          "donor_locations": {"seg": "a"}})
        assert out["prefill"]["reused_tokens"] == 0  # nothing reused ...
        assert out["prefill"]["fetch"]["missing"] == ["seg"] or out["prefill"]["fetch"]["dropped"] == ["seg"]
        assert b.stats()["tiers"]["peer"]["corrupt"] > 0  # ... because the checksum caught it
        assert out["done"]["completion_tokens"] == 1
    finally:
        a.shutdown()
        b.shutdown()


@pytest.mark.slow
def test_donor_blocks_cross_the_tcp_channel(smollm2):
    from workers.scheduler import plan_to_wire
    from workers.worker_actor import Worker

    runner, tok = smollm2
    a = Worker("a", {"host_bytes": 64 << 20, "channel": "tcp"}, runner=runner)
    b = Worker("b", {"host_bytes": 64 << 20, "channel": "tcp"}, runner=runner)
    try:
        peers = {"a": tuple(a.info()["tcp"]), "b": tuple(b.info()["tcp"])}
        a.set_peers(peers)
        b.set_peers(peers)
        ids = tok("Rivers carry water from mountains to the sea, shaping valleys on the way. " * 2)["input_ids"]
        a.generate({"token_ids": ids, "max_tokens": 1, "segment_id": "segtcp"})
        plan = ReusePlan(len(ids), [ReuseSpan(0, "segtcp", 0, len(ids) - 1)], prefix_len=len(ids) - 1,
                         source="prefix")
        out = b.generate({"token_ids": ids, "max_tokens": 1, "plan": plan_to_wire(plan),
                          "donor_locations": {"segtcp": "a"}})
        f = out["prefill"]["fetch"]
        assert f["fetched"] == ["segtcp"] and f["channel"] == "tcp" and f["peer_blocks"] >= 1
        assert out["prefill"]["reused_tokens"] == len(ids) - 1
        assert b.stats()["transfer"]["tcp"]["bytes"] == f["peer_bytes"] > 0
        assert b.has_segment("segtcp")  # kept locally after the fetch
    finally:
        a.shutdown()
        b.shutdown()


def test_jobs_wait_for_a_restarting_worker_instead_of_failing():
    """All workers down (restarting): a job is parked, then runs when one comes back."""
    import asyncio

    from workers.scheduler import Dispatcher, Job, NoWorkerError, Scheduler

    async def scenario():
        sched = Scheduler(["w0"])
        sched.mark_down("w0")
        disp = Dispatcher(sched, park_s=5.0)

        async def call(worker, job):
            return worker

        task = asyncio.ensure_future(disp.run(Job(job_id="j1"), call))
        await asyncio.sleep(0.05)
        assert not task.done()  # parked, not failed
        disp.mark_up("w0")
        assert await asyncio.wait_for(task, 2) == "w0"
        # and a job parked past its deadline fails with a clear error
        sched.mark_down("w0")
        short = Dispatcher(sched, park_s=0.05)
        try:
            await short.run(Job(job_id="j2"), call)
        except NoWorkerError as e:
            return str(e)
        raise AssertionError("expected NoWorkerError")

    msg = asyncio.run(scenario())
    assert "came back" in msg
