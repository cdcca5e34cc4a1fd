"""The dedup-store contract: records, states, and the primitives a backend implements.

The invariant: a record moves ``(absent) → CLAIMED → DELIVERED``, or back from
``CLAIMED`` to ``RELEASED`` (claimable again). Every write after ``claim`` names the
claim's token and is refused (:class:`LeaseLost`) when another claim owns the record:
the token fences a worker whose lease ran out. A live claim is never taken over; an
expired one may be, by the store's own clock.

A backend subclasses :class:`DedupStore` (or :class:`AsyncDedupStore`) and implements six
primitives, each one atomic statement, script or conditional write on its server; the
public methods of the same names check arguments and call them:

==============  ===========================================================================
``_claim``      insert CLAIMED, or take over a RELEASED or expired record; else report it
``_complete``   CLAIMED with this token → DELIVERED (idempotent for the same token)
``_release``    CLAIMED with this token → RELEASED
``_renew``      CLAIMED with this token: push ``lease_until`` out
``_get``        the record, or None
``_list``       records in one state, oldest change first
==============  ===========================================================================

Orchestration (claim, deliver, complete or release) lives in :mod:`foxpoll.delivery`,
once, for every backend.
"""

from __future__ import annotations

import abc
import builtins
import enum
from typing import Any

import attrs

from foxpoll.errors import DedupError, LeaseLost, StoreUnavailable

__all__ = [
    "AsyncDedupStore",
    "ClaimResult",
    "DedupStore",
    "DeliveryRecord",
    "DeliveryState",
    "LeaseLost",
    "StoreUnavailable",
    "check_claim_args",
    "check_list_args",
    "check_retention",
    "corrupt_record",
    "lease_lost",
    "record_from_fields",
]

MAX_ORDER_ID_LENGTH = 256


class DeliveryState(str, enum.Enum):
    """Where an order's delivery stands."""

    #: A worker holds a lease and is delivering (or died doing so: see ``lease_until``).
    CLAIMED = "claimed"
    #: The codes were delivered. Terminal.
    DELIVERED = "delivered"
    #: A delivery attempt failed and gave the claim back; claimable again.
    RELEASED = "released"


@attrs.frozen
class DeliveryRecord:
    """What a store knows about one order's delivery.

    Attributes:
        order_id: The FoxReload order id.
        state: See :class:`DeliveryState`.
        token: The fencing token of the current (or last) claim.
        lease_until: When the current claim expires, in store-clock seconds since the epoch.
        attempts: Claims taken so far (a crashed worker's claim counts too).
        payload_hash: SHA-256 of the delivered codes, set when DELIVERED.
        receipt: What the delivery returned (a message id, say), set when DELIVERED.
        created_at: First claim, store clock.
        updated_at: Last change, store clock.
        delivered_at: When it became DELIVERED, store clock.
    """

    order_id: str
    state: DeliveryState
    token: str | None = attrs.field(default=None, repr=False)
    lease_until: float | None = None
    attempts: int = 0
    payload_hash: str | None = attrs.field(default=None, repr=False)
    receipt: str | None = None
    created_at: float | None = None
    updated_at: float | None = None
    delivered_at: float | None = None


@attrs.frozen
class ClaimResult:
    """What ``claim`` found.

    Attributes:
        acquired: This token now owns the record (state CLAIMED).
        record: The record after the attempt: ours when acquired, else the one in the way
            (DELIVERED, or another worker's live claim).
        now: The store's clock when it decided.
    """

    acquired: bool
    record: DeliveryRecord
    now: float


def check_claim_args(order_id: object, token: object, lease: object) -> None:
    """Reject arguments no backend should ever see (so none has to re-check them)."""
    if not isinstance(order_id, str) or not order_id.strip():
        raise ValueError("order id must be a non-empty string")
    if len(order_id) > MAX_ORDER_ID_LENGTH or not order_id.isprintable():
        raise ValueError("order id is too long or has control characters")
    if not isinstance(token, str) or not token:
        raise ValueError("token must be a non-empty string")
    if not isinstance(lease, (int, float)) or isinstance(lease, bool) or not 0 <= lease < 1e7:
        raise ValueError("lease must be a number of seconds, 0 or more")


def check_retention(retention: object) -> int:
    """``retention``, if it is a whole number of seconds, zero (forever) or more."""
    if isinstance(retention, bool) or not isinstance(retention, int) or retention < 0:
        raise ValueError("retention must be a whole number of seconds, zero (forever) or more")
    return retention


def claimed_record(order_id: str, token: str, lease_until: Any, attempts: Any,
                   created_at: Any, now: float) -> DeliveryRecord:
    """The record a won claim made, from the few fields the store sent back (as numbers,
    text or bytes): the rest the claimer knows."""
    fields = {"lease_until": lease_until, "attempts": attempts, "created_at": created_at}
    return DeliveryRecord(order_id, DeliveryState.CLAIMED, token,
                          _field(fields, "lease_until", float, order_id),
                          _field(fields, "attempts", int, order_id), None, None,
                          _field(fields, "created_at", float, order_id), now)


