"""Where the host tier -> GPU read spends its time at 1 MiB blocks (diagnostic, not a bench)."""
import statistics, sys, time
import torch
sys.path.insert(0, ".")
from benchmarks.transport_bench import make_blocks
from transport.tiers.host import HostTier
from transport.tiers import gather

dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"
cuda = dev.startswith("cuda")
sync = torch.cuda.synchronize if cuda else (lambda: None)
for size in (1 << 20, 4 << 20):
    n = (256 << 20) // size
    blocks = make_blocks(size, n)
    host = HostTier(600 << 20, pin=cuda, device_verify=True)
    host.put_many(blocks)
    keys = [k for k, _ in blocks]
    nbytes = sum(host._slots[k].span for k in keys)
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda); dst = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    marks = {}
    real_runs, real_cat = host._copy_runs, torch.cat
    def runs(d, s, o, **kw):
        marks["pre"] = time.perf_counter(); out = real_runs(d, s, o, **kw); marks["issued"] = time.perf_counter()
        return out
    host._copy_runs = runs
    def T(fn, reps=15):
        fn(); sync(); ts = []
        for _ in range(reps):
            t = time.perf_counter(); fn(); sync(); ts.append(time.perf_counter() - t)
        return statistics.median(ts) * 1e3
    raw = T(lambda: dst.copy_(src, non_blocking=True))
    slots = [host._slots[k] for k in keys]
    offs, _ = gather.plan_layout([s.n for s in slots])
    copies_only = T(lambda: real_runs(dst, slots, offs))
    phases = []
    def one():
        t0 = time.perf_counter(); out, _ = host.get_many_to_device(keys, dev); t1 = time.perf_counter()
        phases.append((marks["pre"] - t0, marks["issued"] - marks["pre"], t1 - marks["issued"]))
    tot = T(one)
    ph = [statistics.median(p[i] for p in phases) * 1e3 for i in range(3)]
    # checksum kernels alone over the same device bytes
    lays = [host._lru.get(k)[1].layout for k in keys]
    grp = gather.uniform_groups(offs, [l.kind for l in lays])
    def sums():
        ps = [gather.group_checksums(dst, offs[a], b - a, st, lays[a]) for a, b, st in grp]
        torch.cat(ps).cpu()
    ck = T(sums)
    print(f"{size>>20} MiB x {n}: raw {raw:.2f} ms, run copies only {copies_only:.2f} ms ({len(grp)} groups), "
          f"checksums+readback alone {ck:.2f} ms, get_many_to_device {tot:.2f} ms = "
          f"before copies {ph[0]:.2f} + issuing {ph[1]:.2f} + after issue (views, blocks, sums, read-back) {ph[2]:.2f}", flush=True)
    del host, src, dst
