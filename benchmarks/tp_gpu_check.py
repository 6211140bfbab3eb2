"""Tensor-parallel shards on CUDA against the unsharded model on the same GPU type.

t processes; NCCL with one GPU per rank when the machine has t GPUs, otherwise gloo over CUDA
tensors with every rank on GPU 0 (that checks the shards and the engine's CUDA paths under TP, not
NCCL). Random-weight Llama (GQA) and Qwen2 (biases, tied embeddings) shapes, float32: full-prefill
logits, then greedy generation with DHD reuse of a stored donor (documents reordered), one case
long enough for FlexAttention's masked passes. Writes a JSON with the device and the command.

    python benchmarks/tp_gpu_check.py [--tp 2] [--out benchmarks/results/tp_gpu.json]
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import sys
import time

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from index_service.align import align  # noqa: E402
from workers.engine import ReuseEngine, ReuseSettings  # noqa: E402
from workers.model_loader import random_runner  # noqa: E402
from workers.model_spec import ModelSpec  # noqa: E402
from workers.segments import InMemorySegmentStore  # noqa: E402
from workers.tensor_parallel import all_reduce_fn, free_port, init_distributed, shard_runner  # noqa: E402

LLAMA = ModelSpec(vocab_size=2048, hidden_size=512, num_layers=6, num_heads=8, num_kv_heads=4, head_dim=64,
                  intermediate_size=1024, max_position=16384, rope_theta=500000.0, eos_token_ids=(1,))
QWEN2 = dataclasses.replace(LLAMA, num_kv_heads=2, qkv_bias=True, tie_embeddings=True, rope_theta=1e6)
CASES = [("llama-gqa", LLAMA, (400, 300, 500)), ("qwen2", QWEN2, (400, 300, 500)),
         ("llama-long", LLAMA, (3000, 3200, 3000))]  # 9.2k keys: FlexAttention passes on CUDA
ST = ReuseSettings(mode="dhd", recompute_ratio=0.15, check_layer=1, decode_recompute=2)


def prompts(doc_lens, seed: int):
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(2, 2048, (n,), generator=g).tolist() for n in doc_lens]
    q = torch.randint(2, 2048, (16,), generator=g).tolist()
    return docs[0] + docs[1] + docs[2] + q, docs[2] + docs[0] + docs[1] + q


def run_case(runner, donor, new, max_tokens=16) -> dict:
    out = {"logits": runner.prefill_logits(torch.tensor(new, device=runner.device)).float().cpu()}
    eng = ReuseEngine(runner, InMemorySegmentStore())
    _, dseq = eng.generate(donor, None, max_tokens=0, settings=ReuseSettings(mode="full"), keep_segment=True)
    eng.store.put(eng.segment_of(dseq, "donor"))
    plan = align(new, [("donor", donor)])
    sync = torch.cuda.synchronize if runner.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    res, seq = eng.generate(new, plan, max_tokens=max_tokens, settings=ST)
    sync()
    out.update(tokens=res.token_ids, reused=res.reused_tokens, recomputed=res.recomputed_tokens,
               decode_recomputed=res.decode_recomputed, stale=seq.stale.cpu(), seconds=time.perf_counter() - t0)
    return out


def rank_main(rank: int, world: int, port: int, backend: str, out_dir: str, cases: list) -> None:
    if torch.cuda.is_available():
        dev = torch.device("cuda", rank if backend == "nccl" else 0)
        torch.cuda.set_device(dev)
    else:  # a dry run of the script on a CPU machine
        dev = torch.device("cpu")
        torch.set_num_threads(1)
    pg, _ = init_distributed(rank, world, "127.0.0.1", port, backend, timeout_s=300)
    res = {}
    for i, (name, spec, lens) in enumerate(cases):
        full = random_runner(spec, dev, torch.float32, seed=i, std=0.1, name=name)
        shard = shard_runner(full, rank, world, all_reduce_fn(pg))
        del full
        donor, new = prompts(lens, i)
        res[name] = run_case(shard, donor, new)
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/tp_gpu.json")
    ap.add_argument("--quick", action="store_true", help="short cases only (a CPU dry run)")
    a = ap.parse_args()
    cases = CASES[:2] if a.quick else CASES
    dev0 = "cuda:0" if torch.cuda.is_available() else "cpu"
    backend = "nccl" if torch.cuda.device_count() >= a.tp else "gloo"
    tmp = os.path.join(os.path.dirname(os.path.abspath(a.out)) or ".", f".tp_gpu_{os.getpid()}")
    os.makedirs(tmp, exist_ok=True)
    t0 = time.perf_counter()
    mp.start_processes(rank_main, args=(a.tp, free_port("127.0.0.1"), backend, tmp, cases), nprocs=a.tp,
                       start_method="spawn")
    ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(a.tp)]
    report = {"device": torch.cuda.get_device_name(0) if dev0 != "cpu" else "cpu", "gpus": torch.cuda.device_count(), "backend": backend,
              "tp": a.tp, "torch": torch.__version__, "command": " ".join(sys.argv),
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "cases": {}}
    ok = True
    for i, (name, spec, lens) in enumerate(cases):
        ref = run_case(random_runner(spec, dev0, torch.float32, seed=i, std=0.1, name=name), *prompts(lens, i))
        r0 = ranks[0][name]
        c = {"prompt_tokens": len(prompts(lens, i)[1]),
             "logits_max_abs_diff": max((r[name]["logits"] - ref["logits"]).abs().max().item() for r in ranks),
             "ranks_identical_logits": all(torch.equal(r[name]["logits"], r0["logits"]) for r in ranks),
             "same_tokens": all(r[name]["tokens"] == ref["tokens"] for r in ranks),
             "same_selection": all(torch.equal(r[name]["stale"], ref["stale"]) for r in ranks),
             "reused": ref["reused"], "recomputed": (ref["recomputed"], r0["recomputed"]),
             "decode_recomputed": (ref["decode_recomputed"], r0["decode_recomputed"]),
             "tokens_ref": ref["tokens"], "tokens_tp": r0["tokens"],
             "generate_s_ref": ref["seconds"], "generate_s_tp_rank0": r0["seconds"]}
        c["pass"] = (c["logits_max_abs_diff"] <= 1e-4 and c["ranks_identical_logits"] and c["same_tokens"]
                     and c["same_selection"] and c["recomputed"][0] == c["recomputed"][1])
        ok &= c["pass"]
        report["cases"][name] = c
        print(name, json.dumps({k: v for k, v in c.items() if not k.startswith("tokens")}), flush=True)
    report["pass"] = ok
    report["wall_s"] = time.perf_counter() - t0
    with open(a.out, "w") as f:
        json.dump(report, f, indent=1)
    for r in range(a.tp):
        os.remove(os.path.join(tmp, f"rank{r}.pt"))
    os.rmdir(tmp)
    print("PASS" if ok else "FAIL", a.out)


if __name__ == "__main__":
    main()
