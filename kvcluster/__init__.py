"""kvcluster: semantic cross-request KV-cache reuse for LLM inference.

    import kvcluster
    r = kvcluster.submit("Summarize: ...", max_tokens=64)          # embedded default cluster
    r.text, r.source, r.cached_tokens, r.ttft_s
    client = kvcluster.connect(config={"reuse": {"mode": "dhd"}})  # or an address (ray://, http://)
    r = await client.asubmit([{"role": "user", "content": "..."}], tenant="acme")
"""
from kvcluster.client import (EmbeddedClient, asubmit, connect, default_client, register_backend,
                              set_default_client, shutdown, submit)
from kvcluster.config import ConfigError, KVClusterConfig, load_config
from kvcluster.types import (BackendUnavailableError, ClusterConnectionError, EmptyPromptError,
                             InvalidParameterError, InvalidRequestError, MalformedPromptError,
                             PromptTooLongError, SubmitResult, UnknownScopeError)

__all__ = [
    "submit", "asubmit", "connect", "shutdown", "default_client", "set_default_client",
    "register_backend", "EmbeddedClient", "SubmitResult", "KVClusterConfig", "load_config",
    "ConfigError", "InvalidRequestError", "MalformedPromptError", "EmptyPromptError",
    "PromptTooLongError", "InvalidParameterError", "UnknownScopeError", "BackendUnavailableError",
    "ClusterConnectionError",
]
__version__ = "0.1.0"
