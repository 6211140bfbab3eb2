"""Peers inside one process: hand over the stored buffers, no copy and no serialisation."""
from __future__ import annotations

from typing import Callable, Sequence

Source = Callable[[list[str]], Sequence[object | None]]
Sink = Callable[[list[tuple[str, object]]], None]


class InProcessChannel:
    """``fetch`` asks the peer's source (e.g. ``TieredStore.get_encoded_many``); the receiver
    verifies what it decodes, exactly as for remote peers."""

    def __init__(self, source: Source | None = None, sink: Sink | None = None) -> None:
        self.source, self.sink = source, sink

    def fetch(self, keys: Sequence[str]) -> list[object | None]:
        if self.source is None:
            return [None] * len(keys)
        return list(self.source(list(keys)))

    def push(self, items: Sequence[tuple[str, object]]) -> None:
        if self.sink is not None:
            self.sink(list(items))

    __call__ = fetch  # usable directly as a TieredStore peer