def delivered_record(order_id: str, token: str, payload_hash: str, receipt: str | None,
                     attempts: Any, created_at: Any, delivered_at: Any) -> DeliveryRecord:
    """The record a completion made, from ``attempts``, ``created_at`` and
    ``delivered_at`` as the store sent them back."""
    fields = {"attempts": attempts, "created_at": created_at, "delivered_at": delivered_at}
    done = _field(fields, "delivered_at", float, order_id)
    return DeliveryRecord(order_id, DeliveryState.DELIVERED, token, None,
                          _field(fields, "attempts", int, order_id), payload_hash, receipt,
                          _field(fields, "created_at", float, order_id), done, done)


def corrupt_record(order_id: object, what: str, *, key: str | None = None) -> DedupError:
    """The :class:`DedupError` for a record that cannot be read: it names the order (and
    the store's key, where the store has one) and what is wrong, never a value, which may
    be anything (a receipt, codes written by mistake)."""
    where = f" (key {key!r})" if key is not None else ""
    return DedupError(f"corrupt delivery record for order {order_id!r}{where}: {what}")


def _field(fields: dict[str, Any], name: str, read: Any, order_id: object,
           key: str | None = None) -> Any:
    """``read(fields[name])``, or :func:`corrupt_record` naming the field."""
    try:
        return read(fields[name])
    except KeyError:
        raise corrupt_record(order_id, f"no {name}", key=key) from None
    except (ValueError, TypeError):
        raise corrupt_record(order_id, f"its {name} cannot be read", key=key) from None


def record_from_fields(fields: dict[str, Any], *, order_id: str | None = None,
                       key: str | None = None) -> DeliveryRecord:
    """Build a record from a backend's row, or raise :class:`DedupError` if it is corrupt.

    Args:
        order_id: The order the row was read for, named in the error when the row's own
            ``order_id`` cannot be read.
        key: Where the row is kept (a Redis key), named in the error too.
    """
    named: object = order_id
    if named is None:
        try:
            named = _text(fields.get("order_id"))
        except (ValueError, TypeError):
            named = "?"

    def read(name: str, how: Any) -> Any:
        return _field(fields, name, how, named, key)

    def optional(name: str, how: Any) -> Any:
        return read(name, how) if name in fields else None

    return DeliveryRecord(
        order_id=read("order_id", _text),
        state=read("state", lambda value: DeliveryState(_text(value))),
        token=optional("token", _optional_text),
        lease_until=optional("lease_until", _optional_float),
        attempts=int(optional("attempts", lambda value: int(value or 0)) or 0),
        payload_hash=optional("payload_hash", _optional_text),
        receipt=optional("receipt", _optional_text),
        created_at=optional("created_at", _optional_float),
        updated_at=optional("updated_at", _optional_float),
        delivered_at=optional("delivered_at", _optional_float),
    )


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode()
    if not isinstance(value, str):
        raise TypeError(f"expected text, got {type(value).__name__}")
    return value


def _optional_text(value: Any) -> str | None:
    return None if value is None or value == b"" or value == "" else _text(value)


def _optional_float(value: Any) -> float | None:
    if value is None or value == b"" or value == "":
        return None
    if hasattr(value, "timestamp"):  # a datetime from SQL
        return float(value.timestamp())
    return float(value)


