"""``buy()``: create, pay, wait and deliver, in one call, from the public parts only.

The sequence is one flow in :mod:`foxpoll._io`'s vocabulary. Each step is a :class:`Call`
of a client's own public method (``orders.create``, ``orders.pay``,
``wait_for_completion``), of ``deliver_once`` / ``adeliver_once``, and of the publisher:
the blocking client runs the flow with :func:`foxpoll._io.run`, the asyncio one with
:func:`foxpoll._io.arun`, which awaits what the async methods return. So ``buy()`` has no
path of its own into the client, and a partner who composes the parts by hand gets the
same behaviour.

Two rules make a process killed anywhere in ``buy()`` harmless:

- **An order whose create may have happened is never paid.** An ambiguous create
  (:class:`~foxpoll.errors.AmbiguousOrderError`) has no order id to pay, and foxpoll
  never looks one up to pay it. An unpaid order cannot leave ``active`` except by
  expiring (``cancelled``, ``payment_expiration``): it costs nothing and delivers
  nothing. So ``buy()`` may create again, once, on a fresh request; it counts the
  possible orphan (``on_possible_orphan`` of the client's listeners) and logs its
  request, with its notes' values redacted.
- **A paid order is watched before it is paid** (``orders.pay`` writes the watch first,
  when the client has a recovery queue), and delivery goes through the dedup store, so
  the recovery worker finishes any order the process leaves paid and undelivered.
"""

from __future__ import annotations

import enum
import functools
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from decimal import Decimal
from typing import Any, TypeVar

import attrs

from . import _api
from ._clock import Clock
from ._io import Call, Flow
from .dedup.base import AsyncDedupStore, DedupStore
from .delivery import DeliveryResult
from .errors import AmbiguousOrderError, OrderStalled
from .events.base import AsyncPublisher, OrderEvent, Publisher
from .models import Order, OrderItemRequest, OrderStatus
from .polling import Listener, WaitPolicy

__all__ = ["BuySteps", "Purchase", "PurchaseOutcome", "buy_flow", "order_lines"]

log = logging.getLogger("foxpoll.buy")

T = TypeVar("T")

#: Creates ``buy()`` sends at most: the first, and one more after an ambiguous one.
CREATES = 2


class PurchaseOutcome(str, enum.Enum):
    """How a ``buy()`` ended (:attr:`Purchase.outcome`)."""

    #: This call delivered the codes.
    DELIVERED = "delivered"
    #: The dedup store says someone delivered them already (a recovery worker, say).
    ALREADY_DELIVERED = "already_delivered"
    #: The order failed: nothing to deliver; :attr:`Purchase.reason` says why.
    FAILED = "failed"
    #: The order was cancelled: :attr:`Purchase.reason` is its ``cancel_reason``.
    CANCELLED = "cancelled"
    #: The wait ran out first. The order may still complete (or, after a payment whose
    #: outcome is unknown, still be unpaid, to expire): with a recovery queue it is
    #: queued there (:attr:`Purchase.recovering`).
    STALLED = "stalled"


def _bodies(bodies: tuple[Mapping[str, Any], ...]) -> str:
    return f"<{len(bodies)} request(s)>"  # they hold notes: player ids, phone numbers


