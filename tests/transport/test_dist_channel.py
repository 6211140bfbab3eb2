"""The NCCL channel's code path, run on CPU with gloo between 2 processes."""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.transport.conftest import free_port, make_block


def _items():
    out = []
    for i, dt in enumerate([torch.float32, torch.float16, torch.bfloat16]):
        for j, (t, d) in enumerate([(1, 8), (64, 64), (37, 128)]):
            out.append((f"k{i}{j}", make_block(dt, layers=(0, 5, 9), tokens=t, head_dim=d,
                                               seed=10 * i + j)))
    return out


def _worker(rank: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    try:
        from transport.channels.dist import TorchDistChannel
        ch = TorchDistChannel()
        items = _items()
        if rank == 0:
            ch.send(items, dst=1)
            ch.send(items[:2], dst=1)
            back = ch.recv(src=1)
            results.put(("rank0", [k for k, _ in back]))
        else:
            got = ch.recv(src=0)
            ok = all(k == k2 and b is not None and b.layers == w.layers
                     and b.token_hash == w.token_hash and b.keys.dtype == w.keys.dtype
                     and torch.equal(b.keys, w.keys) and torch.equal(b.values, w.values)
                     for (k, b), (k2, w) in zip(got, items))
            second = ch.recv(src=0)
            ch.send([(k, b) for k, b in second][::-1], dst=0)
            results.put(("rank1", ok and len(got) == len(items), ch.corrupt))
    finally:
        dist.destroy_process_group()


def test_gloo_two_processes():
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(90)
        assert p.exitcode == 0
    got = dict((r[0], r[1:]) for r in (results.get(timeout=5) for _ in range(2)))
    assert got["rank1"] == (True, 0)
    assert got["rank0"] == (["k01", "k00"],)


def test_corrupt_payload_detected_on_cpu():
    """Unpack with a tampered payload: the block comes back as None and is counted."""
    from transport.channels.dist import TorchDistChannel
    ch = TorchDistChannel.__new__(TorchDistChannel)
    ch.device, ch.verify, ch.corrupt, ch.group = torch.device("cpu"), True, 0, None
    import msgpack
    header, payload = ch._pack(_items()[:3])
    payload[40] ^= 0x08
    got = ch._unpack(msgpack.unpackb(header)["blocks"], payload)
    assert got[0][1] is None and got[1][1] is not None and ch.corrupt == 1
