"""Cache-aware routing and per-worker queues (KVShare's scheduler). No Ray here.

Three layers, each usable alone:

``Scheduler`` (synchronous bookkeeping, unit-testable with fakes)
    Knows which worker holds which segment, every worker's queue and running count. ``route``
    sends a job to the worker that holds most of its donor KV (tokens, not segments), as long as
    that worker stays within a load bound (bounded-load hashing: a worker may take a job only
    while its load is below ``ceil(load_bound * (total_load + 1) / n_workers)``); with no such
    holder it falls back to the power of two choices (two random workers, the less loaded one).
    ``next_job`` orders a worker's queue by hit rate with aging: priority = hit_rate +
    wait / max_wait_s, and a job that has waited ``max_wait_s`` or more goes before every younger
    one (oldest first). ``policy="round_robin"`` is the plain baseline: round-robin routing and
    FIFO queues.

``Dispatcher`` (asyncio)
    Runs jobs on workers through a caller-supplied coroutine, ``slots`` at a time per worker.
    When a worker is lost (the caller's ``is_worker_lost(exc)`` says so) the worker is marked
    down, its queued jobs are routed again, and the failed job is retried on another worker (at
    most ``max_attempts`` runs). A job's result is delivered once, from the one run that
    succeeded.

``Router`` (asyncio)
    The request path around them: index lookup -> route -> stream events from the worker ->
    record where the prompt's new segment (and any fetched donor) now lives -> index add. It
    talks to workers and the index through small async backends, so the same code drives Ray
    actors (kvcluster/ray_client.py) and in-process workers (``LocalWorkerBackend``, tests).

The guarantee of aging is an ordering, not a deadline: once a job has waited ``max_wait_s`` no
later job overtakes it, so its wait is bounded by ``max_wait_s`` plus the work already ahead of
it (under overload the front refuses new requests, see serve.max_queue).
"""
from __future__ import annotations

import asyncio
import logging
import math
import random
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Protocol

from index_service.plan import ReusePlan

log = logging.getLogger(__name__)

POLICIES = ("cache_aware", "round_robin")


class NoWorkerError(RuntimeError):
    """No worker is up to take the job."""


@dataclass(eq=False)
class Job:
    """One request as the scheduler sees it."""

    prompt_tokens: int = 1
    donors: dict[str, int] = field(default_factory=dict)  # donor segment id -> tokens reused from it
    payload: Any = None
    pin: str | None = None  # run on exactly this worker (tests, debugging); ignored if it is down
    job_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created_at: float = 0.0
    enqueued_at: float = 0.0
    started_at: float = 0.0
    worker: str | None = None
    attempts: int = 0  # runs started so far
    tried: list[str] = field(default_factory=list)

    @property
    def reused_tokens(self) -> int:
        return sum(self.donors.values())

    @property
    def hit_rate(self) -> float:
        return min(1.0, self.reused_tokens / self.prompt_tokens) if self.prompt_tokens > 0 else 0.0


@dataclass
class _WorkerState:
    up: bool = True
    queue: list[Job] = field(default_factory=list)
    running: int = 0

    @property
    def load(self) -> int:
        return len(self.queue) + self.running


