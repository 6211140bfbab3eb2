"""The shape of a Llama-family model (Llama, Qwen2, Mistral), read from a Hugging Face config."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelSpec:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position: int = 4096
    tie_embeddings: bool = False
    qkv_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_hf_config(cls, cfg: Any) -> "ModelSpec":
        mtype = getattr(cfg, "model_type", "llama")
        if mtype not in ("llama", "qwen2", "mistral"):
            raise ValueError(f"unsupported model type {mtype!r}: kvcluster runs llama, qwen2, mistral")
        rope = getattr(cfg, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        scaling = getattr(cfg, "rope_scaling", None) or rope
        rtype = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        eos = getattr(cfg, "eos_token_id", None)
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        heads = cfg.num_attention_heads
        return cls(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            intermediate_size=cfg.intermediate_size,
            rms_norm_eps=cfg.rms_norm_eps,
            rope_theta=float(theta),
            rope_scaling=dict(scaling) if rtype not in (None, "default") else None,
            max_position=getattr(cfg, "max_position_embeddings", 4096),
            tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            qkv_bias=mtype == "qwen2" or bool(getattr(cfg, "attention_bias", False)),
            bos_token_id=getattr(cfg, "bos_token_id", None),
            eos_token_ids=eos_ids,
        )
