"""The Python client: ``kvcluster.submit()``, ``kvcluster.asubmit()`` and ``kvcluster.connect()``.

``connect(address=None, config=None)`` returns a client with ``submit``/``asubmit``/``close``:

  address None (and ``cluster.address`` unset), "embedded" or "local"
      an in-process EmbeddedCluster (SmolLM2 by default, embedded Qdrant), started lazily on the
      first request
  "ray://host:port" or "auto"        a Ray cluster      (backend module ``kvcluster.ray_client``)
  "http://host:port", "https://..."  the Serve HTTP API (backend module ``kvcluster.http_client``)

A backend module provides ``connect(address, config) -> client``; ``register_backend(scheme, fn)``
plugs one in without a module. A scheme with no backend raises ``BackendUnavailableError`` (a
NotImplementedError) that says so.

The module-level ``submit``/``asubmit`` use one default client, made by ``connect()`` on first use
(once, under a lock): with no cluster configured that is the embedded default.

Every request is validated (``kvcluster.types.validate_request``) before any backend sees it, so a
bad request fails fast with a typed ``InvalidRequestError``, without loading a model.
"""
from __future__ import annotations

import asyncio
import atexit
import importlib
import logging
import threading
import time
from typing import Any, Callable, Protocol

from kvcluster.config import ConfigError, KVClusterConfig
from kvcluster.types import (BackendUnavailableError, Prompt, SubmitResult, as_config,
                             validate_request)

log = logging.getLogger(__name__)

EMBEDDED_ADDRESSES = (None, "", "embedded", "local")


class Client(Protocol):
    config: KVClusterConfig

    def submit(self, prompt: Prompt, max_tokens: int = 64, temperature: float = 0.0, tenant: str = "default",
               share: str = "private", cache_salt: str | None = None, top_p: float = 1.0,
               seed: int | None = None) -> SubmitResult: ...

    async def asubmit(self, prompt: Prompt, **kwargs: Any) -> SubmitResult: ...

    def close(self) -> None: ...


class EmbeddedClient:
    """Client of an in-process EmbeddedCluster, started on the first request (or given)."""

    address = "embedded"

    def __init__(self, config: Any = None, cluster=None) -> None:
        self.config = cluster.config if cluster is not None else as_config(config)
        self._cluster = cluster
        self._lock = threading.Lock()

    @property
    def cluster(self):
        """The EmbeddedCluster, started now if it is not yet (loads the model: ~20 s on a CPU)."""
        if self._cluster is None:
            with self._lock:
                if self._cluster is None:
                    self._cluster = _make_embedded(self.config)
        return self._cluster

    @property
    def started(self) -> bool:
        return self._cluster is not None

    def submit(self, prompt: Prompt, max_tokens: int = 64, temperature: float = 0.0, tenant: str = "default",
               share: str = "private", cache_salt: str | None = None, top_p: float = 1.0,
               seed: int | None = None) -> SubmitResult:
        req = validate_request(prompt, max_tokens, temperature, tenant, share, cache_salt, top_p, seed,
                               config=self.config)
        cluster = self.cluster  # started before the clock starts: TTFT is the request's, not the start's
        return cluster.submit_request(req, time.perf_counter())

    async def asubmit(self, prompt: Prompt, **kwargs: Any) -> SubmitResult:
        # validate here, on the caller's side, so a bad request fails before a thread is taken
        validate_request(prompt, **kwargs, config=self.config)
        return await asyncio.to_thread(self.submit, prompt, **kwargs)

    def close(self) -> None:
        with self._lock:
            if self._cluster is not None:
                self._cluster.close()

    def __enter__(self) -> "EmbeddedClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _make_embedded(config: KVClusterConfig):
    from kvcluster.embedded import EmbeddedCluster
    return EmbeddedCluster(config)


# ---- remote backends (hooks) ----------------------------------------------------------------------
_BACKENDS: dict[str, Callable[[str, KVClusterConfig], Any]] = {}
_BACKEND_MODULES = {"ray": "kvcluster.ray_client", "auto": "kvcluster.ray_client",
                    "http": "kvcluster.ray_client", "https": "kvcluster.ray_client"}


