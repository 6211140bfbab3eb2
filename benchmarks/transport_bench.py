#!/usr/bin/env python3
"""Transport benchmarks: each kvcluster path beside its raw equivalent, in the same run.

    python benchmarks/transport_bench.py            # CPU: Redis tier, TCP channel, UCX (if ucxx)
    python benchmarks/transport_bench.py --gpu      # host tier -> GPU vs a raw pinned copy
    python benchmarks/transport_bench.py --gpu --device cpu --total-mib 16   # dry run on CPU
    python benchmarks/transport_bench.py --nccl     # GPU -> GPU channel vs raw NCCL send/recv (2 GPUs)

The GPU modes need only torch, numpy, msgpack and xxhash (no redis, no ray). ``--device cpu`` and
``--backend gloo`` run the same GPU code on a CPU machine, as a smoke test. Every block size moves
``--total-mib`` per iteration (many blocks per message); times are medians. Results: JSON (and a
PNG for the CPU mode) in benchmarks/results/, and a short table printed last.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from transport.block import KVBlock, decode_block, encode_block_bytes  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SIZES = [64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20]


# -- helpers ------------------------------------------------------------------------------------
def make_blocks(size: int, n: int, device: str = "cpu") -> list[tuple[str, KVBlock]]:
    """n bf16 blocks of `size` bytes of KV: [8 layers, 8 kv heads, 64 tokens, d]."""
    d = size // (8 * 8 * 64 * 2 * 2)
    g = torch.Generator().manual_seed(size)
    out = []
    for i in range(n):
        k = torch.randn(8, 8, 64, d, generator=g).to(torch.bfloat16).to(device)
        out.append((f"b{size}-{i}", KVBlock("bench-fp", tuple(range(8)), i, k, k.roll(1, -1))))
    return out


def paired(fns: dict, min_reps: int = 9, min_s: float = 1.5, warmup: int = 2) -> dict:
    """Median time of each function, run in turn (a, b, c, a, b, c, ...) so that all of them see
    the same background load: this machine is shared, and its load swings by the second."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict = {name: [] for name in fns}
    t_end = time.perf_counter() + min_s
    while len(times[next(iter(fns))]) < min_reps or time.perf_counter() < t_end:
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
        if len(times[name]) >= 300:
            break
    return {name: statistics.median(ts) for name, ts in times.items()}


def row(bench: str, size: int, n: int, ours_s: float, raw_s: float, ours: str, raw: str) -> dict:
    total = size * n
    return {"bench": bench, "block_bytes": size, "blocks_per_iter": n, "bytes_per_iter": total,
            "ours": ours, "raw": raw, "ours_s": ours_s, "raw_s": raw_s,
            "ours_GBps": total / ours_s / 1e9, "raw_GBps": total / raw_s / 1e9,
            "ratio_vs_raw": raw_s / ours_s}


def machine() -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor(),
            "machine": platform.machine(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__}
    from transport import verify
    info["verify_hash_threads"] = 0 if verify.HASH_THREADS is None else verify.HASH_THREADS.n
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