class DedupStore(abc.ABC):
    """A blocking dedup store.

    The public methods check their arguments and call the primitives, which a backend
    implements: ``_claim``, ``_complete``, ``_release``, ``_renew``, ``_get`` and ``_list``,
    each atomically on its server. Raise :class:`StoreUnavailable` when the backend cannot
    be reached (foxpoll then delivers nothing), :class:`LeaseLost` when a token no longer
    owns its record.
    """

    def claim(self, order_id: str, token: str, lease: float) -> ClaimResult:
        """Take the record for ``token`` for ``lease`` seconds, if it is free."""
        check_claim_args(order_id, token, lease)
        return self._claim(order_id, token, float(lease))

    def complete(
        self, order_id: str, token: str, payload_hash: str, receipt: str | None
    ) -> DeliveryRecord:
        """Mark DELIVERED. Repeating it with the same token returns the same record."""
        check_claim_args(order_id, token, 0)
        return self._complete(order_id, token, payload_hash, receipt)

    def release(self, order_id: str, token: str) -> DeliveryRecord:
        """Give the claim back after a failed delivery."""
        check_claim_args(order_id, token, 0)
        return self._release(order_id, token)

    def renew(self, order_id: str, token: str, lease: float) -> DeliveryRecord:
        """Extend a live claim to ``lease`` seconds from now."""
        check_claim_args(order_id, token, lease)
        return self._renew(order_id, token, float(lease))

    def get(self, order_id: str) -> DeliveryRecord | None:
        """The record, or None."""
        check_claim_args(order_id, "-", 0)
        return self._get(order_id)

    def list(self, state: DeliveryState, *, limit: int = 100) -> builtins.list[DeliveryRecord]:
        """Up to ``limit`` records in ``state``, least recently changed first."""
        check_list_args(state, limit)
        return self._list(state, limit)

    @abc.abstractmethod
    def _claim(self, order_id: str, token: str, lease: float) -> ClaimResult:
        """Insert CLAIMED, or take over a RELEASED or expired record; else report it."""

    @abc.abstractmethod
    def _complete(
        self, order_id: str, token: str, payload_hash: str, receipt: str | None
    ) -> DeliveryRecord:
        """CLAIMED with this token → DELIVERED; the same record again if already done so."""

    @abc.abstractmethod
    def _release(self, order_id: str, token: str) -> DeliveryRecord:
        """CLAIMED with this token → RELEASED."""

    @abc.abstractmethod
    def _renew(self, order_id: str, token: str, lease: float) -> DeliveryRecord:
        """CLAIMED with this token: ``lease_until`` = now + ``lease``."""

    @abc.abstractmethod
    def _get(self, order_id: str) -> DeliveryRecord | None:
        """The record, or None."""

    @abc.abstractmethod
    def _list(self, state: DeliveryState, limit: int) -> builtins.list[DeliveryRecord]:
        """Records in ``state``, least recently changed first."""

    def close(self) -> None:  # noqa: B027 - optional, most stores hold nothing to close
        """Release connections the store created."""

    def __enter__(self) -> DedupStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncDedupStore(abc.ABC):
    """The asyncio flavour of :class:`DedupStore`: the same methods and primitives,
    awaitable."""

    async def claim(self, order_id: str, token: str, lease: float) -> ClaimResult:
        """See :meth:`DedupStore.claim`."""
        check_claim_args(order_id, token, lease)
        return await self._claim(order_id, token, float(lease))

    async def complete(
        self, order_id: str, token: str, payload_hash: str, receipt: str | None
    ) -> DeliveryRecord:
        """See :meth:`DedupStore.complete`."""
        check_claim_args(order_id, token, 0)
        return await self._complete(order_id, token, payload_hash, receipt)

    async def release(self, order_id: str, token: str) -> DeliveryRecord:
        """See :meth:`DedupStore.release`."""
        check_claim_args(order_id, token, 0)
        return await self._release(order_id, token)

    async def renew(self, order_id: str, token: str, lease: float) -> DeliveryRecord:
        """See :meth:`DedupStore.renew`."""
        check_claim_args(order_id, token, lease)
        return await self._renew(order_id, token, float(lease))

    async def get(self, order_id: str) -> DeliveryRecord | None:
        """See :meth:`DedupStore.get`."""
        check_claim_args(order_id, "-", 0)
        return await self._get(order_id)

    async def list(
        self, state: DeliveryState, *, limit: int = 100
    ) -> builtins.list[DeliveryRecord]:
        """See :meth:`DedupStore.list`."""
        check_list_args(state, limit)
        return await self._list(state, limit)

    @abc.abstractmethod
    async def _claim(self, order_id: str, token: str, lease: float) -> ClaimResult: ...

    @abc.abstractmethod
    async def _complete(
        self, order_id: str, token: str, payload_hash: str, receipt: str | None
    ) -> DeliveryRecord: ...

    @abc.abstractmethod
    async def _release(self, order_id: str, token: str) -> DeliveryRecord: ...

    @abc.abstractmethod
    async def _renew(self, order_id: str, token: str, lease: float) -> DeliveryRecord: ...

    @abc.abstractmethod
    async def _get(self, order_id: str) -> DeliveryRecord | None: ...

    @abc.abstractmethod
    async def _list(self, state: DeliveryState, limit: int) -> builtins.list[DeliveryRecord]: ...

    async def aclose(self) -> None:  # noqa: B027 - optional
        """Release connections the store created."""

    async def __aenter__(self) -> AsyncDedupStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def check_list_args(state: object, limit: object) -> None:
    if not isinstance(state, DeliveryState):
        raise TypeError("state must be a DeliveryState")
    if not isinstance(limit, int) or not 1 <= limit <= 10_000:
        raise ValueError("limit must be between 1 and 10,000")


def lease_lost(order_id: str, record: DeliveryRecord | None) -> LeaseLost:
    """The error for a write whose token no longer owns ``record``."""
    if record is None:
        return LeaseLost(f"order {order_id}: no claim to act on")
    return LeaseLost(f"order {order_id}: the claim now belongs to another worker "
                     f"(state {record.state.value})")


def unavailable(store: str, exc: BaseException) -> StoreUnavailable:
    """The error for a backend that could not be reached (never quoting credentials)."""
    return StoreUnavailable(f"{store} is unavailable: {type(exc).__name__}")
