"""kvcluster on Ray: the cluster behind the Serve app, and the client of ``connect(...)``.

``RayCluster`` starts the index actor (``IndexService`` over embedded Qdrant, or a Qdrant server)
and ``cluster.num_workers`` worker actors (``workers.worker_actor.WorkerActor``), tells each worker
its peers, and drives them with a ``workers.scheduler.Router`` in the caller's event loop (the Serve
ingress replica's). A lost worker is retried elsewhere by the router and probed until it answers
again (actors restart once; a restarted worker gets its peers back and rejoins empty).

Clients (``connect(address, config)``; ``kvcluster.client.connect`` calls this module's):
  "ray://host:port" / "auto"  ``RayClient``: joins the Ray cluster and calls the Serve app's
                              ingress through a DeploymentHandle (no HTTP); deploys the app first
                              when it is not running.
  "http://host:port"          ``HTTPClient``: the OpenAI-compatible HTTP API (tenant = API key's).
Both return ``kvcluster.types.SubmitResult``, as the embedded client does.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import fields
from typing import Any, AsyncIterator

import ray

from index_service.service import IndexService
from kvcluster.config import KVClusterConfig
from kvcluster.types import (ClusterConnectionError, InvalidRequestError, SubmitResult, as_config,
                             validate_request)
from workers.scheduler import Router, Scheduler
from workers.worker_actor import ACTOR_OPTIONS, WorkerActor, WorkerOptions

log = logging.getLogger(__name__)

APP_NAME = "kvcluster"


class CachingEmbedder:
    """The index's embedder with a small memo of recent texts: the router looks a prompt up, then
    indexes the same prompt after it ran; the second embedding comes from here."""

    def __init__(self, inner=None, size: int = 512) -> None:
        from collections import OrderedDict

        from index_service.embedder import Embedder
        self.inner = inner or Embedder()
        self.size = size
        self._memo: OrderedDict = OrderedDict()
        self.hits = 0

    @property
    def dim(self) -> int:
        return self.inner.dim

    def embed_one(self, text: str):
        import xxhash
        key = xxhash.xxh3_128_hexdigest(text.encode("utf-8", "surrogatepass")) if isinstance(text, str) else None
        if key is not None and key in self._memo:
            self._memo.move_to_end(key)
            self.hits += 1
            return self._memo[key]
        vec = self.inner.embed_one(text)
        if key is not None:
            self._memo[key] = vec
            while len(self._memo) > self.size:
                self._memo.popitem(last=False)
        return vec

    def __getattr__(self, name):
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


class MemoIndexService(IndexService):
    """IndexService whose embedder remembers recent prompts (built inside the actor's process)."""

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("embedder", CachingEmbedder())
        super().__init__(**kwargs)


IndexActor = ray.remote(MemoIndexService)


def is_worker_lost(exc: BaseException) -> bool:
    """A worker actor died or is restarting: the request may run again elsewhere."""
    ex = ray.exceptions
    lost = (ex.RayActorError, getattr(ex, "ActorUnavailableError", ex.RayActorError))
    return isinstance(exc, lost)


class RayWorkerBackend:
    def __init__(self, handle) -> None:
        self.handle = handle

    async def stream(self, request: dict) -> AsyncIterator[dict]:
        gen = self.handle.generate_stream.options(num_returns="streaming").remote(request)
        async for ref in gen:
            yield await ref

    async def cancel(self, request_id: str) -> None:
        self.handle.cancel.remote(request_id)


class RayIndexBackend:
    def __init__(self, actor) -> None:
        self.actor = actor

    async def lookup(self, tokens, text, tenant, fingerprint, cache_salt):
        return await self.actor.lookup.remote(tokens, text, tenant, fingerprint, cache_salt)

    async def add(self, segment_id, tokens, text, tenant, scope, fingerprint, cache_salt):
        return await self.actor.add.remote(segment_id, tokens, text, tenant, scope, fingerprint, cache_salt)

    async def remove(self, segment_id):
        await self.actor.remove.remote(segment_id)


class RayCluster:
    """Index actor + worker actors + the Router that drives them (from one asyncio loop)."""

    def __init__(self, config: Any = None, *, worker_num_cpus: float = 1.0, worker_num_gpus: float | None = None,
                 worker_options: dict | None = None, index: bool | None = None, probe_s: float = 2.0) -> None:
        self.config = cfg = as_config(config)
        if not ray.is_initialized():
            raise ClusterConnectionError("Ray is not initialized: ray.init() first (or use kvcluster serve)")
        self.reuse = cfg.reuse.mode != "full" if index is None else index
        gpus = worker_num_gpus if worker_num_gpus is not None else _gpus_per_worker(cfg)
        opts = WorkerOptions.from_config(cfg, **(worker_options or {}))
        if gpus == 0 and opts.num_threads is None:
            opts.num_threads = max(1, int(worker_num_cpus))
        t0 = time.perf_counter()
        self.index_actor = None
        self.handles = {}
        for i in range(cfg.cluster.num_workers):
            wid = f"w{i}"
            if opts.tensor_parallel_size > 1:  # one worker = a group of shard actors behind rank 0's handle
                from workers.tp_group import TPWorkerGroup
                self.handles[wid] = TPWorkerGroup(wid, opts, num_cpus=worker_num_cpus, num_gpus=gpus,
                                                  wait=False).leader
                continue
            self.handles[wid] = WorkerActor.options(num_cpus=worker_num_cpus, num_gpus=gpus, **ACTOR_OPTIONS).remote(
                wid, opts)
        try:
            infos = ray.get([h.info.remote() for h in self.handles.values()])
        except Exception:
            self.shutdown()
            raise
        self.infos = {i["worker_id"]: i for i in infos}
        fps = {i["fingerprint"] for i in infos}
        if len(fps) != 1:
            self.shutdown()
            raise RuntimeError(f"workers run different models: {sorted(fps)}")
        self.fingerprint = fps.pop()
        self.max_context = min(i["max_context"] for i in infos)
        self.eos_token_ids = infos[0]["eos_token_ids"]
        self._peers = self._peer_map()
        ray.get([h.set_peers.remote(self._peers) for h in self.handles.values()])
        self.probe_s = probe_s
        self._probes: dict[str, asyncio.Task] = {}
        try:
            self._start_index()
        except Exception:
            self.shutdown()
            raise
        self._make_router(cfg.cluster.scheduler)
        log.info("kvcluster on Ray: %d workers (%s) ready in %.1f s, scheduler %s", len(self.handles),
                 self.fingerprint, time.perf_counter() - t0, cfg.cluster.scheduler)

    def _start_index(self) -> None:
        cfg = self.config
        if not self.reuse:
            return
        ix = cfg.index
        self.index_actor = IndexActor.options(num_cpus=0, max_concurrency=4).remote(
            qdrant_url=ix.qdrant_url, qdrant_path=ix.qdrant_path, collection=ix.collection, top_k=ix.top_k,
            min_score=ix.min_score, block_tokens=ix.block_tokens, min_run=cfg.reuse.min_run)
        if ix.qdrant_url is None and cfg.tiers.redis_url is None:
            # embedded index, no shared tier: the KV of every segment it knows died with an earlier process
            ray.get(self.index_actor.reconcile.remote([]))
        # loads the embedder now rather than on the first request
        ray.get(self.index_actor.lookup.remote([1, 2, 3], "warm up", "-", self.fingerprint, None))

    def _make_router(self, policy: str) -> None:
        cl = self.config.cluster
        self.scheduler = Scheduler(list(self.handles), policy=policy, load_bound=cl.load_bound,
                                   max_wait_s=cl.max_wait_s)
        self.router = Router(self.scheduler, {w: RayWorkerBackend(h) for w, h in self.handles.items()},
                             RayIndexBackend(self.index_actor) if self.index_actor is not None else None,
                             self.fingerprint, is_worker_lost=is_worker_lost, max_attempts=cl.num_workers + 1,
                             on_worker_lost=self._on_worker_lost)

    def reconfigure(self, policy: str | None = None, mode: str | None = None, redis_prefix: str | None = None) -> None:
        """Start over on the same workers (models stay loaded): empty tiers, a fresh index, a new
        scheduler; optionally another scheduler policy, reuse mode or Redis key prefix. For
        benchmarks that compare configurations; not for a cluster that is serving."""
        cfg = self.config
        if mode is not None:
            cfg = cfg.model_copy(update={"reuse": cfg.reuse.model_copy(update={"mode": mode})})
        if redis_prefix is not None:
            cfg = cfg.model_copy(update={"tiers": cfg.tiers.model_copy(update={"redis_prefix": redis_prefix})})
        self.config = cfg
        reuse = {k: getattr(cfg.reuse, k) for k in ("mode", "recompute_ratio", "check_layer", "decode_recompute",
                                                    "epic_tokens", "suffix_tokens", "min_recompute")}
        ray.get([h.reset.remote({"reuse": reuse, "redis_prefix": cfg.tiers.redis_prefix})
                 for h in self.handles.values()])
        if self.index_actor is not None:
            try:
                ray.get(self.index_actor.close.remote(), timeout=10)
            except Exception:  # noqa: BLE001
                pass
            ray.kill(self.index_actor, no_restart=True)
            self.index_actor = None
        self.reuse = cfg.reuse.mode != "full"
        self._start_index()
        self._make_router(policy or cfg.cluster.scheduler)

    def _peer_map(self) -> dict[str, Any]:
        out = {}
        for wid, h in self.handles.items():
            tcp = self.infos.get(wid, {}).get("tcp")
            out[wid] = tuple(tcp) if tcp else h
        return out

    # -- health ----------------------------------------------------------------------------------
    def _on_worker_lost(self, worker: str, exc: BaseException) -> None:
        if worker not in self._probes or self._probes[worker].done():
            self._probes[worker] = asyncio.get_running_loop().create_task(self._probe(worker))

    async def _probe(self, worker: str) -> None:
        """Ping a lost worker until it answers (Ray restarts it once), then let it rejoin."""
        h = self.handles[worker]
        while True:
            await asyncio.sleep(self.probe_s)
            try:
                info = await asyncio.wait_for(h.info.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - still down (or gone for good: keep probing, slowly)
                continue
            try:
                self.infos[worker] = info
                self._peers = self._peer_map()
                await asyncio.gather(*[x.set_peers.remote(self._peers) for x in self.handles.values()],
                                     return_exceptions=True)
            except Exception:  # noqa: BLE001
                continue
            log.info("worker %s is back", worker)
            self.router.dispatcher.mark_up(worker)
            return

    # -- requests --------------------------------------------------------------------------------
    async def worker_stats(self, timeout_s: float = 2.0) -> dict[str, dict]:
        async def one(w, h):
            try:
                return w, await asyncio.wait_for(h.stats.remote(), timeout_s)
            except Exception:  # noqa: BLE001 - a down worker has no stats now
                return w, None
        got = await asyncio.gather(*[one(w, h) for w, h in self.handles.items() if self.scheduler.is_up(w)])
        return {w: s for w, s in got if s is not None}

    def kill_worker(self, worker: str, restart: bool = True) -> None:
        """Kill a worker actor (tests, chaos): Ray restarts it when ``restart`` and it has restarts left."""
        ray.kill(self.handles[worker], no_restart=not restart)

    def shutdown(self) -> None:
        for t in self._probes.values() if hasattr(self, "_probes") else ():
            t.cancel()
        for h in list(getattr(self, "handles", {}).values()):
            try:
                ray.get(h.shutdown.remote(), timeout=5)
            except Exception:  # noqa: BLE001
                pass
            ray.kill(h, no_restart=True)
        if getattr(self, "index_actor", None) is not None:
            try:
                ray.get(self.index_actor.close.remote(), timeout=5)
            except Exception:  # noqa: BLE001
                pass
            ray.kill(self.index_actor, no_restart=True)
            self.index_actor = None
        self.handles = {}


def _gpus_per_worker(cfg: KVClusterConfig) -> float:
    dev = cfg.model.device
    if dev == "cpu":
        return 0
    if dev.startswith("cuda"):
        return 1
    have = ray.cluster_resources().get("GPU", 0)
    return 1 if have >= cfg.cluster.num_workers * cfg.model.tensor_parallel_size else 0  # a GPU per shard


# ---- clients ----------------------------------------------------------------------------------

def _result(d: dict) -> SubmitResult:
    names = {f.name for f in fields(SubmitResult)}
    return SubmitResult(**{k: v for k, v in d.items() if k in names})


def _init_ray(address: str) -> None:
    if ray.is_initialized():
        return
    import os
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    try:
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    except Exception as e:  # noqa: BLE001
        raise ClusterConnectionError(f"cannot join the Ray cluster at {address!r}: {e}") from e


class RayClient:
    """``submit``/``asubmit`` against the Serve app of a Ray cluster, through a DeploymentHandle.

    The caller is inside the cluster's trust boundary (it can start actors), so ``tenant`` is
    taken as given here; HTTP callers get their tenant from their API key instead."""

    def __init__(self, address: str, config: Any = None, app_name: str = APP_NAME, deploy: bool = True,
                 timeout_s: float = 600.0) -> None:
        from ray import serve
        self.address = address
        self.config = as_config(config)
        self.app_name = app_name
        self.timeout_s = timeout_s
        _init_ray(address)
        try:
            self._handle = serve.get_app_handle(app_name)
        except Exception as e:  # noqa: BLE001 - not deployed (RayServeException / ValueError)
            if not deploy:
                raise ClusterConnectionError(f"no kvcluster Serve app {app_name!r} on {address}: {e}") from e
            from kvcluster.serve_app import build_app
            cfg = self.config
            serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
            self._handle = serve.run(build_app(cfg), name=app_name, route_prefix="/", blocking=False)

    def _payload(self, prompt, max_tokens, temperature, tenant, share, cache_salt, top_p, seed, pin) -> dict:
        validate_request(prompt, max_tokens, temperature, tenant, share, cache_salt, top_p, seed,
                         config=self.config)
        return {"prompt": prompt, "max_tokens": max_tokens, "temperature": temperature, "tenant": tenant,
                "share": share, "cache_salt": cache_salt, "top_p": top_p, "seed": seed, "pin": pin}

    def submit(self, prompt, max_tokens: int = 64, temperature: float = 0.0, tenant: str = "default",
               share: str = "private", cache_salt: str | None = None, top_p: float = 1.0,
               seed: int | None = None, pin: str | None = None) -> SubmitResult:
        p = self._payload(prompt, max_tokens, temperature, tenant, share, cache_salt, top_p, seed, pin)
        return _result(self._handle.submit.remote(p).result(timeout_s=self.timeout_s))

    async def asubmit(self, prompt, max_tokens: int = 64, temperature: float = 0.0, tenant: str = "default",
                      share: str = "private", cache_salt: str | None = None, top_p: float = 1.0,
                      seed: int | None = None, pin: str | None = None) -> SubmitResult:
        p = self._payload(prompt, max_tokens, temperature, tenant, share, cache_salt, top_p, seed, pin)
        return _result(await self._handle.submit.remote(p))

    def cluster_stats(self) -> dict:
        return self._handle.cluster_stats.remote().result(timeout_s=60)

    def kill_worker(self, worker: str, restart: bool = True) -> None:
        self._handle.kill_worker.remote(worker, restart).result(timeout_s=60)

    def close(self) -> None:
        pass

    def __enter__(self) -> "RayClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class HTTPClient:
    """``submit``/``asubmit`` over the OpenAI-compatible HTTP API (``/v1/chat/completions``, or
    ``/v1/completions`` with ``raw=True``). The server derives the tenant from ``api_key``; a
    ``tenant`` argument that disagrees with it cannot be honoured and is refused."""

    def __init__(self, address: str, config: Any = None, api_key: str | None = None, timeout_s: float = 600.0) -> None:
        import httpx
        self.address = address.rstrip("/")
        self.config = as_config(config)
        self.api_key = api_key if api_key is not None else _first_key(self.config)
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._sync = httpx.Client(base_url=self.address, headers=headers, timeout=timeout_s)
        self._async: Any = None
        self._headers, self._timeout = headers, timeout_s
        keys = self.config.serve.api_keys
        self.tenant = keys.get(self.api_key, "default") if self.api_key else "default"

    def _body(self, prompt, max_tokens, temperature, tenant, share, cache_salt, top_p, seed) -> dict:
        validate_request(prompt, max_tokens, temperature, tenant, share, cache_salt, top_p, seed, config=self.config)
        if tenant not in ("default", self.tenant):
            raise InvalidRequestError(f"over HTTP the tenant comes from the API key ({self.tenant!r}); "
                                      f"tenant={tenant!r} cannot be honoured")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        body = {"model": self.config.model.name, "messages": messages, "max_tokens": max_tokens,
                "temperature": temperature, "top_p": top_p, "share": share}
        if seed is not None:
            body["seed"] = seed
        if cache_salt is not None:
            body["cache_salt"] = cache_salt
        return body

    def _parse(self, r, t0: float) -> SubmitResult:
        if r.status_code != 200:
            try:
                msg = r.json()["error"]["message"]
            except Exception:  # noqa: BLE001
                msg = r.text[:500]
            if r.status_code == 400:
                raise InvalidRequestError(msg)
            raise ClusterConnectionError(f"HTTP {r.status_code}: {msg}")
        d = r.json()
        kv = d.get("kvcluster", {})
        ch = d["choices"][0]
        usage = d["usage"]
        return SubmitResult(text=ch["message"]["content"], token_ids=kv.get("token_ids", []),
                            prompt_tokens=usage["prompt_tokens"],
                            cached_tokens=usage.get("prompt_tokens_details", {}).get("cached_tokens", 0),
                            recomputed_tokens=kv.get("recomputed_tokens", 0), source=kv.get("source", "miss"),
                            ttft_s=kv.get("ttft_s", time.perf_counter() - t0), decode_s=kv.get("decode_s", 0.0),
                            finish_reason=ch["finish_reason"], segment_id=kv.get("segment_id"),
                            donor_ids=kv.get("donor_ids", []), tenant=self.tenant, lookup_s=kv.get("lookup_s", 0.0),
                            prefill_s=kv.get("prefill_s", 0.0), flops_fraction=kv.get("flops_fraction", 1.0),
                            fallback=kv.get("fallback"))

    def submit(self, prompt, max_tokens: int = 64, temperature: float = 0.0, tenant: str = "default",
               share: str = "private", cache_salt: str | None = None, top_p: float = 1.0,
               seed: int | None = None) -> SubmitResult:
        import httpx
        body = self._body(prompt, max_tokens, temperature, tenant, share, cache_salt, top_p, seed)
        t0 = time.perf_counter()
        try:
            r = self._sync.post("/v1/chat/completions", json=body)
        except httpx.HTTPError as e:
            raise ClusterConnectionError(f"cannot reach {self.address}: {e}") from e
        return self._parse(r, t0)

    async def asubmit(self, prompt, max_tokens: int = 64, temperature: float = 0.0, tenant: str = "default",
                      share: str = "private", cache_salt: str | None = None, top_p: float = 1.0,
                      seed: int | None = None) -> SubmitResult:
        import httpx
        if self._async is None:
            self._async = httpx.AsyncClient(base_url=self.address, headers=self._headers, timeout=self._timeout)
        body = self._body(prompt, max_tokens, temperature, tenant, share, cache_salt, top_p, seed)
        t0 = time.perf_counter()
        try:
            r = await self._async.post("/v1/chat/completions", json=body)
        except httpx.HTTPError as e:
            raise ClusterConnectionError(f"cannot reach {self.address}: {e}") from e
        return self._parse(r, t0)

    def close(self) -> None:
        self._sync.close()
        if self._async is not None:
            try:
                asyncio.get_event_loop().run_until_complete(self._async.aclose())
            except Exception:  # noqa: BLE001
                pass

    def __enter__(self) -> "HTTPClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _first_key(cfg: KVClusterConfig) -> str | None:
    import os
    return os.environ.get("KVCLUSTER_API_KEY") or next(iter(cfg.serve.api_keys), None)


def connect(address: str, config: Any = None, **kwargs: Any):
    """The backend of ``kvcluster.connect`` for "ray://...", "auto" and "http(s)://..." addresses."""
    if not isinstance(address, str):
        raise ClusterConnectionError(f"address must be a string, got {type(address).__name__}")
    if address.startswith(("http://", "https://")):
        return HTTPClient(address, config, **kwargs)
    if address == "auto" or address.startswith("ray://"):
        return RayClient(address, config, **kwargs)
    raise ClusterConnectionError(f"unknown address {address!r}: use 'auto', 'ray://host:port' or 'http://host:port'")


def retry_after_s(pending: int, workers: int, mean_service_s: float) -> int:
    """Seconds a client refused for a full queue should wait: the queue's drain time, at least 1."""
    return max(1, math.ceil(pending * max(mean_service_s, 0.1) / max(1, workers)))