# -- CPU: Redis ------------------------------------------------------------------------------------
def bench_redis(sizes, total, url) -> list[dict]:
    import redis
    from redis.connection import Encoder, PythonRespSerializer

    from transport.tiers.redis_tier import RedisTier

    rows = []
    raw = redis.Redis.from_url(url)
    # redis-py's pure-Python packer passes a large bytes value to sendall as it is (no copy);
    # the default hiredis packer copies it into the packed command first
    nocopy = redis.Redis.from_url(url, command_packer=PythonRespSerializer(
        6000, Encoder("utf-8", "strict", False).encode))
    tier = RedisTier(url, prefix=f"kvc-bench-{uuid.uuid4().hex[:8]}:", ttl_s=600,
                     max_block_bytes=64 << 20)
    try:
        for size in sizes:
            n = max(1, total // size)
            blocks = make_blocks(size, n)
            keys = [k for k, _ in blocks]
            enc = [bytes(encode_block_bytes(b)) for _, b in blocks]
            rkeys = [f"{tier.prefix}raw:{k}" for k in keys]

            def raw_set():
                p = raw.pipeline(transaction=False)
                for k, v in zip(rkeys, enc):
                    p.set(k, v, ex=600)
                p.execute()

            def raw_set_nocopy():
                p = nocopy.pipeline(transaction=False)
                for k, v in zip(rkeys, enc):
                    p.set(k, v, ex=600)
                p.execute()

            def raw_get():
                p = raw.pipeline(transaction=False)
                for k in rkeys:
                    p.get(k)
                assert all(v is not None for v in p.execute())

            def tier_get():
                assert all(b is not None for b in tier.get_many(keys))

            pre = list(zip(keys, enc))
            t = paired({"put": lambda: tier.put_many(blocks), "rawput": raw_set,
                        "rawputnc": raw_set_nocopy,
                        "putenc": lambda: tier.put_encoded_many(pre),
                        "get": tier_get, "rawget": raw_get})
            t_put, t_rawput, t_get, t_rawget = t["put"], t["rawput"], t["get"], t["rawget"]
            rows.append(row("redis_get", size, n, t_get, t_rawget,
                            "RedisTier.get_many (pipelined GET + verify + decode)",
                            "redis-py pipelined GET of the same bytes"))
            rows.append(row("redis_put", size, n, t_put, t_rawput,
                            "RedisTier.put_many (encode: header + xxh64; the header and the "
                            "tensors' memory sent as they are, no copy)",
                            "redis-py (default: hiredis packer) pipelined SET EX of pre-encoded "
                            "bytes"))
            rows.append(row("redis_put_vs_nocopy_raw", size, n, t_put, t["rawputnc"],
                            "RedisTier.put_many (encode: header + xxh64; the header and the "
                            "tensors' memory sent as they are)",
                            "redis-py (pure-Python packer: no copy of the value) pipelined SET "
                            "EX of pre-encoded bytes"))
            rows.append(row("redis_put_encoded", size, n, t["putenc"], t_rawput,
                            "RedisTier.put_encoded_many (the write-back path: the host tier "
                            "already holds the encoded block)",
                            "redis-py pipelined SET EX of pre-encoded bytes"))
            raw.delete(*rkeys)
            tier.clear()
    finally:
        tier.clear()
        tier.close()
    return rows


# -- CPU: TCP and UCX (servers in a child process, as between two workers) --------------------------
def encoded_blocks(size: int, n: int) -> dict[str, bytes]:
    return {k: encode_block_bytes(b) for k, b in make_blocks(size, n)}


def _serve_raw_tcp(payload: bytes, port_pipe) -> None:
    """The raw path: on each 1-byte request, sendall() the same bytes back."""
    import socket
    from transport.channels.tcp import _tune
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    port_pipe.send(s.getsockname()[1])
    conn, _ = s.accept()
    _tune(conn)
    with conn:
        while conn.recv(1):
            conn.sendall(payload)


async def _serve_raw_ucx(payload: bytes, port_pipe) -> None:
    import asyncio

    import ucxx
    arr = np.frombuffer(payload, dtype=np.uint8)

    async def handler(ep):
        req = np.empty(1, dtype=np.uint8)
        try:
            while True:
                await ep.recv(req)
                await ep.send(arr)
        except BaseException:
            pass
    listener = ucxx.create_listener(handler)
    port_pipe.send(listener.port)
    await asyncio.get_running_loop().run_in_executor(None, port_pipe.recv)
    listener.close()


async def _serve_ours_ucx(enc: dict, port_pipe) -> None:
    import asyncio

    from transport.channels.ucx import UCXServer
    srv = UCXServer(source=lambda ks: [enc.get(k) for k in ks])
    port_pipe.send(await srv.start())
    await asyncio.get_running_loop().run_in_executor(None, port_pipe.recv)
    srv.close()


def _server_main(kind: str, size: int, n: int, port_pipe) -> None:
    import asyncio
    torch.set_num_threads(1)
    enc = encoded_blocks(size, n)
    if kind == "tcp_ours":
        from transport.channels.tcp import TCPServer
        srv = TCPServer(source=lambda ks: [enc.get(k) for k in ks])
        port_pipe.send(srv.start_background())
        port_pipe.recv()
        srv.stop()
    elif kind == "tcp_raw":
        _serve_raw_tcp(b"".join(enc.values()), port_pipe)
    elif kind == "ucx_raw":
        asyncio.run(_serve_raw_ucx(b"".join(enc.values()), port_pipe))
    elif kind == "ucx_ours":
        asyncio.run(_serve_ours_ucx(enc, port_pipe))


class ServerProcess:
    def __init__(self, kind: str, size: int, n: int) -> None:
        import multiprocessing as mp
        ctx = mp.get_context("spawn")
        self.pipe, child = ctx.Pipe()
        self.proc = ctx.Process(target=_server_main, args=(kind, size, n, child), daemon=True)
        self.proc.start()
        self.port = self.pipe.recv()

    def stop(self) -> None:
        try:
            self.pipe.send("stop")
        except OSError:
            pass
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()


def bench_tcp(sizes, total) -> list[dict]:
    """TCPClient.fetch (verifying, as it always runs) and with verify=False, beside a raw socket
    moving the same bytes in the same number of messages (one request, one reply of all blocks),
    and beside the raw socket plus an xxh64 of every block (the same work as the channel's)."""
    import socket

    import xxhash

    from transport import verify
    from transport.channels.tcp import TCPClient, _recv_into, _tune

    rows = []
    for size in sizes:
        n = max(1, total // size)
        enc = encoded_blocks(size, n)
        keys = list(enc)
        sizes_b = [len(v) for v in enc.values()]
        ours, raw = ServerProcess("tcp_ours", size, n), ServerProcess("tcp_raw", size, n)
        client = TCPClient("127.0.0.1", ours.port)
        client_nv = TCPClient("127.0.0.1", ours.port, verify=False)
        rawsock = socket.create_connection(("127.0.0.1", raw.port))
        _tune(rawsock)
        rbuf = memoryview(bytearray(sum(sizes_b)))

        def raw_fetch():
            rawsock.sendall(b"g")
            _recv_into(rawsock, rbuf)

        def raw_fetch_xxh64():
            raw_fetch()
            off = 0
            for sz in sizes_b:  # the whole block: a little more than its payload
                h = xxhash.xxh64()
                h.update(rbuf[off:off + sz])
                h.intdigest()
                off += sz

        default_threads = verify.HASH_THREADS
        threads = verify.HashThreads(4)

        def fetch_with(lanes):
            def fetch():
                verify.HASH_THREADS = lanes
                try:
                    got = client.fetch(keys)
                finally:
                    verify.HASH_THREADS = default_threads
                assert all(b is not None for b in got)
            return fetch

        t = paired({"ch": fetch_with(default_threads), "raw": raw_fetch,
                    "chnv": lambda: client_nv.fetch(keys), "rawx": raw_fetch_xxh64,
                    "inline": fetch_with(None), "threads": fetch_with(threads)},
                   min_reps=25, min_s=4.0)
        assert client.corrupt == 0
        raw_desc = ("blocking socket: 1-byte request, sendall of the same bytes -> recv_into a "
                    "reused buffer; no verification")
        lanes = 0 if default_threads is None else default_threads.n
        rows.append(row("tcp_fetch", size, n, t["ch"], t["raw"],
                        "TCPClient.fetch <- TCPServer (asyncio): request, reply of all blocks into "
                        "a pooled body buffer, every block verified (header checks + "
                        f"payload xxh64) while it arrives ({lanes} hash threads: this "
                        "machine's default)", raw_desc))
        rows.append(row("tcp_fetch_noverify", size, n, t["chnv"], t["raw"],
                        "TCPClient(verify=False).fetch: the same without verification", raw_desc))
        rows.append(row("tcp_fetch_inline", size, n, t["inline"], t["raw"],
                        "TCPClient.fetch, verifying on the receiving thread", raw_desc))
        rows.append(row("tcp_fetch_4_hash_threads", size, n, t["threads"], t["raw"],
                        "TCPClient.fetch, verifying on 4 hash threads (xxhash releases the GIL)",
                        raw_desc))
        rows.append(row("tcp_fetch_vs_raw_xxh64", size, n, t["ch"], t["rawx"],
                        "TCPClient.fetch (verifying)",
                        "the raw socket path plus an xxh64 of every received block (the same work)"))
        client.close()
        client_nv.close()
        rawsock.close()
        ours.stop()
        raw.stop()
    return rows


def bench_ucx(sizes, total) -> list[dict]:
    """UCXClient.fetch (verifying, as it always runs) and with verify=False, beside raw ucxx
    moving the same bytes in one request and one reply message into a reused buffer, and beside
    that raw path plus an xxh64 of every block (the same work as the channel's).

    Each path is connected only while it is timed: ucxx (by default) waits for a request by
    polling it on every turn of the event loop, so a server with a connection open sits on a
    pending receive and spins a core even when idle. With both servers connected, the idle one
    took a core from whichever path was being timed, on 2 cores, and the ratios swung from 0.5
    to 1.2 between identical runs."""
    import asyncio

    import xxhash

    from transport.channels.ucx import UCXClient, ucx_available
    if not ucx_available():
        print("ucxx not importable: UCX benchmark skipped")
        return []
    import ucxx

    async def rounds(paths: dict, per_round: int = 3, min_reps: int = 30,
                     min_s: float = 4.0) -> dict:
        """As paired(), a round connecting each path in turn (``paths``: name -> async opener
        returning (fetch, close)), then one untimed fetch and ``per_round`` timed ones."""
        times: dict = {name: [] for name in paths}
        t_end = time.perf_counter() + min_s
        while len(times["ch"]) < min_reps or time.perf_counter() < t_end:
            for name, opener in paths.items():
                fetch, close = await opener()
                await fetch()
                for _ in range(per_round):
                    t = time.perf_counter()
                    await fetch()
                    times[name].append(time.perf_counter() - t)
                await close()
            if len(times["ch"]) >= 300:
                break
        return {name: statistics.median(ts) for name, ts in times.items()}

    async def run() -> list[dict]:
        rows = []
        for size in sizes:
            n = max(1, total // size)
            enc = encoded_blocks(size, n)
            keys = list(enc)
            sizes_b = [len(v) for v in enc.values()]
            ours, raw = ServerProcess("ucx_ours", size, n), ServerProcess("ucx_raw", size, n)
            rbuf = np.empty(sum(sizes_b), dtype=np.uint8)
            one = np.ones(1, dtype=np.uint8)
            corrupt = []

            def channel(verify: bool):
                async def opener():
                    client = await UCXClient.connect("127.0.0.1", ours.port, verify=verify)

                    async def fetch():
                        got = await client.fetch(keys)
                        assert all(b is not None for b in got)

                    async def close():
                        corrupt.append(client.corrupt)
                        await client.close()
                    return fetch, close
                return opener

            def raw_path(hash_blocks: bool):
                async def opener():
                    ep = await ucxx.create_endpoint("127.0.0.1", raw.port)

                    async def fetch():
                        await ep.send(one)
                        await ep.recv(rbuf)
                        off = 0
                        for sz in sizes_b if hash_blocks else ():
                            # the whole block: a little more than its payload
                            xxhash.xxh64(memoryview(rbuf)[off:off + sz]).intdigest()
                            off += sz
                    return fetch, ep.close
                return opener

            t = await rounds({"ch": channel(True), "raw": raw_path(False),
                              "chnv": channel(False), "rawx": raw_path(True)})
            assert not any(corrupt)
            raw_desc = ("raw ucxx: 1-byte request, ep.send of the same bytes as one message -> "
                        "ep.recv into a reused buffer; no verification")
            rows.append(row("ucx_fetch", size, n, t["ch"], t["raw"],
                            "UCXClient.fetch <- UCXServer: request, reply of one message per block "
                            "(all posted at once) into a pooled body, every block verified "
                            "(header checks + payload xxh64) as it lands", raw_desc))
            rows.append(row("ucx_fetch_noverify", size, n, t["chnv"], t["raw"],
                            "UCXClient(verify=False).fetch: the same without verification",
                            raw_desc))
            rows.append(row("ucx_fetch_vs_raw_xxh64", size, n, t["ch"], t["rawx"],
                            "UCXClient.fetch (verifying)",
                            "the raw ucxx path plus an xxh64 of every received block (the same "
                            "work)"))
            ours.stop()
            raw.stop()
        return rows

    return asyncio.run(run())


# -- GPU: host tier -> device ---------------------------------------------------------------------
def bench_host_to_gpu(sizes, total, device: str, gather_below: int) -> list[dict]:
    """One get of ``total`` bytes of blocks from the host tier to the device, beside a raw pinned
    copy of the same number of bytes in ONE buffer (the ceiling), and beside the same blocks'
    buffers copied one by one with nothing else (what any one-copy-per-block design costs)."""
    from transport.tiers.base import LRUBytes
    from transport.tiers.gpu import GPUTier
    from transport.tiers.host import HostTier
    from transport.tiers.tiered import TieredStore

    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rows = []
    for size in sizes:
        n = max(1, total // size)
        t0 = time.perf_counter()
        blocks = make_blocks(size, n)
        budget = 2 * total + (64 << 20)
        host = HostTier(budget, pin=cuda, device_verify=True)
        host.put_many(blocks)
        hostg = None
        if gather_below:
            hostg = HostTier(budget, pin=cuda, device_verify=True, gather_below=gather_below)
            hostg.put_many(blocks)
        keys = [k for k, _ in blocks]
        # each block in its own pinned buffer, as the host tier kept them before slabs
        bufs = [torch.empty(len(host._lru.get(k)[0]), dtype=torch.uint8, pin_memory=cuda)
                .copy_(torch.from_numpy(np.asarray(host._lru.get(k)[0]))) for k in keys]
        scattered = keys[::-1]  # the same blocks in reverse order: no two back to back
        nbytes = sum(b.numel() for b in bufs)  # encoded blocks: headers included
        src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
        src.random_(0, 255)
        dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
        ref = {keys[0]: blocks[0][1], keys[-1]: blocks[-1][1]}
        del blocks
        print(f"  {size >> 10} KiB x {n}: set up in {time.perf_counter() - t0:.1f} s", flush=True)

        def raw_copy():
            dst.copy_(src, non_blocking=True)
            sync()

        def raw_blockwise():
            off = 0
            for b in bufs:
                dst[off:off + b.numel()].copy_(b, non_blocking=True)
                off += b.numel()
            sync()

        def host_get():
            assert all(b is not None for b in host.get_many(keys, device=device))
            sync()

        def host_get_scattered():
            assert all(b is not None for b in host.get_many(scattered, device=device))
            sync()

        def host_get_gather():
            assert all(b is not None for b in hostg.get_many(keys, device=device))
            sync()

        store = TieredStore(GPUTier(budget, device=device), host)

        def store_get():  # a GPU-tier miss served from the host tier, promoted into the GPU tier
            store.gpu._lru = LRUBytes(store.gpu._lru.budget)  # empty it, O(1)
            assert all(b is not None for b in store.get_many(keys))
            sync()

        fns = {"raw": raw_copy, "rawblk": raw_blockwise, "host": host_get, "store": store_get,
               "hostrev": host_get_scattered}
        if hostg is not None:
            fns["hostg"] = host_get_gather
        # each variant in turn with the raw copy (raw, ours, raw, ours, ...): all five in one
        # rotation let the slow ones (scattered: 256 separate copies) disturb the others
        t, raw_t = {}, {}
        for name, fn in fns.items():
            if name != "raw":
                pair = paired({"raw": raw_copy, name: fn}, min_reps=9, min_s=1.0)
                t[name], raw_t[name] = pair[name], pair["raw"]
        assert host.stats.corrupt == 0
        _check_device_read(host, store, ref, device)
        raw_desc = "one pinned tensor copy_(non_blocking=True) of the same bytes into one buffer"
        rows.append(row("host_to_gpu", size, n, t["host"], raw_t["host"],
                        "HostTier.get_many(device=...): blocks kept in pinned slabs, one copy "
                        "per run of blocks back to back in a slab into one device buffer, "
                        "strided views, device checksums per group, one read-back",
                        raw_desc))
        rows.append(row("tiered_host_to_gpu", size, n, t["store"], raw_t["store"],
                        "TieredStore.get_many: GPU miss -> host tier device read -> adopted by "
                        "the GPU tier", raw_desc))
        rows.append(row("host_to_gpu_scattered", size, n, t["hostrev"], raw_t["hostrev"],
                        "HostTier.get_many(device=...) of the same blocks in reverse order: "
                        "no runs, one copy per block from the slabs", raw_desc))
        rows.append(row("raw_blockwise_to_gpu", size, n, t["rawblk"], raw_t["rawblk"],
                        "the same blocks, each in its own pinned buffer, copied one by one, "
                        "nothing else (reference)",
                        raw_desc))
        if hostg is not None:
            rows.append(row("host_to_gpu_gather", size, n, t["hostg"], raw_t["hostg"],
                            f"HostTier(gather_below={gather_below}): blocks below that gathered "
                            "through a pinned staging buffer (torch.cat), one copy", raw_desc))
        store.close()
        del host, hostg, store, bufs, src, dst
        if cuda:
            torch.cuda.empty_cache()
    return rows


def _check_device_read(host, store, ref: dict, device: str) -> None:
    """Right bytes on the device, and a payload flipped in host memory is caught there."""
    ks = list(ref)
    for got in (host.get_many(ks, device=device), store.get_many(ks)):
        for g, k in zip(got, ks):
            assert g is not None and g.keys.device.type == torch.device(device).type
            assert torch.equal(g.keys.cpu(), ref[k].keys) and torch.equal(g.values.cpu(), ref[k].values)
    buf = host._lru.get(ks[-1])[0]
    t = buf if isinstance(buf, (torch.Tensor, np.ndarray)) else None
    if t is not None:
        t[-5] ^= 1  # silent corruption of the stored copy
        before = host.stats.corrupt
        assert host.get_many(ks, device=device)[-1] is None and host.stats.corrupt == before + 1
        t[-5] ^= 1


# -- GPU: GPU -> GPU through torch.distributed ----------------------------------------------------------
def _dist_worker(rank: int, port: int, backend: str, sizes, total, reps: int, out_q) -> None:
    import torch.distributed as dist
    from transport.channels.dist import TorchDistChannel

    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    device = f"cuda:{rank}" if backend == "nccl" else "cpu"
    if backend == "nccl":
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(1)  # see main(): OpenMP threads spin on a small shared CPU
    sync = torch.cuda.synchronize if backend == "nccl" else (lambda: None)
    rows = []
    for size in sizes:
        n = max(1, total // size)
        blocks = make_blocks(size, n, device)
        nbytes = sum(b.nbytes for _, b in blocks)
        buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
        chans = {"ours": TorchDistChannel(device=device, verify=True),
                 "ours_noverify": TorchDistChannel(device=device, verify=False)}
        times: dict = {"ours": [], "ours_noverify": [], "raw": []}
        for it in range(reps + 2):
            for name in times:  # interleaved, so every path sees the same conditions
                dist.barrier()
                sync()
                t = time.perf_counter()
                if name == "raw":
                    dist.send(buf, 1) if rank == 0 else dist.recv(buf, 0)
                elif rank == 0:
                    chans[name].send(blocks, 1)
                else:
                    got = chans[name].recv(0)
                    assert all(b is not None for _, b in got)
                sync()
                if it >= 2:
                    times[name].append(time.perf_counter() - t)
        results = {name: statistics.median(ts) for name, ts in times.items()}
        if rank == 1:
            rows.append(row("nccl_send_recv" if backend == "nccl" else "gloo_send_recv", size, n,
                            results["ours"], results["raw"],
                            "TorchDistChannel send/recv (pack, device checksums, 3 transfers)",
                            "one dist.send/recv of the same bytes"))
            rows.append(row("nccl_send_recv_noverify" if backend == "nccl"
                            else "gloo_send_recv_noverify", size, n, results["ours_noverify"],
                            results["raw"], "TorchDistChannel, verify=False",
                            "one dist.send/recv of the same bytes"))
    if rank == 1:
        out_q.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def bench_dist(sizes, total, backend: str, reps: int) -> list[dict]:
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_dist_worker, args=(r, port, backend, sizes, total, reps, q))
             for r in range(2)]
    for p in procs:
        p.start()
    rows = q.get(timeout=1800)
    for p in procs:
        p.join(60)
    return rows


# -- output -----------------------------------------------------------------------------------------
def print_table(rows: list[dict]) -> None:
    print(f"\n{'bench':<26}{'block':>8}{'blocks':>7}{'ours GB/s':>11}{'raw GB/s':>10}{'ratio':>7}")
    for r in rows:
        kib = r["block_bytes"] >> 10
        size = f"{kib >> 10}M" if kib >= 1024 else f"{kib}K"
        print(f"{r['bench']:<26}{size:>8}{r['blocks_per_iter']:>7}{r['ours_GBps']:>11.3f}"
              f"{r['raw_GBps']:>10.3f}{r['ratio_vs_raw']:>7.2f}")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    benches = list(dict.fromkeys(r["bench"] for r in rows))
    cols = min(4, len(benches))
    nrows = -(-len(benches) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.6 * nrows), squeeze=False)
    for ax in axes.flat[len(benches):]:
        ax.set_visible(False)
    for ax, b in zip(axes.flat, benches):
        rs = [r for r in rows if r["bench"] == b]
        x = [r["block_bytes"] / (1 << 20) for r in rs]
        ax.plot(x, [r["ours_GBps"] for r in rs], "o-", label="kvcluster")
        ax.plot(x, [r["raw_GBps"] for r in rs], "s--", label="raw")
        ax.set_xscale("log", base=2)
        ax.set_title(b, fontsize=9)
        ax.set_xlabel("block size (MiB)")
        ax.set_ylabel("GB/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def summary(rows: list[dict]) -> dict:
    out = {}
    for b in dict.fromkeys(r["bench"] for r in rows):
        big = [r["ratio_vs_raw"] for r in rows if r["bench"] == b and r["block_bytes"] >= 1 << 20]
        out[b] = {"min_ratio_at_1MiB_plus": min(big) if big else None,
                  "meets_0.8_at_1MiB_plus": bool(big) and min(big) >= 0.8}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="host tier -> GPU vs raw pinned copy")
    ap.add_argument("--nccl", action="store_true", help="GPU -> GPU channel vs raw NCCL (2 GPUs)")
    ap.add_argument("--device", default="cuda", help="for --gpu (cpu = smoke test)")
    ap.add_argument("--backend", default="nccl", help="for --nccl (gloo = smoke test on CPU)")
    ap.add_argument("--total-mib", type=int, default=None, help="MiB moved per iteration")
    ap.add_argument("--sizes-kib", default=None, help="comma-separated block sizes in KiB")
    ap.add_argument("--only", default="redis,tcp,ucx", help="CPU benches to run")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--gather-below-kib", type=int, default=0,
                    help="for --gpu: also measure a host tier that gathers blocks below this "
                         "size through a pinned staging buffer (0: skip)")
    ap.add_argument("--out", default=None, help="results JSON path")
    args = ap.parse_args()

    sizes = [int(x) << 10 for x in args.sizes_kib.split(",")] if args.sizes_kib else SIZES
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    if args.gpu:
        mode, total = "gpu", (args.total_mib or 256) << 20
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            sys.exit("--gpu: CUDA is not available (use --device cpu for a dry run)")
        if args.device == "cpu":
            torch.set_num_threads(1)  # see the CPU mode below
        rows = bench_host_to_gpu(sizes, total, args.device, args.gather_below_kib << 10)
    elif args.nccl:
        mode, total = "nccl", (args.total_mib or 256) << 20
        rows = bench_dist(sizes, total, args.backend, args.reps)
    else:
        # intra-op OpenMP threads spin against the server threads on a small shared CPU (seen:
        # a 512 KiB tensor copy took 11 ms with 2 threads, 0.07 ms with 1)
        torch.set_num_threads(1)
        mode, total = "cpu", (args.total_mib or 16) << 20
        rows = []
        only = args.only.split(",")
        if "redis" in only:
            rows += bench_redis(sizes, total, args.redis_url)
        if "tcp" in only:
            rows += bench_tcp(sizes, total)
        if "ucx" in only:
            rows += bench_ucx(sizes, total)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else RESULTS / f"transport_{mode}.json"
    info = machine()
    info["loadavg_at_start"] = load_start
    info["loadavg_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    doc = {"date": started, "command": " ".join([Path(sys.executable).name] + sys.argv),
           "mode": mode, "bytes_per_iter": total, "machine": info,
           "summary": summary(rows), "results": rows}
    out.write_text(json.dumps(doc, indent=2))
    if mode == "cpu" and rows:
        plot(rows, out.with_suffix(".png"))
    print(f"wrote {out}")
    print_table(rows)


if __name__ == "__main__":
    main()
