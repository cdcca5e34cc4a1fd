"""Exactly-once delivery: ``deliver_once`` and ``adeliver_once``.

Claim the order in a dedup store, call your ``deliver(order)``, then mark it delivered;
if ``deliver`` raises, give the claim back and re-raise. The flow is written once, as a
generator of :class:`Invoke` effects, and driven by a blocking or an asyncio driver.

The guarantee: codes are delivered once, except when a worker dies (or stalls past its
lease) in the middle of ``deliver``. Its claim then expires, and the next attempt delivers
again: at-least-once in that window. Pass ``order.id`` downstream as an idempotency key so
the receiver can drop such a repeat.
"""

from __future__ import annotations

import contextvars
import hashlib
import inspect
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Generator
from typing import Any, TypeVar

import attrs

from ._effects import arun_flow, run_flow
from .dedup.base import AsyncDedupStore, DedupStore, DeliveryRecord, DeliveryState
from .errors import CodesMissing, DeliveryInProgress, LeaseLost, StoreUnavailable
from .models import Order, OrderStatus

__all__ = ["DeliveryResult", "Lease", "adeliver_once", "current_lease", "deliver_once"]

log = logging.getLogger("foxpoll.delivery")

T = TypeVar("T")


@attrs.frozen
class Invoke:
    """Call ``fn(*args)`` (awaiting the result on asyncio); resume with its result, or have
    its exception thrown in."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]


Flow = Generator[Invoke, Any, T]


@attrs.frozen
class DeliveryResult:
    """How ``deliver_once`` ended.

    Attributes:
        delivered: True when this call delivered the codes; False when they had already
            been delivered (by another worker, or an earlier run).
        record: The dedup record afterwards.
        receipt: What ``deliver`` returned, when it ran.
    """

    delivered: bool
    record: DeliveryRecord
    receipt: Any = None


@attrs.define
class Lease:
    """The claim a running ``deliver`` holds; see :func:`current_lease`.

    Attributes:
        order_id: The order being delivered.
        lease_until: When the claim expires (store clock), as of the last renewal.
    """

    order_id: str
    token: str = attrs.field(repr=False)
    seconds: float
    lease_until: float | None
    _store: DedupStore | AsyncDedupStore = attrs.field(repr=False)

    def renew(self, seconds: float | None = None) -> Any:
        """Push the claim ``seconds`` (the original lease by default) out from now.

        On an async store this returns an awaitable. Raises :class:`LeaseLost` when the
        claim was already taken over: stop delivering.
        """
        result = self._store.renew(self.order_id, self.token, seconds or self.seconds)
        if inspect.isawaitable(result):
            return self._arenew(result)
        self.lease_until = result.lease_until
        return result

    async def _arenew(self, pending: Awaitable[DeliveryRecord]) -> DeliveryRecord:
        record = await pending
        self.lease_until = record.lease_until
        return record


_current: contextvars.ContextVar[Lease | None] = contextvars.ContextVar(
    "foxpoll_lease", default=None
)


def current_lease() -> Lease:
    """The lease of the delivery running in this thread or task, for ``renew()``.

    Raises:
        RuntimeError: called outside ``deliver``.
    """
    lease = _current.get()
    if lease is None:
        raise RuntimeError("current_lease() is only available inside deliver()")
    return lease


def payload_hash(order: Order) -> str:
    """SHA-256 of the order's codes, canonically encoded (never the codes themselves)."""
    encoded = json.dumps(list(order.codes), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(encoded.encode()).hexdigest()


def _receipt_text(receipt: object) -> str | None:
    if receipt is None:
        return None
    text = receipt if isinstance(receipt, str) else repr(receipt)
    return text[:1000]


def delivery_flow(
    order: Order,
    deliver: Callable[[Order], Any],
    store: DedupStore | AsyncDedupStore,
    lease: float,
    require_codes: bool = False,
) -> Flow[DeliveryResult]:
    """Claim, deliver, complete; release and re-raise when ``deliver`` fails."""
    if not isinstance(order, Order):
        raise TypeError(f"deliver_once takes an Order, not {type(order).__name__}")
    if order.status is not OrderStatus.COMPLETED:
        raise ValueError(f"order {order.id} is {order.status.value}, not completed: "
                         "there are no codes to deliver")
    if not order.codes:
        if require_codes:
            raise CodesMissing(order)  # nothing claimed: a later attempt may have codes
        log.warning("order %s is completed with no codes: delivering it empty", order.id)
    if not order.id or not order.id.strip():
        raise ValueError("order id is empty")
    if not lease > 0:
        raise ValueError("lease must be positive")
    token = uuid.uuid4().hex
    claim = yield Invoke(store.claim, (order.id, token, lease))
    if not claim.acquired:
        if claim.record.state is DeliveryState.DELIVERED:
            log.info("order %s already delivered; skipping", order.id)
            return DeliveryResult(delivered=False, record=claim.record)
        raise DeliveryInProgress(order.id, lease_until=claim.record.lease_until or claim.now)
    held = Lease(order.id, token, lease, claim.record.lease_until, store)
    reset = _current.set(held)
    try:
        receipt = yield Invoke(deliver, (order,))
    except BaseException:
        # Nothing was confirmed delivered: give the claim back so a retry can deliver now
        # (if this fails too, the lease simply expires). Never delete: the record stays.
        try:
            yield Invoke(store.release, (order.id, token))
        except (LeaseLost, StoreUnavailable) as exc:
            log.warning("order %s: could not release the claim (%s); it will expire",
                        order.id, type(exc).__name__)
        raise
    finally:
        _current.reset(reset)
    try:
        record = yield Invoke(store.complete,
                              (order.id, token, payload_hash(order), _receipt_text(receipt)))
    except LeaseLost:
        log.error("order %s: delivered, but the lease had expired and another worker took "
                  "over; it may deliver again (use order.id as the idempotency key)", order.id)
        raise
    except StoreUnavailable:
        log.error("order %s: delivered, but the store did not record it; the claim will "
                  "expire and the order may be delivered again", order.id)
        raise
    return DeliveryResult(delivered=True, record=record, receipt=receipt)


def deliver_once(
    order: Order,
    deliver: Callable[[Order], T],
    store: DedupStore,
    *,
    lease: float = 60.0,
    require_codes: bool = False,
) -> DeliveryResult:
    """Deliver a completed order's codes exactly once across workers.

    Args:
        order: A completed order.
        deliver: Sends the codes to your customer; its return value is kept as the
            receipt. Raise to signal failure: the claim is released and the error re-raised.
            Call ``current_lease().renew()`` inside it when it may outlast ``lease``.
        store: The dedup store shared by every worker.
        lease: Seconds the claim lasts; another worker may take over after that.
        require_codes: Refuse an order without codes (:class:`CodesMissing`, nothing
            claimed) instead of delivering it empty, with a warning, as top-ups are.

    Returns:
        :class:`DeliveryResult`; ``delivered`` is False when it was already delivered.

    Raises:
        DeliveryInProgress: another worker holds a live claim (retry after
            ``lease_until``).
        StoreUnavailable: the store could not be reached; nothing was delivered (unless it
            failed only when recording a delivery that happened).
        LeaseLost: the claim was taken over while ``deliver`` ran.
        ValueError: the order is not completed.
        CodesMissing: ``require_codes`` and the order has none.
    """
    return _run(delivery_flow(order, deliver, store, lease, require_codes))


async def adeliver_once(
    order: Order,
    deliver: Callable[[Order], Any],
    store: AsyncDedupStore | DedupStore,
    *,
    lease: float = 60.0,
    require_codes: bool = False,
) -> DeliveryResult:
    """See :func:`deliver_once`; ``deliver`` may be a coroutine function."""
    return await _arun(delivery_flow(order, deliver, store, lease, require_codes))


def _call(effect: Invoke) -> Any:
    result = effect.fn(*effect.args)
    if inspect.isawaitable(result):
        if inspect.iscoroutine(result):
            result.close()
        raise TypeError(f"{effect.fn!r} is async; use adeliver_once")
    return result


def _acall(effect: Invoke) -> Any:
    return effect.fn(*effect.args)  # arun_flow awaits what is awaitable


def _run(flow: Flow[T]) -> T:
    # Exceptions go back into the flow: it releases the claim, then re-raises.
    return run_flow(flow, _call, throw_errors=True)


async def _arun(flow: Flow[T]) -> T:
    return await arun_flow(flow, _acall, throw_errors=True)
