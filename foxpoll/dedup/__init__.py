"""Dedup stores: where workers agree who delivers an order's codes, exactly once.

Backends import their drivers only when first used, so ``foxpoll.dedup`` needs none of
the optional extras until you pick a store.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from foxpoll._lazy import lazy_attributes

from .base import (
    AsyncDedupStore,
    ClaimResult,
    DedupStore,
    DeliveryRecord,
    DeliveryState,
    lease_lost,
    record_from_fields,
)
from .memory import AsyncMemoryDedupStore, MemoryDedupStore
from .sqlite import AsyncSQLiteDedupStore, SQLiteDedupStore

if TYPE_CHECKING:  # loaded on first use (below); named here for type checkers
    from .dynamodb import AsyncDynamoDBDedupStore, DynamoDBDedupStore
    from .postgres import AsyncPostgresDedupStore, PostgresDedupStore
    from .redis import AsyncRedisDedupStore, RedisDedupStore

__all__ = [
    "AsyncDedupStore",
    "AsyncDynamoDBDedupStore",
    "AsyncMemoryDedupStore",
    "AsyncPostgresDedupStore",
    "AsyncRedisDedupStore",
    "AsyncSQLiteDedupStore",
    "ClaimResult",
    "DedupStore",
    "DeliveryRecord",
    "DeliveryState",
    "DynamoDBDedupStore",
    "MemoryDedupStore",
    "PostgresDedupStore",
    "RedisDedupStore",
    "SQLiteDedupStore",
    "lease_lost",
    "record_from_fields",
]

# Hidden from type checkers: they see the names above, and refuse a misspelt one.
if not TYPE_CHECKING:
    __getattr__ = lazy_attributes(__name__, {
        "PostgresDedupStore": "postgres",
        "AsyncPostgresDedupStore": "postgres",
        "RedisDedupStore": "redis",
        "AsyncRedisDedupStore": "redis",
        "DynamoDBDedupStore": "dynamodb",
        "AsyncDynamoDBDedupStore": "dynamodb",
    })