@attrs.frozen
class Purchase:
    """What ``buy()`` did.

    Attributes:
        outcome: How it ended (:class:`PurchaseOutcome`).
        order_id: The order bought (paid, unless the payment's outcome was unknown
            and the order stalled before it told).
        order: The order as last seen: completed, failed or cancelled; for a stall, the
            last poll's (None when no poll read it).
        delivery: The :class:`~foxpoll.DeliveryResult`, when the order completed.
        reason: Why it did not complete: the items' errors of a failed order, a
            cancelled order's ``cancel_reason``, or the stall.
        recovering: The order stalled and the client's recovery queue holds it: a
            :class:`~foxpoll.recovery.RecoveryWorker` finishes it. False for a stall on
            a client without a queue: nothing re-checks it but you.
        possible_orphans: The request bodies of creates whose outcome was unknown (at
            most one here: a second raises). Each may have made an order; none was paid,
            so each expires unpaid. Shown as a count in repr: they hold notes.
    """

    outcome: PurchaseOutcome
    order_id: str
    order: Order | None = None
    delivery: DeliveryResult | None = None
    reason: str | None = None
    recovering: bool = False
    possible_orphans: tuple[Mapping[str, Any], ...] = attrs.field(default=(), repr=_bodies)

    @property
    def ok(self) -> bool:
        """True when the codes are delivered, by this call or before it."""
        return self.outcome in (PurchaseOutcome.DELIVERED, PurchaseOutcome.ALREADY_DELIVERED)


@attrs.frozen
class BuySteps:
    """The public calls ``buy()`` is made of, from one client: its blocking methods and
    :func:`~foxpoll.deliver_once`, or its async ones and
    :func:`~foxpoll.adeliver_once`; ``run`` runs a flow of calls the same way
    (:func:`foxpoll._io.run` or :func:`foxpoll._io.arun`)."""

    create: Callable[..., Order | Awaitable[Order]]
    pay: Callable[..., Order | Awaitable[Order]]
    wait: Callable[..., Order | Awaitable[Order]]
    deliver_once: Callable[..., DeliveryResult | Awaitable[DeliveryResult]]
    run: Callable[[Flow[Any]], Any]


def _call(fn: Callable[..., T | Awaitable[T]], /, *args: Any, **kwargs: Any) -> Flow[T]:
    """``fn(*args, **kwargs)`` as a :class:`Call`: awaited on asyncio when awaitable."""
    return (yield from Call(functools.partial(fn, *args, **kwargs)))


def order_lines(items: Iterable[OrderItemRequest | Mapping[str, Any]],
                note: Mapping[str, Any] | None) -> list[OrderItemRequest]:
    """``items`` as :class:`OrderItemRequest` objects, each without a note of its own
    given ``note``; checked as ``orders.create`` checks them.

    Raises:
        TypeError, ValueError: an item, or ``note``, is not one.
    """
    if isinstance(items, (str, bytes, Mapping)):
        raise TypeError("items must be a list of order items, such as "
                        "[{'itemId': 'product_...', 'quantity': 1}]")
    if note is not None and not isinstance(note, Mapping):
        raise TypeError("note must be a dict of the product's required note fields")
    lines = [_api.order_item_request(item) for item in items]
    if note is None:
        return lines
    return [line if line.note is not None else attrs.evolve(line, note=dict(note))
            for line in lines]


def redacted_body(body: Mapping[str, Any]) -> dict[str, Any]:
    """A create's request body for a log line: every note value replaced, keys kept.

    A note holds the partner's customer data (a player id, a phone number for an eSIM),
    which the logs of a library it embeds should not spread; the body itself reaches the
    caller whole (:attr:`Purchase.possible_orphans`, ``on_possible_orphan``).
    """
    shown = dict(body)
    items = body.get("items")
    if isinstance(items, list):
        shown["items"] = [
            {**item, "note": dict.fromkeys(item["note"], "<redacted>")}
            if isinstance(item, Mapping) and isinstance(item.get("note"), Mapping) else item
            for item in items]
    return shown


