"""Request and result types of the client API, its typed errors, and request validation.

Pure Python (no torch, no model): every backend (embedded, Ray, HTTP) validates a request here
before it costs anything, so a bad request fails the same way whichever backend runs it.

Errors: every refused request raises an ``InvalidRequestError`` (a ``ValueError``). It is the
worker side's ``KVClusterInputError`` itself, so the engine's own refusals (``EmptyPromptError``,
``PromptTooLongError``, ``InvalidParameterError``, ``TokenOutOfVocabError``) are caught by the same
``except InvalidRequestError``. A malformed configuration raises ``ConfigError`` (naming the key);
an address whose backend is missing raises ``BackendUnavailableError`` (a NotImplementedError); a
backend that cannot be reached raises ``ClusterConnectionError`` (a ConnectionError).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Union

from kvcluster.config import ConfigError, KVClusterConfig
from workers.errors import (DonorKVError, EmptyPromptError, InvalidParameterError,
                            KVClusterInputError, PromptTooLongError, TokenOutOfVocabError)

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}
Prompt = Union[str, list[Message]]
Source = Literal["prefix", "semantic", "miss"]

SCOPES = ("private", "public")
ROLES = ("system", "user", "assistant")
MAX_TENANT_CHARS = 256
MAX_SALT_CHARS = 1024
MAX_MESSAGES = 1024

# The one base class of refused requests (an alias: the engine raises the same class).
InvalidRequestError = KVClusterInputError


class MalformedPromptError(KVClusterInputError):
    """The prompt is neither a non-empty string nor a well-formed list of chat messages."""


class UnknownScopeError(InvalidParameterError):
    """``share`` is not one of "private" or "public"."""


class BackendUnavailableError(NotImplementedError):
    """The address names a backend (ray://, http://) that this installation does not provide."""


class ClusterConnectionError(ConnectionError):
    """The cluster at the given address cannot be reached."""


__all__ = [
    "SubmitResult", "Request", "validate_request", "prompt_text", "as_config", "SCOPES",
    "InvalidRequestError", "MalformedPromptError", "EmptyPromptError", "PromptTooLongError",
    "InvalidParameterError", "UnknownScopeError", "TokenOutOfVocabError", "ConfigError",
    "BackendUnavailableError", "ClusterConnectionError", "DonorKVError",
]


@dataclass
class SubmitResult:
    """What one request produced and how much of its prompt KV came from the cache.

    Token accounting (as the engine counts): ``cached_tokens`` prompt tokens kept a donor's KV as
    it was, ``recomputed_tokens`` more took a donor's KV and were then recomputed by DHD (or the
    chosen reuse mode); the rest had no donor and were computed. ``reused_tokens`` = cached +
    recomputed is the token hit rate's numerator.
    """

    text: str
    token_ids: list[int]  # generated tokens
    prompt_tokens: int
    cached_tokens: int
    recomputed_tokens: int
    source: str  # "prefix" | "semantic" | "miss"
    ttft_s: float  # submit() entry to the first token: tokenize + lookup + prefill + sample
    decode_s: float
    finish_reason: str  # "stop" | "length"
    segment_id: str | None  # the stored segment of this prompt (None when nothing was stored)
    donor_ids: list[str] = field(default_factory=list)
    tenant: str = "default"
    lookup_s: float = 0.0
    prefill_s: float = 0.0
    decode_recomputed: int = 0  # reused tokens recomputed during decode (DHD decode)
    flops_fraction: float = 1.0  # prefill linear-layer FLOPs over a full prefill's
    fallback: str | None = None  # why the plan was dropped for a full recompute (bad donor KV)

    @property
    def reused_tokens(self) -> int:
        return self.cached_tokens + self.recomputed_tokens

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def hit_rate(self) -> float:
        return self.reused_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(reused_tokens=self.reused_tokens, completion_tokens=self.completion_tokens,
                 hit_rate=self.hit_rate)
        return d


@dataclass(frozen=True)
class Request:
    """A validated request: messages is None for a plain-string prompt."""

    prompt: Prompt
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    tenant: str
    share: str
    cache_salt: str | None

    @property
    def text(self) -> str:
        return prompt_text(self.prompt)


def prompt_text(prompt: Prompt) -> str:
    """A prompt as one string ("role: content" lines for chat): what the index embeds."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_prompt(prompt: Any, max_chars: int) -> Prompt:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise EmptyPromptError("the prompt is empty")
        if len(prompt) > max_chars:
            raise PromptTooLongError(f"the prompt has {len(prompt)} characters, over the limit of "
                                     f"{max_chars} (serve.max_prompt_chars)")
        return prompt
    if isinstance(prompt, (bytes, bytearray)):
        raise MalformedPromptError("the prompt must be str, not bytes: decode it first")
    if not isinstance(prompt, (list, tuple)):
        raise MalformedPromptError(f"the prompt must be a string or a list of chat messages, "
                                   f"got {type(prompt).__name__}")
    if not prompt:
        raise EmptyPromptError("the message list is empty")
    if len(prompt) > MAX_MESSAGES:
        raise MalformedPromptError(f"{len(prompt)} messages exceed the limit of {MAX_MESSAGES}")
    out, total = [], 0
    for i, m in enumerate(prompt):
        if not isinstance(m, dict):
            raise MalformedPromptError(f"messages[{i}] must be a dict with 'role' and 'content', "
                                       f"got {type(m).__name__}")
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise MalformedPromptError(f"messages[{i}] has unknown keys {sorted(extra)}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise MalformedPromptError(f"messages[{i}].role must be one of {ROLES}, got {role!r}")
        if not isinstance(content, str):
            raise MalformedPromptError(f"messages[{i}].content must be str, got {type(content).__name__}")
        total += len(content)
        out.append({"role": role, "content": content})
    if not any(m["content"].strip() for m in out):
        raise EmptyPromptError("every message is empty")
    if out[-1]["role"] == "assistant":
        raise MalformedPromptError("the last message must be from the user or the system, not the assistant")
    if total > max_chars:
        raise PromptTooLongError(f"the messages have {total} characters, over the limit of "
                                 f"{max_chars} (serve.max_prompt_chars)")
    return out


def validate_request(prompt: Any, max_tokens: Any = 64, temperature: Any = 0.0, tenant: Any = "default",
                     share: Any = "private", cache_salt: Any = None, top_p: Any = 1.0, seed: Any = None,
                     config: KVClusterConfig | None = None) -> Request:
    """Checks every argument of submit(); raises an InvalidRequestError subclass naming the problem."""
    cfg = config or KVClusterConfig()
    p = _check_prompt(prompt, cfg.serve.max_prompt_chars)
    limit = cfg.serve.max_tokens_limit
    if not _is_int(max_tokens):
        raise InvalidParameterError(f"max_tokens must be an int, got {type(max_tokens).__name__}")
    if not 1 <= max_tokens <= limit:
        raise InvalidParameterError(f"max_tokens must be in [1, {limit}] (serve.max_tokens_limit), got {max_tokens}")
    if not _is_number(temperature) or temperature < 0:
        raise InvalidParameterError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise InvalidParameterError(f"top_p must be in (0, 1], got {top_p!r}")
    if seed is not None and not _is_int(seed):
        raise InvalidParameterError(f"seed must be an int or None, got {type(seed).__name__}")
    if not isinstance(tenant, str) or not tenant or len(tenant) > MAX_TENANT_CHARS:
        raise InvalidParameterError(f"tenant must be a non-empty string of at most {MAX_TENANT_CHARS} "
                                    f"characters, got {tenant!r:.80}")
    if share not in SCOPES:
        raise UnknownScopeError(f"share must be one of {SCOPES}, got {share!r:.80}")
    if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt
                                   or len(cache_salt) > MAX_SALT_CHARS):
        raise InvalidParameterError(f"cache_salt must be None or a non-empty string of at most "
                                    f"{MAX_SALT_CHARS} characters")
    return Request(p, max_tokens, float(temperature), float(top_p), seed, tenant, share, cache_salt)


def as_config(config: Any = None) -> KVClusterConfig:
    """A KVClusterConfig from None (``$KVCLUSTER_CONFIG`` and ``KVCLUSTER_*``), a config, a mapping
    or a YAML path. Raises ConfigError naming the bad key."""
    from os import PathLike

    from kvcluster.config import config_from_dict, load_config

    if config is None:
        return load_config()
    if isinstance(config, KVClusterConfig):
        return config
    if isinstance(config, dict):
        return config_from_dict(config)
    if isinstance(config, (str, PathLike)):
        return load_config(config)
    raise ConfigError(f"config must be a KVClusterConfig, a mapping or a YAML path, got {type(config).__name__}")
