"""KVSharer (arXiv 2410.18517): search which layers may use an earlier layer's KV, and load the
resulting strategy file.

Search (``search_strategy``), as the paper's public code does it:
  1. run the unshared model on a calibration set (default: 30 Wikipedia paragraphs x 64 tokens),
     average each layer's K and V over the samples: [Hkv, T, d] per layer (grouped-query
     attention shares whole KV-head sets, so whole sets are compared);
  2. distance(i, j) = mean over heads and tokens of ||K_i - K_j||_2 over head_dim, same for V,
     averaged. (RoPE rotates both keys of a position alike, so pre- or post-RoPE keys give the
     same distance.) Pairs i > j are ranked once, most dissimilar first (``order``: "dissimilar",
     or "similar" / "random" for the paper's ablation);
  3. walk the ranking: skip i if already shared; j is resolved to its owner (chains never form:
     a source is always a layer that stores KV); layers that used i's KV follow it to that owner;
     accept the map when the cosine similarity of the final hidden states (after the final norm,
     flattened per sample, averaged over samples) to the unshared model's is > T; stop once
     round(R x L) layers are shared (round half up).
Each trial reruns the model only from layer i on (earlier layers are unchanged).

The strategy JSON names the unshared model's fingerprint, the map ``kv_source`` (layer l attends
over layer kv_source[l]'s KV), R, T, order, an xxh64 digest of the calibration token ids, the
accepted pairs in order, every trial and the search time. ``load_strategy`` validates it against
a runner; ``apply_strategy`` applies it with ``runner.share_kv``.

CLI: ``layers_search_main(argv)`` implements ``kvcluster layers search``.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import xxhash

from workers.batch_decode import BatchKV, run_layers
from workers.model_runner import LlamaRunner

FORMAT = "kvcluster.kvsharer/1"
ORDERS = ("dissimilar", "similar", "random")
DEFAULT_SAMPLES = 30
DEFAULT_TOKENS = 64


# ---- errors ---------------------------------------------------------------------------------
class StrategyError(ValueError):
    """A KVSharer strategy or search request that cannot be used."""


class StrategyFormatError(StrategyError):
    """Unreadable file, malformed JSON, missing keys or wrong types."""


class StrategyModelMismatchError(StrategyError):
    """The strategy was searched on another model (fingerprint or layer count differ)."""


class StrategyMapError(StrategyError):
    """The layer map is invalid: wrong length, a layer mapped to a later or to a shared layer."""


class SearchParameterError(StrategyError):
    """R outside [0, 1), T outside (-1, 1], unknown order, unusable calibration set."""


# ---- parameters -----------------------------------------------------------------------------
def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_parameters(ratio: Any, threshold: Any, order: str = "dissimilar") -> None:
    if not _is_number(ratio) or not 0.0 <= ratio < 1.0:
        raise SearchParameterError(f"ratio R must be a number in [0, 1), got {ratio!r}")
    if not _is_number(threshold) or not -1.0 < threshold <= 1.0:
        raise SearchParameterError(f"threshold T must be a number in (-1, 1], got {threshold!r}")
    if order not in ORDERS:
        raise SearchParameterError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")


def target_shared(ratio: float, num_layers: int) -> int:
    """round(R x L), halves rounded up; at most L - 1 (layer 0 always stores its KV)."""
    return min(int(math.floor(ratio * num_layers + 0.5)), num_layers - 1)


# ---- the strategy file ----------------------------------------------------------------------
@dataclass
class Strategy:
    model: str
    model_fingerprint: str  # the UNSHARED runner's fingerprint
    num_layers: int
    kv_source: list[int]
    ratio: float
    threshold: float
    order: str = "dissimilar"
    calibration: dict = field(default_factory=dict)  # digest, samples, tokens, source
    accepted: list[dict] = field(default_factory=list)  # in order: layer, source, pair, cosine
    trials: list[dict] = field(default_factory=list)  # every pair tried: pair, cosine, accepted, elapsed_s
    final_cosine: float = 1.0
    search_seconds: float = 0.0
    seed: int = 0
    shared_fingerprint: str | None = None  # the runner's fingerprint once the map is applied
    created: str = ""
    format: str = FORMAT

    @property
    def shared_layers(self) -> list[int]:
        return [l for l, s in enumerate(self.kv_source) if s != l]

    @property
    def kv_layers(self) -> list[int]:
        return [l for l, s in enumerate(self.kv_source) if s == l]

    def map_after(self, steps: int) -> list[int]:
        """The map after the first ``steps`` accepted pairs: the strategy a search with a
        smaller R (same T, order, calibration) would have produced."""
        m = list(range(self.num_layers))
        for a in self.accepted[:steps]:
            i, src = int(a["layer"]), int(a["source"])
            m = [src if (l == i or s == i) else s for l, s in enumerate(m)]
        return m

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        tmp.replace(p)
        return p


REQUIRED = {"format": str, "model": str, "model_fingerprint": str, "num_layers": int,
            "kv_source": list, "ratio": (int, float), "threshold": (int, float), "order": str}


def strategy_from_dict(data: Any, where: str = "strategy") -> Strategy:
    """Parse and check a strategy's own consistency (not yet against a model)."""
    if not isinstance(data, dict):
        raise StrategyFormatError(f"{where}: expected a JSON object, got {type(data).__name__}")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise StrategyFormatError(f"{where}: missing key(s) {', '.join(missing)}")
    for k, typ in REQUIRED.items():
        if not isinstance(data[k], typ) or isinstance(data[k], bool):
            raise StrategyFormatError(f"{where}: {k!r} has the wrong type ({type(data[k]).__name__})")
    if data["format"] != FORMAT:
        raise StrategyFormatError(f"{where}: format {data['format']!r} is not {FORMAT!r}")
    try:
        check_parameters(data["ratio"], data["threshold"], data["order"])
    except SearchParameterError as e:
        raise StrategyFormatError(f"{where}: {e}") from None
    src = data["kv_source"]
    if any(not isinstance(x, int) or isinstance(x, bool) for x in src):
        raise StrategyFormatError(f"{where}: kv_source must be a list of integers")
    L = data["num_layers"]
    if len(src) != L:
        raise StrategyMapError(f"{where}: kv_source has {len(src)} entries for num_layers = {L}")
    for l, s in enumerate(src):
        if s > l:
            raise StrategyMapError(f"{where}: layer {l} is mapped to a later layer {s}")
        if s < 0:
            raise StrategyMapError(f"{where}: layer {l} is mapped to a negative layer {s}")
        if src[s] != s:
            raise StrategyMapError(f"{where}: layer {l} is mapped to layer {s}, which itself "
                                   f"shares layer {src[s]}'s KV (sources must store their KV)")
    known = {f.name for f in dataclasses.fields(Strategy)}
    return Strategy(**{k: v for k, v in data.items() if k in known})