def register_backend(scheme: str, factory: Callable[[str, KVClusterConfig], Any]) -> None:
    """Serve ``scheme://...`` addresses with ``factory(address, config) -> client``."""
    _BACKENDS[scheme.lower()] = factory


def _scheme(address: str) -> str:
    if address == "auto":
        return "auto"
    if "://" not in address:
        raise ConfigError(f"invalid kvcluster config: cluster.address: {address!r} is not an address; use "
                          f"none (embedded), 'auto', 'ray://host:port' or 'http://host:port'")
    return address.split("://", 1)[0].lower()


def _remote(address: str, config: KVClusterConfig):
    scheme = _scheme(address)
    factory = _BACKENDS.get(scheme)
    if factory is None:
        module = _BACKEND_MODULES.get(scheme)
        if module is None:
            raise ConfigError(f"invalid kvcluster config: cluster.address: unknown scheme {scheme!r} in "
                              f"{address!r}; use ray://, http:// or https://")
        try:
            factory = getattr(importlib.import_module(module), "connect")
        except (ImportError, AttributeError):
            kind = "HTTP" if scheme.startswith("http") else "Ray"
            raise BackendUnavailableError(
                f"connecting to {address!r} needs the {kind} client backend ({module}.connect), which "
                f"this installation does not provide yet; use the embedded cluster (address=None) or "
                f"call the Serve HTTP API directly") from None
    return factory(address, config)


def connect(address: str | None = None, config: Any = None):
    """A client for ``address`` (default: ``cluster.address`` of the config, else embedded).

    ``config``: a KVClusterConfig, a mapping, a YAML path, or None for ``$KVCLUSTER_CONFIG`` and
    ``KVCLUSTER_*`` variables. The embedded cluster starts on the first request, not here.
    """
    cfg = as_config(config)
    if address is not None and not isinstance(address, str):
        raise ConfigError(f"address must be a string or None, got {type(address).__name__}")
    addr = address if address is not None else cfg.cluster.address
    if addr in EMBEDDED_ADDRESSES:
        return EmbeddedClient(cfg)
    return _remote(addr, cfg)


# ---- the module-level default client ---------------------------------------------------------------
_default: Any = None
_default_lock = threading.Lock()
_atexit_set = False


def default_client():
    """The client behind ``kvcluster.submit``: ``connect()`` on first use, once."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = connect()
                global _atexit_set
                if not _atexit_set:
                    atexit.register(shutdown)  # close the embedded index cleanly at exit
                    _atexit_set = True
    return _default


def set_default_client(client) -> Any:
    """Make ``client`` the one ``kvcluster.submit`` uses (None: make a new one on next use);
    returns the previous one (not closed)."""
    global _default
    with _default_lock:
        prev, _default = _default, client
    return prev


def shutdown() -> None:
    """Close the default client (and its embedded cluster, if it started one)."""
    prev = set_default_client(None)
    if prev is not None:
        prev.close()


def submit(prompt: Prompt, max_tokens: int = 64, temperature: float = 0.0, tenant: str = "default",
           share: str = "private", cache_salt: str | None = None, top_p: float = 1.0,
           seed: int | None = None) -> SubmitResult:
    """Run one request on the default cluster and return its result.

    ``prompt``: a string (sent as one user message through the chat template) or a list of chat
    messages ``{"role": "system"|"user"|"assistant", "content": str}``. ``share="public"`` lets
    every tenant reuse this prompt's KV; "private" (default) keeps it to ``tenant``. A
    ``cache_salt`` reuses only KV stored with the same salt.
    """
    return default_client().submit(prompt, max_tokens=max_tokens, temperature=temperature, tenant=tenant,
                                   share=share, cache_salt=cache_salt, top_p=top_p, seed=seed)


async def asubmit(prompt: Prompt, max_tokens: int = 64, temperature: float = 0.0, tenant: str = "default",
                  share: str = "private", cache_salt: str | None = None, top_p: float = 1.0,
                  seed: int | None = None) -> SubmitResult:
    """``submit`` for asyncio: runs in a worker thread, so the event loop stays free."""
    client = await asyncio.to_thread(default_client)
    return await client.asubmit(prompt, max_tokens=max_tokens, temperature=temperature, tenant=tenant,
                                share=share, cache_salt=cache_salt, top_p=top_p, seed=seed)