def buy_flow(
    steps: BuySteps,
    lines: list[OrderItemRequest],
    *,
    deliver: Callable[[Order], Any],
    store: DedupStore | AsyncDedupStore,
    publisher: Publisher | AsyncPublisher | None,
    is_mock: bool,
    total_price: Decimal | float | int | str | None,
    policy: WaitPolicy | None,
    timeout: float | None,
    listener: Listener | None,
    lease: float,
    require_codes: bool,
    recovering: bool,
    orphan_hooks: tuple[Callable[[AmbiguousOrderError], Any], ...],
    clock: Clock,
) -> Flow[Purchase]:
    """Create (again, once, after an ambiguous create), pay, wait, deliver; see
    ``FoxReload.buy`` for what each outcome means."""
    orphans: list[Mapping[str, Any]] = []
    order: Order | None = None
    for attempt in range(1, CREATES + 1):
        try:
            order = yield from _call(steps.create, items=lines, is_mock=is_mock,
                                     total_price=total_price)
            break
        except AmbiguousOrderError as ambiguous:
            orphans.append(ambiguous.request_body)
            again = attempt < CREATES
            log.warning(
                "buy: a create's outcome is unknown (%s): it may have made an order, which "
                "foxpoll never pays, so it expires unpaid (payment_expiration); %s. "
                "Its request: %s", type(ambiguous.cause).__name__,
                "creating again, once" if again else "giving up: nothing was paid",
                redacted_body(ambiguous.request_body))
            for hook in orphan_hooks:
                yield from _call(hook, ambiguous)
            if not again:
                raise
    assert order is not None
    try:
        order = yield from _call(steps.pay, order.id)
    except AmbiguousOrderError:
        # pay() has read the order and found it still active, or could not read it. It
        # is not paid again: the wait reads it until it moves (paid after all, or
        # cancelled when its payment expires) or stalls, and its watch stays meanwhile.
        log.warning("buy: order %s: the payment's outcome is unknown; waiting for the order "
                    "to tell", order.id)
    try:
        order = yield from _call(steps.wait, order.id, policy=policy, timeout=timeout,
                                 raise_on_failure=False, listener=listener)
    except OrderStalled as stalled:
        return Purchase(PurchaseOutcome.STALLED, stalled.order_id, stalled.order,
                        reason=str(stalled), recovering=recovering,
                        possible_orphans=tuple(orphans))
    if order.status is not OrderStatus.COMPLETED:
        if publisher is not None:
            yield from _call(publisher.publish, OrderEvent.from_order(order, now=clock.time()))
        failed = order.status is OrderStatus.FAILED
        reason = ("; ".join(dict.fromkeys(i.error for i in order.items if i.error)) or None
                  if failed else order.cancel_reason)
        outcome = PurchaseOutcome.FAILED if failed else PurchaseOutcome.CANCELLED
        return Purchase(outcome, order.id, order, reason=reason,
                        possible_orphans=tuple(orphans))

    def deliver_and_publish(completed: Order) -> Any:
        # The event goes out inside the claim, as the recovery worker's does: a crash
        # between the two leaves the claim to expire and both to be done again. A
        # publisher that fails after the codes went out does not release it.
        return steps.run(_delivery(completed, deliver, publisher, clock))

    result = yield from _call(steps.deliver_once, order, deliver_and_publish, store,
                              lease=lease, require_codes=require_codes, clock=clock)
    outcome = (PurchaseOutcome.DELIVERED if result.delivered
               else PurchaseOutcome.ALREADY_DELIVERED)
    return Purchase(outcome, order.id, order, delivery=result,
                    possible_orphans=tuple(orphans))


def _delivery(order: Order, deliver: Callable[[Order], Any],
              publisher: Publisher | AsyncPublisher | None, clock: Clock
              ) -> Flow[Any]:
    """``deliver(order)``, then the completion event; what ``deliver`` returned.

    Once ``deliver`` has returned, the codes are out: a publisher that fails then is logged
    and the delivery still recorded, since a released claim would deliver them again. The
    event is lost in that case (at most once, where the codes are exactly once)."""
    receipt = yield from _call(deliver, order)
    if publisher is not None:
        try:
            yield from _call(publisher.publish, OrderEvent.from_order(order, now=clock.time()))
        except Exception as exc:
            log.error("buy: order %s delivered, but its completion event was not published "
                      "(%s: %s)", order.id, type(exc).__name__, exc)
    return receipt
