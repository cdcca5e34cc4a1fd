"""``MemoryPublisher``: keeps events in a list, for tests and demos."""

from __future__ import annotations

import threading

from .base import OrderEvent

__all__ = ["MemoryPublisher"]


class MemoryPublisher:
    """Records every published event in :attr:`events`, in order (repeats included)."""

    def __init__(self) -> None:
        self.events: list[OrderEvent] = []
        self._lock = threading.Lock()

    def publish(self, event: OrderEvent) -> str:
        with self._lock:
            self.events.append(event)
            return str(len(self.events))

    def close(self) -> None:
        """Nothing to release: the events stay readable."""

    async def aclose(self) -> None:
        """Nothing to release: the events stay readable."""

    def __enter__(self) -> MemoryPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> MemoryPublisher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def unique(self) -> list[OrderEvent]:
        """The events with repeats (same ``event_id``) dropped, first one kept."""
        first: dict[str, OrderEvent] = {}
        for event in self.events:
            first.setdefault(event.event_id, event)
        return list(first.values())
