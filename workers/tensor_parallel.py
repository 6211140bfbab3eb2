"""Tensor-parallel shards of a Llama-family model (Megatron-style, plain PyTorch).

Rank r of t holds:
  q/k/v     column-parallel by heads: query heads [r*H/t, (r+1)*H/t) and KV heads
            [r*Hkv/t, (r+1)*Hkv/t), so a GQA group stays whole on one rank and the rank's KV cache
            (and every segment it stores) holds only its own KV heads; Qwen2's q/k/v biases split alike
  o-proj    row-parallel: the input columns of the rank's query heads; outputs summed over ranks
  gate/up   column-parallel, fused per shard as [gate_r; up_r] (what ``LlamaRunner.mlp`` chunks)
  down      row-parallel: outputs summed over ranks
  embeddings, norms, lm_head: replicated, so logits (and sampling) are the same on every rank.

A shard is a plain ``LlamaRunner`` over a local ``ModelSpec`` (heads/t, kv_heads/t, intermediate/t)
whose ``reduce`` hook all-reduces over a torch.distributed process group (gloo on CPU, NCCL on
CUDA). The same hook sums the per-head partial scores that reuse selects tokens by
(``attention_received``; the V deviation in ``ReuseEngine._checked``), so DHD and CacheBlend
choose the same tokens on every rank, the ones the unsharded model would choose: the reuse
engine runs unchanged on every rank, in lock step (same ids, plan, settings and seed).

The shard's fingerprint names its rank and size (``<name>-tp<r>of<t>-<hash>``): rank r's KV is
not rank s's, nor the unsharded model's.

Ray is not imported here; ``workers/tp_group.py`` runs shards as a group of Ray actors.
"""
from __future__ import annotations

import dataclasses
import math
import socket
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch

from workers.errors import InvalidParameterError
from workers.model_runner import LayerWeights, LlamaRunner
from workers.model_spec import ModelSpec


class TensorParallelError(InvalidParameterError):
    """A tensor-parallel size the model cannot be split into, or ranks that disagree."""


def valid_sizes(spec: ModelSpec) -> list[int]:
    """Every tensor-parallel size this model splits into (divides heads, KV heads, intermediate)."""
    g = math.gcd(math.gcd(spec.num_heads, spec.num_kv_heads), spec.intermediate_size)
    return [t for t in range(1, g + 1) if g % t == 0]


def check_tp(spec: ModelSpec, tp_size: int) -> None:
    if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
        raise TensorParallelError(f"tensor_parallel_size must be an int >= 1, got {tp_size!r}")
    bad = [f"{name}={n}" for name, n in (("num_heads", spec.num_heads), ("num_kv_heads", spec.num_kv_heads),
                                         ("intermediate_size", spec.intermediate_size)) if n % tp_size]
    if bad:
        raise TensorParallelError(
            f"tensor_parallel_size={tp_size} does not divide the model's {', '.join(bad)} (each rank holds "
            f"whole query and KV heads); sizes this model splits into: {valid_sizes(spec)}")


