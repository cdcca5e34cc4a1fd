"""Completion events: one ``OrderEvent`` per terminal order, for consumers that never poll.

Publishers import their drivers only when first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from foxpoll._lazy import lazy_attributes

from .base import AsyncPublisher, EventError, OrderEvent, Publisher, event_id_for
from .memory import MemoryPublisher

if TYPE_CHECKING:  # loaded on first use (below); named here for type checkers
    from .redis_streams import (
        AsyncRedisStreamConsumer,
        AsyncRedisStreamPublisher,
        RedisStreamConsumer,
        RedisStreamPublisher,
    )
    from .sqs import AsyncSQSPublisher, SQSPublisher

__all__ = [
    "AsyncPublisher",
    "AsyncRedisStreamConsumer",
    "AsyncRedisStreamPublisher",
    "AsyncSQSPublisher",
    "EventError",
    "MemoryPublisher",
    "OrderEvent",
    "Publisher",
    "RedisStreamConsumer",
    "RedisStreamPublisher",
    "SQSPublisher",
    "event_id_for",
]

# Hidden from type checkers: they see the names above, and refuse a misspelt one.
if not TYPE_CHECKING:
    __getattr__ = lazy_attributes(__name__, {
        "RedisStreamPublisher": "redis_streams",
        "AsyncRedisStreamPublisher": "redis_streams",
        "RedisStreamConsumer": "redis_streams",
        "AsyncRedisStreamConsumer": "redis_streams",
        "SQSPublisher": "sqs",
        "AsyncSQSPublisher": "sqs",
    })
