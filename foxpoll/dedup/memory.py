"""``MemoryDedupStore``: a dict and a lock. For tests and single-process tools."""

from __future__ import annotations

import threading

import attrs

from foxpoll._clock import Clock, SystemClock

from .base import (
    AsyncDedupStore,
    ClaimResult,
    DedupStore,
    DeliveryRecord,
    DeliveryState,
    lease_lost,
)

__all__ = ["AsyncMemoryDedupStore", "MemoryDedupStore"]


class MemoryDedupStore(DedupStore):
    """An in-process store, thread-safe. Nothing survives the process.

    Args:
        clock: The store's time, read with ``clock.time()``; a ``FakeClock`` makes lease
            expiry testable.
    """

    def __init__(self, *, clock: Clock | None = None) -> None:
        self._clock = (clock or SystemClock()).time
        self._records: dict[str, DeliveryRecord] = {}
        self._lock = threading.Lock()

    def _claim(self, order_id: str, token: str, lease: float) -> ClaimResult:
        with self._lock:
            now = self._clock()
            current = self._records.get(order_id)
            free = current is None or current.state is DeliveryState.RELEASED or (
                current.state is DeliveryState.CLAIMED
                and current.lease_until is not None
                and current.lease_until <= now
            )
            if not free:
                assert current is not None
                return ClaimResult(False, current, now)
            record = DeliveryRecord(
                order_id=order_id, state=DeliveryState.CLAIMED, token=token,
                lease_until=now + lease, attempts=(current.attempts if current else 0) + 1,
                created_at=current.created_at if current else now, updated_at=now,
            )
            self._records[order_id] = record
            return ClaimResult(True, record, now)

    def _change(self, order_id: str, token: str, **changes: object) -> DeliveryRecord:
        current = self._records.get(order_id)
        if current is None or current.token != token or current.state is not (
            DeliveryState.CLAIMED
        ):
            raise lease_lost(order_id, current)
        record = attrs.evolve(current, updated_at=self._clock(), **changes)  # type: ignore[arg-type]
        self._records[order_id] = record
        return record

    def _complete(
        self, order_id: str, token: str, payload_hash: str, receipt: str | None
    ) -> DeliveryRecord:
        with self._lock:
            current = self._records.get(order_id)
            if current is not None and current.state is DeliveryState.DELIVERED and (
                current.token == token
            ):
                return current
            return self._change(order_id, token, state=DeliveryState.DELIVERED,
                                payload_hash=payload_hash, receipt=receipt,
                                lease_until=None, delivered_at=self._clock())

    def _release(self, order_id: str, token: str) -> DeliveryRecord:
        with self._lock:
            return self._change(order_id, token, state=DeliveryState.RELEASED, lease_until=None)

    def _renew(self, order_id: str, token: str, lease: float) -> DeliveryRecord:
        with self._lock:
            return self._change(order_id, token, lease_until=self._clock() + lease)

    def _get(self, order_id: str) -> DeliveryRecord | None:
        with self._lock:
            return self._records.get(order_id)

    def _list(self, state: DeliveryState, limit: int) -> list[DeliveryRecord]:
        with self._lock:
            found = [r for r in self._records.values() if r.state is state]
        return sorted(found, key=lambda r: (r.updated_at or 0, r.order_id))[:limit]


class AsyncMemoryDedupStore(AsyncDedupStore):
    """:class:`MemoryDedupStore` behind the async interface (nothing here blocks)."""

    def __init__(self, *, clock: Clock | None = None) -> None:
        self.sync = MemoryDedupStore(clock=clock)

    async def _claim(self, order_id: str, token: str, lease: float) -> ClaimResult:
        return self.sync._claim(order_id, token, lease)

    async def _complete(
        self, order_id: str, token: str, payload_hash: str, receipt: str | None
    ) -> DeliveryRecord:
        return self.sync._complete(order_id, token, payload_hash, receipt)

    async def _release(self, order_id: str, token: str) -> DeliveryRecord:
        return self.sync._release(order_id, token)

    async def _renew(self, order_id: str, token: str, lease: float) -> DeliveryRecord:
        return self.sync._renew(order_id, token, lease)

    async def _get(self, order_id: str) -> DeliveryRecord | None:
        return self.sync._get(order_id)

    async def _list(self, state: DeliveryState, limit: int) -> list[DeliveryRecord]:
        return self.sync._list(state, limit)
