"""kvcluster: semantic cross-request KV-cache reuse for LLM inference."""
from kvcluster.config import KVClusterConfig, load_config

__all__ = ["KVClusterConfig", "load_config"]
__version__ = "0.1.0"