def local_spec(spec: ModelSpec, tp_size: int) -> ModelSpec:
    check_tp(spec, tp_size)
    return dataclasses.replace(spec, num_heads=spec.num_heads // tp_size,
                               num_kv_heads=spec.num_kv_heads // tp_size,
                               intermediate_size=spec.intermediate_size // tp_size)


def shard_runner(full: LlamaRunner, rank: int, tp_size: int,
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> LlamaRunner:
    """Rank ``rank``'s shard of ``full`` (KVSharer maps carry over). ``reduce`` sums a tensor over
    the ranks (``all_reduce_fn``); without it the shard computes partial results only (tests).
    ``tp_size`` 1 returns ``full`` itself: its KV is the unsharded model's."""
    s = full.spec
    check_tp(s, tp_size)
    if not 0 <= rank < tp_size:
        raise TensorParallelError(f"rank must be in [0, {tp_size}), got {rank}")
    if tp_size == 1:
        if reduce is not None:
            full.reduce = reduce
        return full
    dev = torch.device(device) if device is not None else full.device
    dt = dtype or full.dtype
    d, hq, hk, ii = s.head_dim, s.num_heads // tp_size, s.num_kv_heads // tp_size, s.intermediate_size // tp_size
    q = slice(rank * hq * d, (rank + 1) * hq * d)
    k = slice(s.q_size + rank * hk * d, s.q_size + (rank + 1) * hk * d)
    v = slice(s.q_size + s.kv_size + rank * hk * d, s.q_size + s.kv_size + (rank + 1) * hk * d)
    gate = slice(rank * ii, (rank + 1) * ii)
    up = slice(s.intermediate_size + rank * ii, s.intermediate_size + (rank + 1) * ii)

    def put(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=dev, dtype=dt).contiguous()

    def rows(t: torch.Tensor, parts: list[slice]) -> torch.Tensor:
        return put(torch.cat([t[p] for p in parts]))

    layers = []
    for lw in full.layers:
        owns_kv = lw.w_qkv.shape[0] > s.q_size  # a KVSharer-shared layer has only its q rows
        parts = [q, k, v] if owns_kv else [q]
        layers.append(LayerWeights(
            attn_norm=put(lw.attn_norm), w_qkv=rows(lw.w_qkv, parts),
            b_qkv=None if lw.b_qkv is None else rows(lw.b_qkv, parts),
            w_o=put(lw.w_o[:, q]), mlp_norm=put(lw.mlp_norm),
            w_gate_up=rows(lw.w_gate_up, [gate, up]), w_down=put(lw.w_down[:, gate])))
    embed = put(full.embed_w)
    head = embed if full.lm_head is full.embed_w else put(full.lm_head)
    shard = LlamaRunner(local_spec(s, tp_size), embed, layers, put(full.final_norm), head,
                        name=f"{full.name}-tp{rank}of{tp_size}", kv_source=full.kv_source)
    shard.reduce = reduce
    shard.tp_rank, shard.tp_size = rank, tp_size
    return shard


def load_shard(name: str, rank: int, tp_size: int, dtype: str = "float32", device: str = "auto",
               gguf_file: str | None = None,
               reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
               spec: ModelSpec | None = None) -> LlamaRunner:
    """Rank ``rank``'s shard read straight from the safetensors files (only its rows and columns
    of the split projections: a rank never holds the full model). Same shard, same fingerprint
    as ``shard_runner(load_runner(name), rank, tp_size)``. ``spec``: the model's, when the caller
    has it (spares the transformers import that reading the config costs)."""
    from workers.model_loader import DTYPES, SMOLLM2_ALIASES, hf_folder, pick_device, runner_from_state_dict
    folder = hf_folder(name, gguf_file)
    if spec is None:
        from transformers import AutoConfig
        spec = ModelSpec.from_hf_config(AutoConfig.from_pretrained(folder))
    check_tp(spec, tp_size)
    if not 0 <= rank < tp_size:
        raise TensorParallelError(f"rank must be in [0, {tp_size}), got {rank}")
    short = Path(name).stem if name not in SMOLLM2_ALIASES else "smollm2-135m"
    sd = _sliced_state_dict(folder, spec, rank, tp_size)
    local = local_spec(spec, tp_size) if tp_size > 1 else spec
    r = runner_from_state_dict(local, sd, pick_device(device), DTYPES[dtype],
                               name=f"{short}-tp{rank}of{tp_size}" if tp_size > 1 else short)
    r.reduce = reduce
    r.tp_rank, r.tp_size = rank, tp_size
    return r


def _sliced_state_dict(folder: Path, spec: ModelSpec, rank: int, t: int) -> dict[str, torch.Tensor]:
    from safetensors import safe_open
    d = spec.head_dim
    hq, hk, ii = spec.num_heads // t * d, spec.num_kv_heads // t * d, spec.intermediate_size // t
    rows = {"q_proj": hq, "k_proj": hk, "v_proj": hk, "gate_proj": ii, "up_proj": ii}
    cols = {"o_proj": hq, "down_proj": ii}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {folder}")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                proj = key.rsplit(".", 2)[-2] if key.count(".") >= 2 else ""
                if t > 1 and proj in rows:
                    n = rows[proj]
                    out[key] = fh.get_slice(key)[rank * n:(rank + 1) * n]
                elif t > 1 and proj in cols and key.endswith(".weight"):
                    n = cols[proj]
                    out[key] = fh.get_slice(key)[:, rank * n:(rank + 1) * n]
                else:
                    out[key] = fh.get_tensor(key)
    return out


# ---- torch.distributed ----------------------------------------------------------------------

def all_reduce_fn(group=None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The shard's ``reduce`` hook: an in-place sum over ``group`` (its inputs are fresh tensors)."""
    import torch.distributed as dist

    def reduce(x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x
    return reduce


def backend_for(device: str | torch.device) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def free_port(host: str = "") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def init_distributed(rank: int, world_size: int, master_addr: str, master_port: int,
                     backend: str = "gloo", timeout_s: float = 300.0):
    """Join the process group (rank 0 listens at master_addr:master_port). Returns the group the
    shard reduces over and a gloo group for control messages (the same one under gloo)."""
    import torch.distributed as dist
    if dist.is_initialized():
        raise TensorParallelError("torch.distributed is already initialized in this process")
    dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=timeout_s))
    world = dist.group.WORLD
    control = world if backend == "gloo" else dist.new_group(backend="gloo")
    return world, control


def agree_objects(obj, group=None) -> list:
    """Every rank's ``obj`` (picklable), in rank order."""
    import torch.distributed as dist
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_flag(flag: bool, group=None, src: int = 0) -> bool:
    """Rank ``src``'s flag on every rank."""
    import torch.distributed as dist
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.broadcast(t, src=src, group=group)
    return bool(t.item())