class Scheduler:
    def __init__(self, workers: Iterable[str], policy: str = "cache_aware", load_bound: float = 1.25,
                 max_wait_s: float = 5.0, slots: int = 1, seed: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if not load_bound >= 1.0:
            raise ValueError(f"load_bound must be >= 1, got {load_bound}")
        if not max_wait_s > 0:
            raise ValueError(f"max_wait_s must be > 0, got {max_wait_s}")
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.policy, self.load_bound, self.max_wait_s, self.slots = policy, load_bound, max_wait_s, slots
        self.clock = clock
        self._rng = random.Random(seed)
        self._w: dict[str, _WorkerState] = {}
        self._holders: dict[str, set[str]] = defaultdict(set)  # segment -> workers holding it
        self._held: dict[str, set[str]] = defaultdict(set)  # worker -> segments it holds
        self._rr = 0
        self.routed = {"locality": 0, "p2c": 0, "round_robin": 0, "pinned": 0}
        for w in workers:
            self.add_worker(w)
        if not self._w:
            raise ValueError("a scheduler needs at least one worker")

    # -- membership ------------------------------------------------------------------------------
    def add_worker(self, worker: str) -> None:
        self._w.setdefault(worker, _WorkerState())
        self._w[worker].up = True

    @property
    def workers(self) -> list[str]:
        return list(self._w)

    def up_workers(self) -> list[str]:
        return [w for w, s in self._w.items() if s.up]

    def is_up(self, worker: str) -> bool:
        return worker in self._w and self._w[worker].up

    def mark_down(self, worker: str) -> list[Job]:
        """Take a worker out: forget what it held, return its queued jobs (for re-routing)."""
        st = self._w[worker]
        st.up = False
        jobs, st.queue = st.queue, []
        for seg in self._held.pop(worker, set()):
            self._holders[seg].discard(worker)
            if not self._holders[seg]:
                del self._holders[seg]
        return jobs

    def mark_up(self, worker: str) -> None:
        self.add_worker(worker)

    # -- locality ----------------------------------------------------------------------------------
    def record_segment(self, segment_id: str, worker: str) -> None:
        if worker in self._w and self._w[worker].up:
            self._holders[segment_id].add(worker)
            self._held[worker].add(segment_id)

    def forget_segment(self, segment_id: str, worker: str | None = None) -> None:
        ws = [worker] if worker is not None else list(self._holders.get(segment_id, ()))
        for w in ws:
            self._holders.get(segment_id, set()).discard(w)
            self._held.get(w, set()).discard(segment_id)
        if segment_id in self._holders and not self._holders[segment_id]:
            del self._holders[segment_id]

    def holders(self, segment_id: str) -> set[str]:
        return set(self._holders.get(segment_id, ()))

    def holder_for(self, segment_id: str, prefer: str | None = None) -> str | None:
        """Where a worker should fetch a donor from: ``prefer`` if it holds it, else the least
        loaded up holder, else None (the worker then tries the shared tiers)."""
        hs = [w for w in self._holders.get(segment_id, ()) if self._w[w].up]
        if not hs:
            return None
        if prefer in hs:
            return prefer
        return min(hs, key=lambda w: (self._w[w].load, w))

    def local_tokens(self, job: Job, worker: str) -> int:
        return sum(n for d, n in job.donors.items() if worker in self._holders.get(d, ()))

    # -- load ------------------------------------------------------------------------------------
    def load(self, worker: str) -> int:
        return self._w[worker].load

    def total_load(self) -> int:
        return sum(s.load for s in self._w.values() if s.up)

    def pending(self) -> int:
        """Queued plus running jobs on all workers."""
        return sum(s.load for s in self._w.values())

    def capacity(self) -> int:
        """Bounded load: a worker may take a new job while its load is below this."""
        up = self.up_workers()
        return max(1, math.ceil(self.load_bound * (self.total_load() + 1) / max(1, len(up))))

    # -- routing -----------------------------------------------------------------------------------
    def route(self, job: Job) -> str:
        up = self.up_workers()
        if not up:
            raise NoWorkerError("no worker is up")
        if job.pin is not None and job.pin in up:
            self.routed["pinned"] += 1
            return job.pin
        if self.policy == "round_robin":
            order = self.workers
            for _ in range(len(order)):
                w = order[self._rr % len(order)]
                self._rr += 1
                if self._w[w].up:
                    self.routed["round_robin"] += 1
                    return w
        cap = self.capacity()
        local = {w: self.local_tokens(job, w) for w in up}
        holders = [w for w in up if local[w] > 0 and self._w[w].load < cap]
        if holders:
            self.routed["locality"] += 1
            return max(holders, key=lambda w: (local[w], -self._w[w].load, w))
        self.routed["p2c"] += 1
        two = self._rng.sample(up, 2) if len(up) >= 2 else up
        return min(two, key=lambda w: (self._w[w].load, -local[w]))

    def submit(self, job: Job) -> str:
        """Route and enqueue; returns the worker."""
        w = self.route(job)
        now = self.clock()
        job.created_at = job.created_at or now
        job.enqueued_at = now
        job.worker = w
        self._w[w].queue.append(job)
        return w

    def cancel(self, job: Job) -> bool:
        """Drop a job that is still queued; False if it is not queued (running or done)."""
        if job.worker is None or job.worker not in self._w:
            return False
        q = self._w[job.worker].queue
        if job in q:
            q.remove(job)
            return True
        return False

    # -- queue order -------------------------------------------------------------------------------
    def priority(self, job: Job, now: float | None = None) -> float:
        now = self.clock() if now is None else now
        return job.hit_rate + (now - job.created_at) / self.max_wait_s

    def can_start(self, worker: str) -> bool:
        st = self._w[worker]
        return st.up and st.running < self.slots and bool(st.queue)

    def next_job(self, worker: str) -> Job | None:
        """Take the next job off a worker's queue (and count it as running)."""
        st = self._w[worker]
        if not st.up or not st.queue:
            return None
        if self.policy == "round_robin":
            job = st.queue[0]
        else:
            now = self.clock()
            overdue = [j for j in st.queue if now - j.created_at >= self.max_wait_s]
            if overdue:
                job = min(overdue, key=lambda j: j.created_at)
            else:
                job = max(st.queue, key=lambda j: (self.priority(j, now), -j.created_at))
        st.queue.remove(job)
        st.running += 1
        job.started_at = self.clock()
        return job

    def finish(self, job: Job, worker: str) -> None:
        st = self._w.get(worker)
        if st is not None and st.running > 0:
            st.running -= 1

    def snapshot(self) -> dict[str, Any]:
        return {"policy": self.policy, "routed": dict(self.routed),
                "workers": {w: {"up": s.up, "queued": len(s.queue), "running": s.running,
                                "segments": len(self._held.get(w, ()))} for w, s in self._w.items()}}


Call = Callable[[str, Job], Awaitable[Any]]


class Dispatcher:
    """Runs each job on the worker the scheduler picks; retries a job whose worker was lost."""

    def __init__(self, scheduler: Scheduler, is_worker_lost: Callable[[BaseException], bool] = lambda e: False,
                 max_attempts: int = 3, on_worker_lost: Callable[[str, BaseException], None] | None = None,
                 park_s: float = 120.0) -> None:
        self.scheduler = scheduler
        # with every worker down (all restarting), jobs wait this long for one to come back
        # instead of failing at once
        self.park_s = park_s
        self._parked: dict[Job, asyncio.TimerHandle] = {}
        self.is_worker_lost = is_worker_lost
        self.max_attempts = max_attempts
        self.on_worker_lost = on_worker_lost
        self._pending: dict[Job, tuple[Call, asyncio.Future]] = {}
        self._running: dict[Job, asyncio.Task] = {}
        self._tasks: set[asyncio.Task] = set()
        self.retries = 0
        self.workers_lost = 0

    async def run(self, job: Job, call: Call) -> Any:
        """Queue ``job`` and return ``call(worker, job)``'s result from the run that succeeded."""
        fut = asyncio.get_running_loop().create_future()
        self._pending[job] = (call, fut)
        try:
            self._submit(job)
            return await fut
        except asyncio.CancelledError:
            self.scheduler.cancel(job)
            running = self._running.get(job)
            if running is not None:
                running.cancel()
            raise
        finally:
            self._pending.pop(job, None)
            timer = self._parked.pop(job, None)
            if timer is not None:
                timer.cancel()

    def _submit(self, job: Job) -> None:
        try:
            w = self.scheduler.submit(job)
        except NoWorkerError as e:
            if self.scheduler.workers and self.park_s > 0:  # known workers, all down: wait
                self._park(job, e)
            else:
                self._fail(job, e)
            return
        self._pump(w)

    def _park(self, job: Job, exc: BaseException) -> None:
        if job in self._parked:
            return
        loop = asyncio.get_running_loop()
        self._parked[job] = loop.call_later(self.park_s, self._expire, job, exc)

    def _expire(self, job: Job, exc: BaseException) -> None:
        if self._parked.pop(job, None) is not None:
            self._fail(job, NoWorkerError(f"{exc}; none came back within {self.park_s:.0f} s"))

    def _unpark(self) -> None:
        parked, self._parked = self._parked, {}
        for job, timer in parked.items():
            timer.cancel()
            if job in self._pending and not self._pending[job][1].done():
                self._submit(job)

    def _fail(self, job: Job, exc: BaseException) -> None:
        entry = self._pending.get(job)
        if entry is not None and not entry[1].done():
            entry[1].set_exception(exc)

    def _pump(self, worker: str) -> None:
        while self.scheduler.can_start(worker):
            job = self.scheduler.next_job(worker)
            if job is None:
                return
            entry = self._pending.get(job)
            if entry is None or entry[1].done():  # cancelled meanwhile
                self.scheduler.finish(job, worker)
                continue
            job.attempts += 1
            job.tried.append(worker)
            task = asyncio.get_running_loop().create_task(self._execute(worker, job, *entry))
            self._tasks.add(task)
            self._running[job] = task
            task.add_done_callback(self._tasks.discard)

    async def _execute(self, worker: str, job: Job, call: Call, fut: asyncio.Future) -> None:
        retry = False
        try:
            result = await call(worker, job)
            if not fut.done():
                fut.set_result(result)
        except asyncio.CancelledError:
            if not fut.done():
                fut.cancel()
        except Exception as e:  # noqa: BLE001 - delivered to the caller, or retried
            if self.is_worker_lost(e) and not fut.done():
                self._lose(worker, e)
                retry = job.attempts < self.max_attempts
                if not retry:
                    fut.set_exception(e)
            elif not fut.done():
                fut.set_exception(e)
        finally:
            self._running.pop(job, None)
            self.scheduler.finish(job, worker)
            if retry:
                self.retries += 1
                log.warning("job %s lost its worker %s; retrying (attempt %d)", job.job_id, worker,
                            job.attempts + 1)
                self._submit(job)
            if self.scheduler.is_up(worker):
                self._pump(worker)

    def _lose(self, worker: str, exc: BaseException) -> None:
        if not self.scheduler.is_up(worker):
            return
        self.workers_lost += 1
        log.warning("worker %s lost (%s: %s); routing its jobs elsewhere", worker, type(exc).__name__, exc)
        for job in self.scheduler.mark_down(worker):
            self._submit(job)
        if self.on_worker_lost is not None:
            self.on_worker_lost(worker, exc)

    def mark_up(self, worker: str) -> None:
        self.scheduler.mark_up(worker)
        self._unpark()
        self._pump(worker)

    async def drain(self) -> None:
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


# ---- the request path --------------------------------------------------------------------------

class WorkerBackend(Protocol):
    """How the router talks to one worker (a Ray actor, or an in-process Worker)."""

    def stream(self, request: dict) -> AsyncIterator[dict]: ...
    async def cancel(self, request_id: str) -> None: ...


class IndexBackend(Protocol):
    async def lookup(self, tokens: list[int], text: str | None, tenant: str, fingerprint: str,
                     cache_salt: str | None) -> ReusePlan: ...
    async def add(self, segment_id: str, tokens: list[int], text: str, tenant: str, scope: str,
                  fingerprint: str, cache_salt: str | None) -> bool: ...
    async def remove(self, segment_id: str) -> None: ...


@dataclass
class RouterRequest:
    token_ids: list[int]
    text: str | None = None  # what the index embeds (None: exact prefix only)
    tenant: str = "default"
    scope: str = "private"
    cache_salt: str | None = None
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: list[int] | None = None
    reuse: bool = True  # look up donors; False = compute everything (still writes back if write_back)
    write_back: bool = True
    mode: str | None = None  # reuse mode override for this request
    pin: str | None = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


def plan_to_wire(plan: ReusePlan | None) -> dict | None:
    if plan is None:
        return None
    return {"n_tokens": plan.n_tokens, "prefix_len": plan.prefix_len, "source": plan.source,
            "spans": [[s.new_start, s.donor_id, s.donor_start, s.length] for s in plan.spans]}


class Router:
    """lookup -> schedule -> worker events -> write-back bookkeeping, for one cluster front."""

    def __init__(self, scheduler: Scheduler, workers: dict[str, WorkerBackend], index: IndexBackend | None,
                 fingerprint: str, is_worker_lost: Callable[[BaseException], bool] = lambda e: False,
                 max_attempts: int = 3,
                 on_worker_lost: Callable[[str, BaseException], None] | None = None,
                 relookup_after_s: float | None = 0.25) -> None:
        self.scheduler = scheduler
        # A job that waited in a queue this long looks its donors up again when it starts: under
        # load a follow-up often arrives while its donor is still queued or running, and finds it
        # in the index only later. None turns this off.
        self.relookup_after_s = relookup_after_s
        self.workers = workers
        self.index = index
        self.fingerprint = fingerprint
        self.dispatcher = Dispatcher(scheduler, is_worker_lost, max_attempts, on_worker_lost)
        self.counters = defaultdict(int)
        self._live: dict[str, tuple[str, str]] = {}  # request id -> (worker, worker-side request id)

    async def cancel(self, request_id: str) -> None:
        """Ask the worker running a request to stop generating (it still reports "done")."""
        live = self._live.get(request_id)
        if live is not None:
            await self.workers[live[0]].cancel(live[1])

    async def lookup(self, req: RouterRequest) -> tuple[ReusePlan | None, float]:
        if self.index is None or not req.reuse:
            return None, 0.0
        t0 = time.perf_counter()
        try:
            plan = await self.index.lookup(req.token_ids, req.text, req.tenant, self.fingerprint, req.cache_salt)
        except Exception as e:  # noqa: BLE001 - a failed lookup is a miss
            self.counters["lookup_errors"] += 1
            log.warning("index lookup failed (%s: %s); treating it as a miss", type(e).__name__, e)
            plan = None
        return plan, time.perf_counter() - t0

    async def generate(self, req: RouterRequest) -> dict:
        """Run a request to the end: {"prefill": event, "token_ids": [...], "done": event}."""
        out: dict[str, Any] = {"token_ids": []}
        async for ev in self.stream(req):
            if ev["type"] == "token":
                out["token_ids"].append(ev["token_id"])
            else:
                out[ev["type"]] = ev
        return out

    async def stream(self, req: RouterRequest) -> AsyncIterator[dict]:
        """Events: "prefill" (once), "token" (one per generated token), "done" (once, last).

        A worker lost mid-request is transparent: the job runs again on another worker, resumed
        after the tokens already delivered (their KV is recomputed there), so no token is lost
        or repeated."""
        plan, lookup_s = await self.lookup(req)
        n = len(req.token_ids)
        donors: dict[str, int] = defaultdict(int)
        if plan is not None:
            for s in plan.spans:
                donors[s.donor_id] += s.length
        skip_write = plan is not None and plan.prefix_len >= n  # already stored as a prefix
        state = {"req": req, "plan": plan, "emitted": [], "prefill": None, "done": None,
                 "segment_id": uuid.uuid4().hex if (req.write_back and not skip_write) else None,
                 "lookup_s": lookup_s, "queue": asyncio.Queue()}
        job = Job(prompt_tokens=n, donors=dict(donors), payload=state, pin=req.pin)
        q: asyncio.Queue = state["queue"]
        task = asyncio.get_running_loop().create_task(self.dispatcher.run(job, self._call))
        task.add_done_callback(lambda t: q.put_nowait(("end", None)))
        try:
            while True:
                kind, ev = await q.get()
                if kind == "end":
                    break
                yield ev
            done = task.result()  # raises the job's error, if any
            await self._after(req, job, state, done)
            yield state["done"]
        finally:
            if not task.done():
                task.cancel()

    async def _call(self, worker: str, job: Job) -> dict:
        state = job.payload
        req: RouterRequest = state["req"]
        q: asyncio.Queue = state["queue"]
        emitted: list[int] = state["emitted"]
        plan: ReusePlan | None = state["plan"]
        resume = bool(emitted) or state["prefill"] is not None
        if (not resume and self.relookup_after_s is not None and job.attempts == 1 and req.reuse
                and self.index is not None
                and job.started_at - job.created_at >= self.relookup_after_s
                and (plan is None or plan.reused_tokens < len(req.token_ids) - 1)):
            plan = await self._relookup(req, state, plan)
        ids = list(req.token_ids) + list(emitted)
        if resume:
            self.counters["resumed"] += 1
            plan = (ReusePlan(len(ids), list(plan.spans), plan.prefix_len, plan.source)
                    if plan is not None else None)
        donors = plan.donor_ids if plan is not None else []
        wreq = {"request_id": f"{req.request_id}:{job.attempts}", "token_ids": ids,
                "max_tokens": req.max_tokens - len(emitted), "temperature": req.temperature,
                "top_p": req.top_p, "seed": req.seed, "stop_ids": req.stop_ids,
                "plan": plan_to_wire(plan), "tenant": req.tenant, "scope": req.scope,
                "donor_locations": {d: self.scheduler.holder_for(d, prefer=worker) for d in donors},
                "segment_id": None if resume else state["segment_id"], "mode": req.mode}
        backend = self.workers[worker]
        done = None
        self._live[req.request_id] = (worker, wreq["request_id"])
        try:
            async for ev in backend.stream(wreq):
                t = ev.get("type")
                if t == "prefill":
                    if state["prefill"] is None:
                        ev = dict(ev, lookup_s=state["lookup_s"], worker=worker)
                        state["prefill"] = ev
                        q.put_nowait(("ev", ev))
                elif t == "token":
                    emitted.append(ev["token_id"])
                    q.put_nowait(("ev", ev))
                elif t == "done":
                    done = dict(ev, worker=worker)
            if done is None:
                raise RuntimeError(f"worker {worker} ended request {req.request_id} without a result")
            return done
        except asyncio.CancelledError:
            try:
                await asyncio.shield(backend.cancel(wreq["request_id"]))
            except Exception:  # noqa: BLE001 - best effort
                pass
            raise
        finally:
            self._live.pop(req.request_id, None)

    async def _relookup(self, req: RouterRequest, state: dict, plan: ReusePlan | None) -> ReusePlan | None:
        new, dt = await self.lookup(req)
        state["lookup_s"] += dt
        self.counters["relookups"] += 1
        if new is not None and new.reused_tokens > (plan.reused_tokens if plan is not None else 0):
            self.counters["relookup_gains"] += 1
            state["plan"] = new
            if new.prefix_len >= len(req.token_ids):
                state["segment_id"] = None  # all of it is stored already
            return new
        return plan

    async def _after(self, req: RouterRequest, job: Job, state: dict, done: dict) -> None:
        worker = done["worker"]
        sched = self.scheduler
        for d in done.get("fetched_donors", ()):
            sched.record_segment(d, worker)
        for d in done.get("missing_donors", ()):
            # not on its holder, no peer and not in the shared tiers: the index must forget it
            sched.forget_segment(d)
            if self.index is not None:
                try:
                    await self.index.remove(d)
                except Exception as e:  # noqa: BLE001
                    log.warning("could not drop missing donor %s from the index (%s)", d, e)
        sid = done.get("segment_id")
        if sid:
            sched.record_segment(sid, worker)
            if self.index is not None:
                try:
                    ok = await self.index.add(sid, list(req.token_ids), req.text or "", req.tenant, req.scope,
                                              self.fingerprint, req.cache_salt)
                    self.counters["indexed" if ok else "indexed_prefix_only"] += 1
                except Exception as e:  # noqa: BLE001 - an unindexed segment is only wasted memory
                    self.counters["index_errors"] += 1
                    log.warning("could not index segment %s (%s: %s)", sid, type(e).__name__, e)
        first = state["prefill"] or {}
        state["done"] = dict(done, type="done", token_ids=list(state["emitted"]), attempts=job.attempts,
                             workers=list(job.tried), queue_s=max(0.0, job.started_at - job.created_at),
                             prefill=first)

    def stats(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.snapshot(), "retries": self.dispatcher.retries,
                "workers_lost": self.dispatcher.workers_lost, **self.counters}


class LocalWorkerBackend:
    """An in-process Worker (workers/worker_actor.py) behind the WorkerBackend interface: its
    blocking generator runs in a thread, events cross into the event loop one by one."""

    def __init__(self, worker) -> None:
        self.worker = worker

    async def stream(self, request: dict) -> AsyncIterator[dict]:
        loop = asyncio.get_running_loop()
        it = self.worker.generate_stream(request)
        end = object()
        while True:
            ev = await loop.run_in_executor(None, next, it, end)
            if ev is end:
                return
            yield ev

    async def cancel(self, request_id: str) -> None:
        self.worker.cancel(request_id)


class LocalIndexBackend:
    """An in-process IndexService behind the IndexBackend interface (calls run in a thread)."""

    def __init__(self, index) -> None:
        self.index = index

    async def lookup(self, tokens, text, tenant, fingerprint, cache_salt):
        return await asyncio.to_thread(self.index.lookup, tokens, text, tenant, fingerprint, cache_salt)

    async def add(self, segment_id, tokens, text, tenant, scope, fingerprint, cache_salt):
        return await asyncio.to_thread(self.index.add, segment_id, tokens, text, tenant, scope, fingerprint,
                                       cache_salt)

    async def remove(self, segment_id):
        await asyncio.to_thread(self.index.remove, segment_id)
