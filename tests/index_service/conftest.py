import pytest

from index_service.embedder import Embedder


@pytest.fixture(scope="session")
def embedder() -> Embedder:
    """The real MiniLM, loaded once per session (a few seconds on CPU)."""
    e = Embedder()
    e.warmup()
    return e
