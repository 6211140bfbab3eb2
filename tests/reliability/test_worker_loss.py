"""Workers lost at random points of random requests (in the fetch, in the prefill, after k decoded
tokens), in process: the real Router/Dispatcher over real Workers, with a backend that drops the
worker's stream and raises a "worker lost" error as the Ray backend does when an actor dies. The
lost worker comes back after a short pause (a restarted actor). Every request must complete once:
exactly max_tokens tokens, one prefill, one done, no segment written twice. A request that
arrives (or must be retried) while every worker is down is refused with NoWorkerError (HTTP 503 +
Retry-After) rather than queued: the test's client sends it again, as an HTTP client would.

The same fault on real Ray actors (os._exit inside the actor, 1,000 requests) is
benchmarks/chaos_worker_kill.py (and test_chaos_ray.py, marked chaos)."""
from __future__ import annotations

import asyncio
import collections
import random

import numpy as np

from tests.reliability.harness import LocalCluster, prompt_of
from workers.scheduler import LocalWorkerBackend, NoWorkerError


class WorkerLost(Exception):
    pass


class FlakyBackend(LocalWorkerBackend):
    def __init__(self, worker, rng: random.Random, p: float, log: list) -> None:
        super().__init__(worker)
        self.rng, self.p, self.log = rng, p, log

    async def stream(self, request):
        phase, at = None, 0
        if self.rng.random() < self.p:
            phase = self.rng.choice(["fetch", "prefill", "decode"])
            at = self.rng.randint(1, max(1, request["max_tokens"] - 1))
        if phase == "fetch":  # lost before anything came back
            self.log.append(phase)
            raise WorkerLost(f"{self.worker.worker_id} lost in {phase}")
        agen = super().stream(request)
        n = 0
        try:
            async for ev in agen:
                if phase == "prefill" and ev["type"] == "prefill":
                    self.log.append(phase)
                    raise WorkerLost(f"{self.worker.worker_id} lost in {phase}")
                yield ev
                n += ev["type"] == "token"
                if phase == "decode" and n >= at:
                    self.log.append(phase)
                    raise WorkerLost(f"{self.worker.worker_id} lost in {phase}")
        finally:
            await agen.aclose()


def test_no_request_lost_or_duplicated_when_workers_die(tiny_model):
    c = LocalCluster(3, tiny_model)
    kills: list[str] = []
    rng = random.Random(7)
    router = c.router
    router.workers = {w: FlakyBackend(x, rng, 0.15, kills) for w, x in c.workers.items()}
    d = router.dispatcher
    d.is_worker_lost = lambda e: isinstance(e, WorkerLost)
    # each run is lost with p ~ 0.15-0.18 (measured: 18% of requests need a second run, 3% a third),
    # so 6 runs all lost came up about once in 200 test runs (seen in a clean-clone CI on
    # 2026-12-07); with 10 the chance is ~1e-5 per test run
    d.max_attempts = 10

    def restart_later(w, exc):
        asyncio.get_running_loop().call_later(0.02, d.mark_up, w)

    d.on_worker_lost = restart_later
    prng = np.random.default_rng(3)
    texts = [prompt_of(prng) for _ in range(150)]
    max_tokens = 5

    refused = []

    async def one(text):
        while True:  # "no worker is up" is a 503 with Retry-After over HTTP: the client sends it again
            req = c.request(text, max_tokens=max_tokens)
            ev, toks, done = collections.Counter(), [], None
            try:
                async for e in router.stream(req):
                    ev[e["type"]] += 1
                    if e["type"] == "token":
                        toks.append(e["token_id"])
                    elif e["type"] == "done":
                        done = e
                return ev, toks, done
            except NoWorkerError:
                refused.append(text)
                await asyncio.sleep(0.05)

    async def main():
        sem = asyncio.Semaphore(4)

        async def lim(t):
            async with sem:
                return await one(t)
        return await asyncio.gather(*[lim(t) for t in texts], return_exceptions=True)

    try:
        res = asyncio.run(main())
    finally:
        c.close()
    failed = [r for r in res if isinstance(r, BaseException)]
    assert not failed, failed[:3]
    for ev, toks, done in res:
        assert ev["prefill"] == 1 and ev["done"] == 1 and len(toks) == max_tokens
        assert done["token_ids"] == toks
    segs = [d["segment_id"] for _, _, d in res if d.get("segment_id")]
    assert len(segs) == len(set(segs))
    assert len(kills) >= 10 and set(kills) == {"fetch", "prefill", "decode"}
    assert sum(d["attempts"] > 1 for _, _, d in res) >= 10
    assert router.counters["resumed"] >= 1  # decode-phase losses resumed after the delivered tokens
