"""Finds reusable KV for a new prompt: embedder, Qdrant store, exact-prefix index, token alignment."""
from index_service.align import align
from index_service.plan import ReusePlan, ReuseSpan

__all__ = ["ReusePlan", "ReuseSpan", "align", "IndexService", "LookupTimings", "Embedder", "QdrantStore",
           "PrefixIndex"]


def __getattr__(name: str):
    # lazy: importing the plan types must not pull in qdrant-client or torch
    if name in ("IndexService", "LookupTimings"):
        from index_service import service
        return getattr(service, name)
    if name == "Embedder":
        from index_service.embedder import Embedder
        return Embedder
    if name == "QdrantStore":
        from index_service.qdrant_store import QdrantStore
        return QdrantStore
    if name == "PrefixIndex":
        from index_service.prefix_index import PrefixIndex
        return PrefixIndex
    raise AttributeError(name)
