"""Shared pieces of the reliability tests and the chaos / soak / isolation benchmarks.

* ``tiny_model_dir()``: a Hugging Face folder with a tiny random-weight Llama (4 layers, hidden 64)
  and SmolLM2's real tokenizer, so every code path (tokenizer, loader, runner, engine, tiers,
  index, Serve) runs as with SmolLM2 but a request costs milliseconds on this CPU. Quality is not
  measured with it.
* ``RedisProc``: our own redis-server on a free port (never the shared 6379 one), start/stop at will.
* ``HashEmbedder``: a deterministic 384-d bag-of-words embedder with the Embedder interface, for
  fast tests that need the index's semantic path without loading MiniLM (the Ray runs use MiniLM).
* ``LocalCluster``: in-process Workers + IndexService + the real Router (LocalWorkerBackend), the
  same request path as the Ray cluster without Ray.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
TINY_SPEC = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=2048)


def _smollm2_folder() -> Path:
    from workers.model_loader import hf_folder
    return hf_folder("smollm2-135m")


def tiny_model_dir(root: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """Build (once) and return the tiny random model folder."""
    base = Path(root) if root else Path(os.environ.get("KVCLUSTER_CACHE_DIR") or
                                        Path.home() / ".cache" / "kvcluster") / "models"
    out = base / f"tiny-random-llama-s{seed}"
    if (out / "model.safetensors").is_file():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    src = _smollm2_folder()
    scfg = json.loads((src / "config.json").read_text())
    cfg = LlamaConfig(vocab_size=scfg["vocab_size"], bos_token_id=scfg["bos_token_id"],
                      eos_token_id=scfg["eos_token_id"], pad_token_id=scfg.get("pad_token_id"),
                      tie_word_embeddings=True, rms_norm_eps=1e-5, **TINY_SPEC)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (src / f).is_file():
            shutil.copy(src / f, tmp / f)
    if not out.exists():
        tmp.rename(out)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisProc:
    """A private redis-server (no persistence) on a free port."""

    def __init__(self, port: int | None = None, maxmemory: int | None = None) -> None:
        self.port = port or free_port()
        self.maxmemory = maxmemory
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def ping(self) -> bool:
        try:
            import redis
            return bool(redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.3).ping())
        except Exception:  # noqa: BLE001
            return False

    def start(self) -> "RedisProc":
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server not installed")
        args = [exe, "--port", str(self.port), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"]
        if self.maxmemory:
            args += ["--maxmemory", str(self.maxmemory), "--maxmemory-policy", "allkeys-lru"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self.ping():
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def info(self, section: str = "memory") -> dict:
        import redis
        return redis.Redis(host="127.0.0.1", port=self.port).info(section)


class HashEmbedder:
    """Deterministic bag-of-words vectors (384-d, unit norm): similar texts -> similar vectors."""

    dim = 384

    def embed(self, texts):
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in re.findall(r"\w+", t.lower()):
                h = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=4).digest(), "little")
                out[i, h % self.dim] += 1.0
            n = np.linalg.norm(out[i])
            out[i] = out[i] / n if n else out[i]
        return out

    def embed_one(self, text):
        return self.embed([text])[0]

    def warmup(self):
        pass


# ---- texts -------------------------------------------------------------------------------------
DOCS = [
    "The Danube flows through ten countries, from the Black Forest in Germany to the Black Sea.",
    "The Rhine rises in the Swiss Alps and flows north through Germany and the Netherlands.",
    "The Volga is the longest river in Europe; it flows through central Russia into the Caspian Sea.",
    "Mount Everest, on the border of Nepal and China, is the highest mountain above sea level.",
    "The Sahara is the largest hot desert, covering most of North Africa from the Atlantic to the Red Sea.",
    "The Amazon rainforest spans nine countries and holds the largest number of species on land.",
    "Lake Baikal in Siberia is the deepest lake in the world and holds a fifth of its fresh water.",
    "The Great Barrier Reef off Queensland is the largest coral reef system, visible from space.",
]
QUESTIONS = ["Which is the longest?", "Name the countries mentioned.", "Summarize in one line.",
             "What is largest?", "Which one is in Asia?", "List the seas."]


def prompt_of(rng, n_docs: int = 3) -> str:
    idx = rng.choice(len(DOCS), size=n_docs, replace=False)
    return " ".join(DOCS[i] for i in idx) + "\nQuestion: " + QUESTIONS[rng.integers(len(QUESTIONS))]


# ---- in-process cluster ------------------------------------------------------------------------
class LocalCluster:
    """Workers (in-process) + IndexService + Router: the Ray cluster's request path without Ray."""

    def __init__(self, n_workers: int = 2, model_dir: Path | None = None, redis_url: str | None = None,
                 redis_prefix: str | None = None, host_bytes: int = 64 << 20, channel: str = "inproc",
                 mode: str = "dhd", embedder=None, qdrant_path: str = ":memory:", engine: str = "auto",
                 runner=None, worker_extra: dict | None = None) -> None:
        from index_service.service import IndexService
        from workers.scheduler import LocalIndexBackend, LocalWorkerBackend, Router, Scheduler
        from workers.worker_actor import Worker, WorkerOptions

        model_dir = model_dir or tiny_model_dir()
        self.redis_prefix = redis_prefix or f"kvrel-{uuid.uuid4().hex[:10]}:"
        self.workers = {}
        for i in range(n_workers):
            opts = WorkerOptions(model=str(model_dir), reuse={"mode": mode}, host_bytes=host_bytes,
                                 redis_url=redis_url, redis_prefix=self.redis_prefix, channel=channel,
                                 num_threads=1, fetch_timeout_s=2.0, flush_timeout_s=5.0, **(worker_extra or {}))
            self.workers[f"w{i}"] = Worker(f"w{i}", opts, runner=runner)
        peers = {w: (x.tcp_address if channel == "tcp" else x) for w, x in self.workers.items()}
        for x in self.workers.values():
            x.set_peers(peers)
        w0 = next(iter(self.workers.values()))
        self.fingerprint = w0.fingerprint
        self.index = IndexService(qdrant_path=qdrant_path, embedder=embedder or HashEmbedder(), engine=engine,
                                  top_k=3, min_score=0.2, min_run=4)
        self.scheduler = Scheduler(list(self.workers))
        self.router = Router(self.scheduler, {w: LocalWorkerBackend(x) for w, x in self.workers.items()},
                             LocalIndexBackend(self.index), self.fingerprint)
        from workers.model_loader import load_tokenizer
        self.tokenizer = load_tokenizer(str(model_dir))

    def request(self, text: str, tenant: str = "default", scope: str = "private", cache_salt: str | None = None,
                max_tokens: int = 4, **kw):
        from workers.scheduler import RouterRequest
        ids = list(self.tokenizer(text)["input_ids"])
        return RouterRequest(token_ids=ids, text=text, tenant=tenant, scope=scope, cache_salt=cache_salt,
                             max_tokens=max_tokens, stop_ids=[], **kw)

    def run(self, req):
        return asyncio.run(self.router.generate(req))

    def close(self) -> None:
        for x in self.workers.values():
            x.shutdown()
        self.index.close()