def load_strategy(path: str | Path, runner: LlamaRunner | None = None) -> Strategy:
    """Read a strategy file; with ``runner``, also check it was searched on that model."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise StrategyFormatError(f"cannot read strategy file {str(path)!r}: {e.strerror or e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise StrategyFormatError(f"strategy file {str(path)!r} is not valid JSON: {e}") from None
    strategy = strategy_from_dict(data, where=f"strategy file {str(path)!r}")
    if runner is not None:
        check_against(strategy, runner, where=f"strategy file {str(path)!r}")
    return strategy


def check_against(strategy: Strategy, runner: LlamaRunner, where: str = "strategy") -> None:
    L = runner.spec.num_layers
    if strategy.num_layers != L:
        raise StrategyModelMismatchError(f"{where} is for a model with {strategy.num_layers} layers; "
                                         f"{runner.name} has {L}")
    if runner.fingerprint == strategy.model_fingerprint and runner.kv_source == list(range(L)):
        return
    if runner.kv_source == strategy.kv_source and runner.fingerprint == strategy.shared_fingerprint:
        return  # already applied to this very model
    if runner.kv_source != list(range(L)):
        raise StrategyModelMismatchError(f"{where}: the runner already shares KV with another map "
                                         f"({runner.kv_source}); apply strategies to an unshared runner")
    raise StrategyModelMismatchError(
        f"{where} was searched on model {strategy.model!r} (fingerprint {strategy.model_fingerprint}); "
        f"this runner is {runner.name!r} (fingerprint {runner.fingerprint})")


def apply_strategy(runner: LlamaRunner, strategy: Strategy | str | Path) -> Strategy:
    """Validate and apply (``runner.share_kv``); a no-op when the runner already runs it."""
    if not isinstance(strategy, Strategy):
        strategy = load_strategy(strategy, runner)
    else:
        check_against(strategy, runner)
    if runner.kv_source != strategy.kv_source:
        runner.share_kv(strategy.kv_source)
    return strategy


def shared_copy(runner: LlamaRunner, kv_source: Sequence[int]) -> LlamaRunner:
    """A runner on the same weight tensors (no copy) with ``kv_source`` applied; ``runner``
    itself is left unshared."""
    layers = [dataclasses.replace(lw) for lw in runner.layers]
    r = LlamaRunner(runner.spec, runner.embed_w, layers, runner.final_norm, runner.lm_head,
                    name=runner.name, kv_source=None)
    if list(kv_source) != list(range(runner.spec.num_layers)):
        r.share_kv(list(kv_source))
    return r


# ---- calibration ----------------------------------------------------------------------------
def calibration_token_ids(tokenizer, texts: Iterable[str], tokens: int = DEFAULT_TOKENS) -> list[list[int]]:
    """Token ids of each text, cut to ``tokens``; all cut to the shortest (calibration averages
    per position, so every sample has the same length)."""
    if tokens < 2:
        raise SearchParameterError(f"calibration tokens per sample must be >= 2, got {tokens}")
    ids = [list(tokenizer(t)["input_ids"])[:tokens] for t in texts if t.strip()]
    if not ids:
        raise SearchParameterError("the calibration set is empty")
    n = min(len(x) for x in ids)
    if n < 2:
        raise SearchParameterError("a calibration text has fewer than 2 tokens")
    return [x[:n] for x in ids]


def calibration_digest(ids: Sequence[Sequence[int]]) -> str:
    h = xxhash.xxh64()
    for row in ids:
        h.update(np.asarray(row, dtype=np.int64).tobytes())
        h.update(b"\xff" * 8)  # sample separator
    return h.hexdigest()


def _final(runner: LlamaRunner, h: torch.Tensor) -> torch.Tensor:
    return runner._norm(h, runner.final_norm).float().flatten(1)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.double(), b.double(), dim=1).mean())


def layer_distances(cache: BatchKV) -> torch.Tensor:
    """[L, L] KVSharer distance from a cache with one slot per layer [L, B, Hkv, T, d]."""
    k = cache.k.float().mean(dim=1)  # average over samples -> [L, Hkv, T, d]
    v = cache.v.float().mean(dim=1)
    L = k.shape[0]
    dist = torch.zeros(L, L, dtype=torch.float64)
    for i in range(L):
        dk = (k[i][None] - k).norm(dim=-1).mean(dim=(1, 2))
        dv = (v[i][None] - v).norm(dim=-1).mean(dim=(1, 2))
        dist[i] = ((dk + dv) / 2).double().cpu()
    return dist


def rank_pairs(dist: torch.Tensor, order: str = "dissimilar", seed: int = 0) -> list[tuple[int, int]]:
    L = dist.shape[0]
    pairs = [(i, j) for i in range(1, L) for j in range(i)]
    if order == "random":
        random.Random(seed).shuffle(pairs)
    else:  # stable sort: ties keep (i, j) order
        pairs.sort(key=lambda p: float(dist[p]), reverse=order == "dissimilar")
    return pairs


def _progress(total: int, enabled: bool):
    if enabled:
        try:
            from tqdm.auto import tqdm
            return tqdm(total=total, desc="kvsharer search", unit="layer", file=sys.stderr)
        except ImportError:  # pragma: no cover - tqdm is a dependency, but GPU boxes may lack it
            pass

    class _Null:
        def update(self, n=1): ...
        def set_postfix_str(self, s): ...
        def close(self): ...
    return _Null()


@torch.inference_mode()
def search_strategy(runner: LlamaRunner, calibration: Sequence[Sequence[int]], ratio: float,
                    threshold: float, order: str = "dissimilar", seed: int = 0,
                    model_name: str | None = None, calibration_source: str = "",
                    progress: bool = False, max_trials: int | None = None) -> Strategy:
    """The KVSharer greedy search on an UNSHARED runner (left unchanged). ``max_trials`` bounds
    the number of maps tried (the paper walks every pair; a high T can make that long)."""
    check_parameters(ratio, threshold, order)
    if max_trials is not None and max_trials < 1:
        raise SearchParameterError(f"max_trials must be >= 1, got {max_trials}")
    L = runner.spec.num_layers
    if runner.kv_source != list(range(L)):
        raise SearchParameterError("search needs an unshared runner (this one already shares KV)")
    if not calibration or len({len(x) for x in calibration}) != 1 or len(calibration[0]) < 2:
        raise SearchParameterError("calibration needs >= 1 samples of one common length >= 2 tokens")
    t0 = time.perf_counter()
    ids = torch.tensor([list(map(int, x)) for x in calibration], device=runner.device)
    if int(ids.min()) < 0 or int(ids.max()) >= runner.spec.vocab_size:
        raise SearchParameterError("calibration token ids outside the model's vocabulary")
    B, T = ids.shape
    identity = list(range(L))
    # the unshared model: per-layer KV (one slot per layer), layer inputs, final states
    cache = BatchKV.empty(runner, B, T, slots=L)
    trace: list = [None] * L
    base = _final(runner, run_layers(runner, runner.embed(ids), 0, cache, kv_source=identity, trace=trace))
    pairs = rank_pairs(layer_distances(cache), order, seed)
    want = target_shared(ratio, L)
    cur, accepted, trials, cur_cos = identity, [], [], 1.0
    bar = _progress(want, progress and want > 0)
    for i, j in pairs:
        if len(accepted) >= want or (max_trials is not None and len(trials) >= max_trials):
            break
        if cur[i] != i:
            continue  # i already shares another layer's KV
        src = cur[j]  # j's owner: sources always store KV
        cand = [src if (l == i or s == i) else s for l, s in enumerate(cur)]
        c_cache, c_trace = cache.clone(), list(trace)
        h = run_layers(runner, trace[i], 0, c_cache, layers=range(i, L), kv_source=cand, trace=c_trace)
        cos = _cosine(_final(runner, h), base)
        ok = cos > threshold
        trials.append({"pair": [i, j], "source": src, "cosine": cos, "accepted": ok,
                       "elapsed_s": time.perf_counter() - t0})
        if ok:
            cur, cache, trace, cur_cos = cand, c_cache, c_trace, cos
            accepted.append({"layer": i, "source": src, "pair": [i, j], "cosine": cos})
            bar.update(1)
        bar.set_postfix_str(f"tried {len(trials)}, cos {cos:.4f}")
    bar.close()
    seconds = time.perf_counter() - t0
    shared_fp = shared_copy(runner, cur).fingerprint if cur != identity else runner.fingerprint
    return Strategy(model=model_name or runner.name, model_fingerprint=runner.fingerprint,
                    num_layers=L, kv_source=cur, ratio=float(ratio), threshold=float(threshold),
                    order=order, seed=seed,
                    calibration={"digest": calibration_digest(calibration), "samples": B, "tokens": T,
                                 "source": calibration_source},
                    accepted=accepted, trials=trials, final_cosine=cur_cos, search_seconds=seconds,
                    shared_fingerprint=shared_fp,
                    created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))


# ---- evaluation -----------------------------------------------------------------------------
@torch.inference_mode()
def perplexity(runner: LlamaRunner, sequences: Sequence[Sequence[int]], batch_size: int = 4) -> dict:
    """Token-level perplexity over sequences (each scored on its tokens 1..n-1), batched with
    right padding (causal attention never lets a real token see the padding)."""
    seqs = sorted((list(map(int, s)) for s in sequences if len(s) >= 2), key=len)
    if not seqs:
        raise ValueError("perplexity needs sequences of >= 2 tokens")
    nll, count = 0.0, 0
    for b in range(0, len(seqs), batch_size):
        chunk = seqs[b:b + batch_size]
        T = max(len(s) for s in chunk)
        ids = torch.zeros(len(chunk), T, dtype=torch.long, device=runner.device)
        for r, s in enumerate(chunk):
            ids[r, :len(s)] = torch.tensor(s)
        cache = BatchKV.empty(runner, len(chunk), T)
        h = run_layers(runner, runner.embed(ids), 0, cache)
        for r, s in enumerate(chunk):
            logp = torch.log_softmax(runner.logits(h[r, :len(s) - 1]).float(), dim=-1)
            tgt = torch.tensor(s[1:], device=runner.device)
            nll -= float(logp.gather(1, tgt[:, None]).sum())
            count += len(s) - 1
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens": count,
            "sequences": len(seqs)}


# ---- CLI: kvcluster layers search -----------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvcluster layers search",
        description="KVSharer: find layers that can use an earlier layer's KV cache; "
                    "writes a strategy JSON for model.kv_sharing_strategy.")
    p.add_argument("--model", required=True, help="model alias (smollm2-135m), HF folder or .gguf file")
    p.add_argument("--ratio", "-R", type=float, required=True,
                   help="fraction R of layers to share, in [0, 1); stops at round(R x L) layers")
    p.add_argument("--threshold", "-T", type=float, required=True,
                   help="accept a map while the final hidden states' cosine similarity to the "
                        "unshared model stays above T, in (-1, 1] (the paper's code uses 0.5)")
    p.add_argument("--calibration", metavar="FILE",
                   help="calibration texts, one per line (default: Wikipedia calibration paragraphs)")
    p.add_argument("--samples", type=int, default=None,
                   help=f"calibration texts to use (default {DEFAULT_SAMPLES}; all lines of --calibration)")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="tokens per calibration text")
    p.add_argument("--order", choices=ORDERS, default="dissimilar",
                   help="pair ranking: most dissimilar KV first (KVSharer), or the ablations")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed for --order random")
    p.add_argument("--max-trials", type=int, default=None,
                   help="stop after this many maps tried (default: walk every pair)")
    p.add_argument("--out", default="strategy.json", help="strategy file to write")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _calibration_texts(args, default_texts: Callable[[int], list[str]] | None) -> tuple[list[str], str]:
    if args.calibration:
        try:
            lines = Path(args.calibration).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise SearchParameterError(f"cannot read calibration file {args.calibration!r}: {e}") from None
        texts = [ln.strip() for ln in lines if ln.strip()]
        if args.samples is not None:
            texts = texts[:args.samples]
        if not texts:
            raise SearchParameterError(f"calibration file {args.calibration!r} has no text lines")
        return texts, f"file:{Path(args.calibration).name}"
    if default_texts is None:
        raise SearchParameterError("no calibration text: pass --calibration FILE (one text per line)")
    n = DEFAULT_SAMPLES if args.samples is None else args.samples
    return default_texts(n), f"wikipedia:calibration_paragraphs({n})"


def layers_search_main(argv: Sequence[str] | None = None,
                       default_texts: Callable[[int], list[str]] | None = None) -> int:
    """``kvcluster layers search --model M --ratio R --threshold T [--calibration FILE]
    [--order dissimilar|similar|random] [--out strategy.json]``; returns the exit code.
    ``default_texts(n)`` gives the calibration texts when no file is named (the CLI passes
    Wikipedia paragraphs; workers/ does not reach into kvcluster/ for them)."""
    args = _parser().parse_args(argv)
    prog = "kvcluster layers search"
    try:
        check_parameters(args.ratio, args.threshold, args.order)
        if args.samples is not None and args.samples < 1:
            raise SearchParameterError(f"--samples must be >= 1, got {args.samples}")
        texts, source = _calibration_texts(args, default_texts)
        from workers.model_loader import load_runner, load_tokenizer
        tokenizer = load_tokenizer(args.model)
        ids = calibration_token_ids(tokenizer, texts, args.tokens)
        if len(ids[0]) < args.tokens:
            print(f"{prog}: note: calibration cut to {len(ids[0])} tokens per text (the shortest)",
                  file=sys.stderr)
        runner = load_runner(args.model, dtype=args.dtype, device=args.device)
        s = search_strategy(runner, ids, args.ratio, args.threshold, args.order, args.seed,
                            model_name=args.model, calibration_source=source, progress=not args.quiet,
                            max_trials=args.max_trials)
        path = s.save(args.out)
    except (ValueError, FileNotFoundError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    want = target_shared(args.ratio, s.num_layers)
    print(f"{len(s.shared_layers)}/{s.num_layers} layers share KV (target {want}), "
          f"final-state cosine {s.final_cosine:.4f}, {len(s.trials)} pairs tried, "
          f"{s.search_seconds:.1f} s")
    print("map: " + ", ".join(f"{l}->{s.kv_source[l]}" for l in s.shared_layers) if s.shared_layers
          else "map: (none)")
    if len(s.shared_layers) < want:
        print(f"{prog}: warning: only {len(s.shared_layers)} pairs stayed above T = {args.threshold}"
              f" in {len(s.trials)} trials", file=sys.stderr)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(layers_search_main())
