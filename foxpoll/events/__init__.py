"""Completion events: one ``OrderEvent`` per terminal order, for consumers that never poll.

Publishers import their drivers only when first used.
"""

from __future__ import annotations

import importlib
from typing import Any

from .base import AsyncPublisher, EventError, OrderEvent, Publisher, event_id_for
from .memory import InMemoryPublisher

__all__ = [
    "AsyncPublisher",
    "AsyncRedisStreamConsumer",
    "AsyncRedisStreamPublisher",
    "AsyncSQSPublisher",
    "EventError",
    "InMemoryPublisher",
    "OrderEvent",
    "Publisher",
    "RedisStreamConsumer",
    "RedisStreamPublisher",
    "SQSPublisher",
    "event_id_for",
]

_LAZY = {
    "RedisStreamPublisher": "redis_streams",
    "AsyncRedisStreamPublisher": "redis_streams",
    "RedisStreamConsumer": "redis_streams",
    "AsyncRedisStreamConsumer": "redis_streams",
    "SQSPublisher": "sqs",
    "AsyncSQSPublisher": "sqs",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'foxpoll.events' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
