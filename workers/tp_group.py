"""A tensor-parallel worker: a group of t Ray actors, one model shard each, that the scheduler,
the router and the peers see as one worker (the rank-0 actor's handle).

Rank 0 (the leader) is created by the caller; in its constructor it creates ranks 1..t-1 itself
(so they share its fate: Ray kills actors whose owner died, and a restarted leader builds a fresh
group), and every rank then loads the full weights on the CPU, keeps its shard
(``workers.tensor_parallel.shard_runner``) and joins torch.distributed (gloo on CPU, NCCL on
CUDA; the rendezvous address is the leader's node and a free port there). Each rank is a full
``Worker`` over its shard, with its own tiers: it stores and reuses only its own KV heads, under
its own fingerprint (so ranks share a Redis prefix without clashing).

A request reaches the leader, which forwards it to every other rank and runs it itself; the ranks
step in lock step (the all-reduces of the shards order them). What keeps them identical:
  * the plan: after fetching donors, ranks agree on the donors all of them hold and could use
    (a donor missing on one rank is dropped on all: those tokens are computed);
  * token selection: DHD/CacheBlend scores are all-reduced before top-k (the runner's hook);
  * sampling: logits are replicated and every rank samples with the request's seed; the leader
    checks at the end that every rank produced the same tokens;
  * cancellation: the leader's cancel flag is broadcast at every step, so all ranks stop together.
Requests run one at a time per group (the leader holds a group lock until every rank is done).

A peer asks the leader for KV blocks; the leader serves rank-0 keys itself and hands rank-r keys
(they carry rank r's fingerprint) to rank r, so rank r of one group reads rank r of another.

Limits (said plainly): ranks reach each other through torch.distributed only (no placement group:
on a multi-node Ray cluster ranks may land on different nodes, which works but is slow); a rank
that dies takes its group down (the leader exits and Ray restarts it once, with a fresh group);
continuous batching (``workers/continuous_batcher.py``: its paged decode has no all-reduce and its
thread does not step in lock step with other ranks), the static-batch decoder and CUDA-graph steps
are not TP-aware: a group runs ``batching=False``, one request at a time.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import replace
from typing import Any, Callable, Iterator

import ray
import torch

from index_service.plan import ReusePlan
from workers.errors import DonorKVError
from workers.tensor_parallel import (TensorParallelError, agree_objects, all_reduce_fn, backend_for,
                                     broadcast_flag, check_tp, free_port, init_distributed, load_shard,
                                     shard_runner)
from workers.worker_actor import ACTOR_OPTIONS, Worker, WorkerOptions

log = logging.getLogger(__name__)

GROUP_ACTOR_OPTIONS = dict(ACTOR_OPTIONS)  # the leader; ranks 1..t-1 never restart on their own
FOLLOWER_ACTOR_OPTIONS = dict(ACTOR_OPTIONS, max_restarts=0)


class _AgreedCancel(set):
    """The worker's set of cancelled request ids, where ``rid in`` answers with the leader's
    verdict on every rank (one broadcast): ``Worker.generate_stream`` asks once per step."""

    def __init__(self, rank: int, group) -> None:
        super().__init__()
        self.rank, self.group = rank, group

    def __contains__(self, rid: object) -> bool:
        return broadcast_flag(self.rank == 0 and set.__contains__(self, rid), self.group)


class TPWorker(Worker):
    """Rank ``rank`` of a tensor-parallel group (rank 0 creates the others: see the module)."""

    def __init__(self, worker_id: str = "w0", options: WorkerOptions | dict | None = None, rank: int = 0,
                 tp_size: int | None = None, runner_fn: Callable[[], Any] | None = None,
                 master: tuple[str, int] | None = None, actor_resources: dict | None = None) -> None:
        opts = WorkerOptions.coerce(options)
        t = int(tp_size if tp_size is not None else opts.tensor_parallel_size)
        if getattr(opts, "batching", False):  # the batcher's paged decode is not TP-aware, nor in lock step
            opts = replace(opts, batching=False)
        if opts.cuda_graph_tokens:  # graphs around the collectives are not verified on several GPUs
            opts = replace(opts, cuda_graph_tokens=0)
        if opts.warmup:  # a rank's warm-up is collectives of its own: one failing would hang the rest
            opts = replace(opts, warmup=False)
        self.tp_rank, self.tp_size = rank, t
        if opts.num_threads:
            torch.set_num_threads(opts.num_threads)
        from workers.model_loader import load_runner, pick_device
        device = pick_device(opts.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", 0)  # Ray gives each rank actor its own GPU
        # loaded before any rendezvous: a size that does not divide the model fails on every rank
        # alike (and on the leader before it starts the others), so no rank waits for the rest
        full = shard = None
        if runner_fn is not None:
            full = runner_fn()
        elif opts.kv_sharing_strategy:  # a strategy is checked against the unsharded model
            full = load_runner(opts.model, opts.gguf_file, opts.dtype, "cpu")
        else:  # only this rank's slices of the split projections are read
            shard = load_shard(opts.model, rank, t, opts.dtype, str(device), opts.gguf_file)
        if full is not None:
            check_tp(full.spec, t)
            if opts.kv_sharing_strategy:
                from workers.kvsharer import apply_strategy
                apply_strategy(full, opts.kv_sharing_strategy)
        self._followers: list = []
        self._follower_fps: dict[str, int] = {}
        if rank == 0:
            host = ray.util.get_node_ip_address()
            master = (host, free_port(host))
            Follower = ray.remote(TPWorker)
            self._followers = [Follower.options(**FOLLOWER_ACTOR_OPTIONS, **(actor_resources or {})).remote(
                worker_id, opts, r, t, runner_fn, master) for r in range(1, t)]
        elif master is None:
            raise TensorParallelError("a rank other than 0 needs the leader's address")
        backend = backend_for(device)
        if backend == "nccl":
            torch.cuda.set_device(device)
        self._pg, self._ctrl = init_distributed(rank, t, master[0], master[1], backend)
        if full is not None:
            shard = shard_runner(full, rank, t, device=device)
            del full
        shard.reduce = all_reduce_fn(self._pg)
        super().__init__(worker_id, opts, runner=shard)
        self._cancelled = _AgreedCancel(rank, self._ctrl)
        self._group_lock = threading.Lock()
        if self._followers:
            infos = ray.get([f.info.remote() for f in self._followers])
            self._follower_fps = {i["fingerprint"]: k for k, i in enumerate(infos)}

    # ---- identity ----------------------------------------------------------------------------
    def info(self) -> dict:
        out = super().info()
        out.update(tp_rank=self.tp_rank, tp_size=self.tp_size,
                   tp_fingerprints=[self.fingerprint, *self._follower_fps])
        return out

    def followers(self) -> list:
        """The actor handles of ranks 1..t-1 (tests, diagnostics)."""
        return list(self._followers)

    # ---- requests ----------------------------------------------------------------------------
    def generate_stream(self, request: dict) -> Iterator[dict]:
        if not self._followers:  # a follower (or t == 1): the leader drives it
            yield from super().generate_stream(request)
            return
        with self._group_lock:  # one request at a time: every rank must see the same order
            refs = [f.generate.remote(request) for f in self._followers]
            inner = super().generate_stream(request)
            tokens: list[int] = []
            try:
                for ev in inner:
                    if ev["type"] == "token":
                        tokens.append(ev["token_id"])
                    yield ev
            except GeneratorExit:  # the caller left: finish anyway, the other ranks are in lock step
                for _ in inner:
                    pass
                self._wait(refs, quiet=True)
                raise
            except BaseException:
                self._wait(refs, quiet=True)
                raise
            outs = self._wait(refs)
            for r, o in enumerate(outs, 1):
                if o["token_ids"] != tokens:
                    raise TensorParallelError(f"rank {r} of worker {self.worker_id} generated other tokens "
                                              f"than rank 0 ({o['token_ids'][:8]} vs {tokens[:8]})")

    def _wait(self, refs: list, quiet: bool = False) -> list:
        try:
            return ray.get(refs)
        except ray.exceptions.RayActorError as e:  # a rank died: this group cannot go on
            log.error("worker %s: a tensor-parallel rank died (%s); the group exits", self.worker_id, e)
            threading.Thread(target=_exit_soon, daemon=True).start()
            raise
        except Exception:
            if quiet:
                return []
            raise

    def _prepare(self, req: dict) -> tuple[ReusePlan | None, dict]:
        """Fetch donors as a worker does, then keep only those every rank holds and can use."""
        plan, fetch = super()._prepare(req)
        asked = req["plan"]
        if self.tp_size == 1 or asked is None or not asked.spans:  # the same on every rank
            return plan, fetch
        pre = self._ctx.prefetched or {}
        mine = [d for d in (plan.donor_ids if plan is not None else []) if d in pre and self._usable(d)]
        common = set(mine)
        for other in agree_objects(mine, self._ctrl):
            common &= set(other)
        if plan is not None and common != set(plan.donor_ids):
            gone = [d for d in plan.donor_ids if d not in common]
            for key in ("local", "fetched"):
                fetch[key] = [d for d in fetch[key] if d in common]
            fetch["dropped"] += gone
            self._ctx.prefetched = {d: s for d, s in pre.items() if d in common}
            spans = [s for s in plan.spans if s.donor_id in common]
            prefix = plan.prefix_len if all(s.donor_id in common for s in plan.spans
                                             if s.new_start < plan.prefix_len) else 0
            plan = ReusePlan(plan.n_tokens, spans, prefix_len=prefix, source=plan.source)
        return plan, fetch

    def _usable(self, donor_id: str) -> bool:
        try:
            self.engine._donor(donor_id)
            return True
        except DonorKVError as e:
            log.warning("worker %s rank %d: donor %s unusable (%s)", self.worker_id, self.tp_rank, donor_id, e)
            return False

    # ---- serving peers: rank r's keys go to rank r ---------------------------------------------
    def _export_source(self, keys: list[str]) -> list:
        if not self._follower_fps or not isinstance(keys, list):
            return super()._export_source(keys)
        by_rank: dict[int, list[int]] = {}
        for i, k in enumerate(keys):
            fp = k.split(":", 1)[0] if isinstance(k, str) else None
            by_rank.setdefault(self._follower_fps.get(fp, -1), []).append(i)
        out: list = [None] * len(keys)
        refs = {r: self._followers[r].export_encoded.remote([keys[i] for i in idx])
                for r, idx in by_rank.items() if r >= 0}
        if -1 in by_rank:
            for i, b in zip(by_rank[-1], super()._export_source([keys[i] for i in by_rank[-1]])):
                out[i] = b
        for r, ref in refs.items():
            for i, b in zip(by_rank[r], ray.get(ref)):
                out[i] = b
        return out

    # ---- group-wide lifecycle ------------------------------------------------------------------
    def set_peers(self, peers: dict[str, Any]) -> None:
        super().set_peers(peers)
        ray.get([f.set_peers.remote(peers) for f in self._followers])

    def reset(self, overrides: dict | None = None) -> None:
        with self._group_lock:
            super().reset(overrides)
            ray.get([f.reset.remote(overrides) for f in self._followers])

    def drop_segment(self, segment_id: str) -> bool:
        dropped = super().drop_segment(segment_id)
        return all(ray.get([f.drop_segment.remote(segment_id) for f in self._followers])) and dropped

    def clear_shared_tier(self) -> int:
        return super().clear_shared_tier() + sum(ray.get([f.clear_shared_tier.remote() for f in self._followers]))

    def stats(self) -> dict:
        out = super().stats()
        out["tp_size"] = self.tp_size
        return out

    def shutdown(self) -> None:
        for f in self._followers:
            try:
                ray.get(f.shutdown.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - best effort
                pass
            ray.kill(f, no_restart=True)
        self._followers = []
        super().shutdown()


def _exit_soon() -> None:
    time.sleep(0.5)  # let the error reach the caller first
    os._exit(1)


TPWorkerActor = ray.remote(TPWorker)


class TPWorkerGroup:
    """Start a tensor-parallel worker: ``leader`` is the handle the router and peers use."""

    def __init__(self, worker_id: str = "w0", options: WorkerOptions | dict | None = None,
                 tp_size: int | None = None, runner_fn: Callable[[], Any] | None = None,
                 num_cpus: float = 1.0, num_gpus: float = 0, actor_options: dict | None = None,
                 wait: bool = True) -> None:
        opts = WorkerOptions.coerce(options)
        self.tp_size = int(tp_size if tp_size is not None else opts.tensor_parallel_size)
        if self.tp_size < 1:
            raise TensorParallelError(f"tensor_parallel_size must be >= 1, got {self.tp_size}")
        opts = replace(opts, tensor_parallel_size=self.tp_size)
        res = {"num_cpus": num_cpus, "num_gpus": num_gpus}
        self.worker_id = worker_id
        self.leader = TPWorkerActor.options(**{**GROUP_ACTOR_OPTIONS, **(actor_options or {}), **res}).remote(
            worker_id, opts, 0, self.tp_size, runner_fn, None, res)
        self.info: dict | None = None
        if wait:
            try:
                self.info = ray.get(self.leader.info.remote())
            except Exception as e:
                ray.kill(self.leader, no_restart=True)
                cause = getattr(e, "cause", None)
                if isinstance(cause, TensorParallelError):
                    raise TensorParallelError(str(cause)) from None
                raise

    def generate(self, request: dict) -> dict:
        return ray.get(self.leader.generate.remote(request))

    def shutdown(self) -> None:
        try:
            ray.get(self.leader.shutdown.remote(), timeout=30)
        except Exception:  # noqa: BLE001 - best effort
            pass
        ray.kill(self.leader, no_restart=True)
