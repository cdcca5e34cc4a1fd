"""Store primitives as flows, so each backend's sync and async classes share every decision.

A backend's flows are :mod:`foxpoll._io` flows: they yield the backend's
:class:`~foxpoll._io.Op` s (a SQL :class:`Query`, a Redis script call...), and its
``_run`` performs them with :func:`~foxpoll._io.run` or :func:`~foxpoll._io.arun`.
:class:`FlowStore` turns flows into the six public primitives: with a blocking ``_run``
they return values, with an async one the very same methods return awaitables.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import attrs

from foxpoll._io import Flow, Op
from foxpoll.errors import DedupError

from ._sql import COLUMNS, Statements
from .base import (
    ClaimResult,
    DeliveryRecord,
    DeliveryState,
    claimed_record,
    delivered_record,
    lease_lost,
    record_from_fields,
)

__all__ = ["Flow", "FlowStore", "Query", "Rows", "SQLFlows", "query"]

Rows = list[tuple[Any, ...]]


class Flows(Protocol):
    def claim(self, order_id: str, token: str, lease: float) -> Flow[ClaimResult]: ...

    def complete(
        self, order_id: str, token: str, payload_hash: str, receipt: str | None
    ) -> Flow[DeliveryRecord]: ...

    def release(self, order_id: str, token: str) -> Flow[DeliveryRecord]: ...

    def renew(self, order_id: str, token: str, lease: float) -> Flow[DeliveryRecord]: ...

    def get(self, order_id: str) -> Flow[DeliveryRecord | None]: ...

    def list(self, state: DeliveryState, limit: int) -> Flow[list[DeliveryRecord]]: ...


class FlowStore:
    """The six primitives, each: run the backend's flow (the base class checked arguments)."""

    _flows: Flows

    def _run(self, flow: Flow[Any]) -> Any:
        raise NotImplementedError

    def _claim(self, order_id: str, token: str, lease: float) -> Any:
        return self._run(self._flows.claim(order_id, token, lease))

    def _complete(self, order_id: str, token: str, payload_hash: str, receipt: str | None) -> Any:
        return self._run(self._flows.complete(order_id, token, payload_hash, receipt))

    def _release(self, order_id: str, token: str) -> Any:
        return self._run(self._flows.release(order_id, token))

    def _renew(self, order_id: str, token: str, lease: float) -> Any:
        return self._run(self._flows.renew(order_id, token, lease))

    def _get(self, order_id: str) -> Any:
        return self._run(self._flows.get(order_id))

    def _list(self, state: DeliveryState, limit: int) -> Any:
        return self._run(self._flows.list(state, limit))


@attrs.frozen
class Query(Op[Rows]):
    """Run ``sql`` with ``params``; resume with the rows, as tuples in the order of the
    statement's columns."""

    sql: str
    params: Mapping[str, Any]


def query(op: Op[Any]) -> Query:
    """``op``, which a SQL flow yields, as the :class:`Query` it must be."""
    if not isinstance(op, Query):
        raise TypeError(f"a SQL store performs no {type(op).__name__}")
    return op


#: What ``get`` returns: the record's columns, then the store's clock.
_GOT = (*COLUMNS, "now")


def _record(row: tuple[Any, ...], columns: tuple[str, ...] = COLUMNS) -> DeliveryRecord:
    return record_from_fields(dict(zip(columns, row, strict=True)))


def _claimable(record: DeliveryRecord, now: float) -> bool:
    if record.state is DeliveryState.RELEASED:
        return True
    return record.state is DeliveryState.CLAIMED and (record.lease_until or 0) <= now


@attrs.frozen
class SQLFlows:
    """The flows of a SQL store, over one dialect's :class:`~foxpoll.dedup._sql.Statements`.

    Every write is one statement, atomic on its own: drivers may run a flow in autocommit
    mode (PostgreSQL) or in one transaction (SQLite's ``BEGIN IMMEDIATE``).
    """

    sql: Statements

    def claim(self, order_id: str, token: str, lease: float) -> Flow[ClaimResult]:
        params = {"order_id": order_id, "token": token, "lease": lease}
        for _ in range(3):
            rows = yield from Query(self.sql.claim, params)
            if rows:
                lease_until, attempts, created_at, now = rows[0]
                now = float(now)
                return ClaimResult(True, claimed_record(order_id, token, lease_until, attempts,
                                                        created_at, now), now)
            # Who is in the way? Read separately (the claim itself is one statement), so the
            # row may have been released meanwhile: then it is worth claiming again.
            rows = yield from Query(self.sql.get, {"order_id": order_id})
            if rows:
                record, now = _record(rows[0], _GOT), float(rows[0][-1])
                if not _claimable(record, now):
                    return ClaimResult(False, record, now)
        raise DedupError(f"order {order_id}: claim kept conflicting with a changing record")

    def complete(
        self, order_id: str, token: str, payload_hash: str, receipt: str | None
    ) -> Flow[DeliveryRecord]:
        params = {"order_id": order_id, "token": token, "payload_hash": payload_hash,
                  "receipt": receipt}
        rows = yield from Query(self.sql.complete, params)
        if rows:  # attempts, created_at, delivered_at
            return delivered_record(order_id, token, payload_hash, receipt, *rows[0])
        current = yield from self.get(order_id)
        if current is not None and current.state is DeliveryState.DELIVERED and (
            current.token == token
        ):
            return current  # completing twice with the same token is a no-op
        raise lease_lost(order_id, current)

    def release(self, order_id: str, token: str) -> Flow[DeliveryRecord]:
        return (yield from self._owned(self.sql.release, order_id,
                                       {"order_id": order_id, "token": token}))

    def renew(self, order_id: str, token: str, lease: float) -> Flow[DeliveryRecord]:
        return (yield from self._owned(self.sql.renew, order_id,
                                       {"order_id": order_id, "token": token, "lease": lease}))

    def _owned(self, sql: str, order_id: str, params: Mapping[str, Any]) -> Flow[DeliveryRecord]:
        rows = yield from Query(sql, params)
        if rows:
            return _record(rows[0])
        current = yield from self.get(order_id)
        raise lease_lost(order_id, current)

    def get(self, order_id: str) -> Flow[DeliveryRecord | None]:
        rows = yield from Query(self.sql.get, {"order_id": order_id})
        return _record(rows[0], _GOT) if rows else None

    def list(self, state: DeliveryState, limit: int) -> Flow[list[DeliveryRecord]]:
        rows = yield from Query(self.sql.list, {"state": state.value, "limit": limit})
        return [_record(row) for row in rows]
