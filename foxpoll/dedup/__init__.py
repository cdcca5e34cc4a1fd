"""Dedup stores: where workers agree who delivers an order's codes, exactly once.

Backends import their drivers only when first used, so ``foxpoll.dedup`` needs none of
the optional extras until you pick a store.
"""

from __future__ import annotations

import importlib
from typing import Any

from .base import (
    AsyncDedupStore,
    ClaimResult,
    DedupStore,
    DeliveryRecord,
    DeliveryState,
)
from .memory import AsyncMemoryDedupStore, MemoryDedupStore
from .sqlite import AsyncSQLiteDedupStore, SQLiteDedupStore

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
]

_LAZY = {
    "PostgresDedupStore": "postgres",
    "AsyncPostgresDedupStore": "postgres",
    "RedisDedupStore": "redis",
    "AsyncRedisDedupStore": "redis",
    "DynamoDBDedupStore": "dynamodb",
    "AsyncDynamoDBDedupStore": "dynamodb",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'foxpoll.dedup' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
