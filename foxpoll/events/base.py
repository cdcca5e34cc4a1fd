"""``OrderEvent`` and the publisher contract.

One event per terminal order: ``{eventId, orderId, status, codes, occurredAt}``. The event
id is derived from the order id and status, so publishing the same outcome twice (a
worker that died after publishing, before recording it) produces the same id, and a
consumer that remembers ids drops the repeat.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any, Protocol, runtime_checkable

import attrs

from foxpoll.errors import EventError
from foxpoll.models import Code, Order, OrderStatus

__all__ = ["AsyncPublisher", "EventError", "OrderEvent", "Publisher", "event_id_for"]

#: The largest event :meth:`OrderEvent.from_json` reads, in bytes (or characters): an
#: order's codes fit many times over; more is not an event.
MAX_EVENT_SIZE = 1 << 20

#: How deep :meth:`OrderEvent.from_json` lets arrays and objects nest (an event nests 4
#: deep: the event, its codes, a code object, a value in it), so that nothing that walks
#: an event's codes later (``to_json``, a handler) can run out of stack.
MAX_EVENT_DEPTH = 32

_NAMESPACE = uuid.UUID("6f1c8a52-3a8e-4c4e-9b71-2f0d4e6c5a10")


def event_id_for(order_id: str, status: str) -> str:
    """The stable id of the event for ``order_id`` reaching ``status``."""
    return str(uuid.uuid5(_NAMESPACE, f"{order_id}/{status}"))


def _microseconds(value: float) -> float:
    return round(float(value), 6)  # what the JSON form (ISO 8601) keeps


def _redacted(value: object) -> str:
    return f"<{len(value)} redacted>" if isinstance(value, tuple) else "<redacted>"


@attrs.frozen
class OrderEvent:
    """An order reached a terminal status.

    Attributes:
        event_id: Stable for the order and status: use it to drop repeats.
        order_id: The order.
        status: ``completed``, ``failed`` or ``cancelled``.
        codes: The delivered codes (empty unless completed). Redacted in repr.
        occurred_at: When foxpoll saw it, seconds since the epoch.
    """

    event_id: str
    order_id: str
    status: str
    codes: tuple[Code, ...] = attrs.field(default=(), repr=_redacted)
    occurred_at: float = attrs.field(factory=time.time, converter=_microseconds)

    @classmethod
    def from_order(cls, order: Order, *, now: float | None = None) -> OrderEvent:
        """The event for a terminal ``order``."""
        if not order.status.is_terminal:
            raise ValueError(f"order {order.id} is {order.status.value}: not terminal")
        codes = order.codes if order.status is OrderStatus.COMPLETED else ()
        return cls(event_id_for(order.id, order.status.value), order.id, order.status.value,
                   tuple(codes), time.time() if now is None else now)

    def to_json(self) -> str:
        return json.dumps({
            "eventId": self.event_id,
            "orderId": self.order_id,
            "status": self.status,
            "codes": list(self.codes),
            "occurredAt": datetime.fromtimestamp(self.occurred_at, tz=timezone.utc)
            .isoformat().replace("+00:00", "Z"),
        }, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> OrderEvent:
        """Read an event back.

        Raises:
            EventError: ``text`` is not an event: not JSON (or not UTF-8), larger than
                :data:`MAX_EVENT_SIZE`, nested deeper than :data:`MAX_EVENT_DEPTH`, or
                missing a field or holding one of the wrong type. The message names what
                was wrong, never the content (it may hold codes).
        """
        if len(text) > MAX_EVENT_SIZE:
            raise EventError(f"not an OrderEvent: larger than {MAX_EVENT_SIZE} bytes")
        try:
            data: Mapping[str, Any] = json.loads(text)
        except RecursionError:  # the C decoder's own bound, far beyond ours
            raise EventError(f"not an OrderEvent: nested deeper than {MAX_EVENT_DEPTH}"
                             ) from None
        except Exception as exc:  # any malformed input, whatever the decoder raises
            raise EventError(f"not an OrderEvent: {type(exc).__name__}") from None
        if _depth(data) > MAX_EVENT_DEPTH:
            raise EventError(f"not an OrderEvent: nested deeper than {MAX_EVENT_DEPTH}")
        try:
            if not isinstance(data, dict):
                raise TypeError("an event is a JSON object")
            occurred = datetime.fromisoformat(str(data["occurredAt"]).replace("Z", "+00:00"))
            codes = data.get("codes") or []
            if not isinstance(codes, list) or not all(isinstance(c, (str, dict)) for c in codes):
                raise TypeError("codes must be a list of strings or objects")
            fields = (data["eventId"], data["orderId"], data["status"])
            if not all(isinstance(f, str) and f for f in fields):
                raise TypeError("eventId, orderId and status must be non-empty strings")
            return cls(*fields, tuple(codes), occurred.timestamp())
        except Exception as exc:  # a wrong type or value anywhere: not an event
            raise EventError(f"not an OrderEvent: {type(exc).__name__}") from None


def _depth(value: object) -> int:
    """How deep lists and dicts nest in ``value`` (a scalar is 0), without recursing."""
    deepest = 0
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, level + 1)
            if deepest > MAX_EVENT_DEPTH:
                return deepest  # enough to refuse it: the rest need not be walked
            stack.extend((child, level + 1) for child in item)
    return deepest


@runtime_checkable
class Publisher(Protocol):
    """Publishes events, blocking; returns the broker's message id. A broker that cannot
    be reached raises :class:`~foxpoll.errors.StoreUnavailable`."""

    def publish(self, event: OrderEvent) -> str: ...


@runtime_checkable
class AsyncPublisher(Protocol):
    """Publishes events on asyncio."""

    async def publish(self, event: OrderEvent) -> str: ...
