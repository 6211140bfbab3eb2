"""Finds reusable KV for a new prompt: embedder, Qdrant store, exact-prefix index, token alignment."""
from index_service.align import align
from index_service.plan import ReusePlan, ReuseSpan

__all__ = ["ReusePlan", "ReuseSpan", "align"]
