"""Exactly-once delivery: ``deliver_once`` and ``adeliver_once``.

Claim the order in a dedup store, call your ``deliver(order)``, then mark it delivered;
if ``deliver`` raises, give the claim back and re-raise. The flow is written once, in
:mod:`foxpoll._io`'s effects, and run by its blocking or its asyncio driver.

The guarantee: codes are delivered once, except when a worker dies (or stalls past its
lease) in the middle of ``deliver``. Its claim then expires, and the next attempt delivers
again: at-least-once in that window. Pass ``order.id`` downstream as an idempotency key so
the receiver can drop such a repeat.

Two things keep that window small. While ``deliver`` runs, the claim is renewed every
third of its lease (``renew=False`` turns that off), so a slow delivery keeps it. And a
store failure when recording the delivery is retried, with backoff, for as long as the
lease lasts: giving up at once would make a second delivery certain.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import hashlib
import inspect
import json
import logging
import math
import queue
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import attrs

from ._clock import Clock, SystemClock
from ._io import Call, Flow, Op, arun, call, call_blocking, pause, run
from .dedup.base import AsyncDedupStore, DedupStore, DeliveryRecord, DeliveryState
from .errors import CodesMissing, DeliveryInProgress, LeaseLost, StoreUnavailable
from .models import Order, OrderStatus

__all__ = ["DeliveryResult", "Lease", "adeliver_once", "current_lease", "deliver_once"]

log = logging.getLogger("foxpoll.delivery")

T = TypeVar("T")

#: Backoff of the retries of a failed ``complete()``: 0.1 s, doubling, at most 2 s.
COMPLETE_RETRY_FIRST, COMPLETE_RETRY_CAP = 0.1, 2.0

#: How often a blocking delivery's renewer looks at the clock (see :func:`_deliver`).
RENEWER_LOOKS_EVERY = 0.05
#: How long an idle renewer thread waits for another delivery before it ends.
RENEWER_IDLE_FOR = 60.0


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
        expires: When the claim expires at the latest, on the flow's monotonic clock.
    """

    order_id: str
    token: str = attrs.field(repr=False)
    seconds: float
    lease_until: float | None
    _store: DedupStore | AsyncDedupStore = attrs.field(repr=False)
    _clock: Clock = attrs.field(repr=False)
    expires: float = 0.0

    def renew(self, seconds: float | None = None) -> Any:
        """Push the claim ``seconds`` (the original lease by default) out from now.

        On an async store this returns an awaitable. Raises :class:`LeaseLost` when the
        claim was already taken over: stop delivering.
        """
        seconds = seconds or self.seconds
        asked = self._clock.monotonic() + seconds  # the store's lease starts after this
        result = self._store.renew(self.order_id, self.token, seconds)
        self.expires = max(self.expires, asked)
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
    """SHA-256 of the order's codes as canonical JSON (never the codes themselves).

    Stores keep it, so its value never changes between releases.
    """
    text = json.dumps(list(order.codes), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _receipt_text(receipt: object) -> str | None:
    if receipt is None:
        return None
    text = receipt if isinstance(receipt, str) else repr(receipt)
    return text[:1000]


@attrs.frozen
class Deliver(Op[Any]):
    """Call ``deliver(order)``, renewing ``lease`` meanwhile unless it is None; resume
    with what it returned.

    An exception that is not an :class:`Exception` (``KeyboardInterrupt``, a task's
    cancellation) comes back as :class:`Interrupted`, so the flow still gives the claim
    back before it re-raises that exception.
    """

    deliver: Callable[[Order], Any]
    order: Order
    lease: Lease | None


class Interrupted(Exception):
    """``deliver`` was interrupted by ``interruption``, which the flow re-raises."""

    def __init__(self, interruption: BaseException) -> None:
        super().__init__(type(interruption).__name__)
        self.interruption = interruption


def delivery_flow(
    order: Order,
    deliver: Callable[[Order], Any],
    store: DedupStore | AsyncDedupStore,
    lease: float,
    require_codes: bool = False,
    *,
    clock: Clock,
    renew: bool = True,
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
    asked = clock.monotonic()
    claim = yield from Call(store.claim, (order.id, token, lease))
    if not claim.acquired:
        if claim.record.state is DeliveryState.DELIVERED:
            log.info("order %s already delivered; skipping", order.id)
            return DeliveryResult(delivered=False, record=claim.record)
        raise DeliveryInProgress(order.id, lease_until=claim.record.lease_until or claim.now)
    held = Lease(order.id, token, lease, claim.record.lease_until, store, clock,
                 expires=asked + lease)
    reset = _current.set(held)
    try:
        receipt = yield from Deliver(deliver, order, held if renew else None)
    except Exception as exc:
        # Nothing was confirmed delivered: give the claim back so a retry can deliver now
        # (if this fails too, the lease simply expires). Never delete: the record stays.
        try:
            yield from Call(store.release, (order.id, token))
        except (LeaseLost, StoreUnavailable) as failed:
            log.warning("order %s: could not release the claim (%s); it will expire",
                        order.id, type(failed).__name__)
        if isinstance(exc, Interrupted):
            raise exc.interruption from None
        raise
    finally:
        _current.reset(reset)
    record = yield from _record_delivery(held, payload_hash(order), _receipt_text(receipt),
                                         store, clock)
    return DeliveryResult(delivered=True, record=record, receipt=receipt)


def _record_delivery(held: Lease, payload: str, receipt: str | None,
                     store: DedupStore | AsyncDedupStore, clock: Clock
                     ) -> Flow[DeliveryRecord]:
    """``complete()``, retried with backoff while the lease lasts: once the codes are out,
    every failure to record it risks a second delivery."""
    delay = COMPLETE_RETRY_FIRST
    while True:
        try:
            return (yield from Call(store.complete,
                                    (held.order_id, held.token, payload, receipt)))
        except LeaseLost:
            log.error("order %s: delivered, but the lease had expired and another worker "
                      "took over; it may deliver again (use order.id as the idempotency "
                      "key)", held.order_id)
            raise
        except StoreUnavailable as exc:
            if clock.monotonic() + delay >= held.expires:
                log.error("order %s: delivered, but the store did not record it before the "
                          "lease ran out; the order may be delivered again", held.order_id)
                raise
            log.warning("order %s: delivered, but recording it failed (%s); retrying in "
                        "%.1f s, within the lease", held.order_id, exc, delay)
        yield from pause(delay)
        delay = min(delay * 2, COMPLETE_RETRY_CAP)


def _renewals(lease: Lease, clock: Clock, wait_until: Callable[[float], Flow[bool]]
              ) -> Flow[None]:
    """Renew ``lease`` a third of it into the claim, then a third of it after each renewal
    (or failure to renew), until ``wait_until(time)`` says to stop or the claim is lost."""
    due = lease.expires - lease.seconds * 2 / 3
    while not (yield from wait_until(due)):
        # The next renewal is due a third of the lease after this one was asked for: read
        # now, before the store answers, so time that passes meanwhile is not counted twice.
        asked = clock.monotonic()
        try:
            yield from call(lease.renew)
        except LeaseLost:
            if not (yield from wait_until(-math.inf)):  # else deliver returned meanwhile
                log.error("order %s: the claim was taken over while deliver ran; it may be "
                          "delivered twice (use order.id as the idempotency key)",
                          lease.order_id)
            return
        except StoreUnavailable as exc:
            log.warning("order %s: renewing the claim failed (%s); trying again",
                        lease.order_id, type(exc).__name__)
        due = asked + lease.seconds / 3


@contextlib.contextmanager
def _interruptions() -> Iterator[None]:
    """Turn an exception that is not an :class:`Exception` into :class:`Interrupted`."""
    try:
        yield
    except Exception:
        raise
    except BaseException as exc:
        raise Interrupted(exc) from exc


def deliver_once(
    order: Order,
    deliver: Callable[[Order], T],
    store: DedupStore,
    *,
    lease: float = 60.0,
    require_codes: bool = False,
    renew: bool = True,
    clock: Clock | None = None,
) -> DeliveryResult:
    """Deliver a completed order's codes exactly once across workers.

    The dedup key is ``order.id``. An order read by foxpoll (``orders.get``, a wait, a
    recovery re-check) always carries the id that was asked for: an answer about another
    order raises :class:`~foxpoll.errors.OrderMismatch` and never gets here. An order
    built or received elsewhere is claimed under whatever id it carries.

    Args:
        order: A completed order.
        deliver: Sends the codes to your customer; its return value is kept as the
            receipt. Raise to signal failure: the claim is released and the error re-raised.
        store: The dedup store shared by every worker.
        lease: Seconds the claim lasts; another worker may take over after that.
        renew: Renew the claim every third of ``lease`` while ``deliver`` runs, so a slow
            delivery keeps it (``current_lease().renew()`` also works, by hand).
        clock: Time and sleep for the renewals and the retries of ``complete()``; a
            :class:`foxpoll.testing.FakeClock` in tests.
        require_codes: Refuse an order without codes (:class:`CodesMissing`, nothing
            claimed) instead of delivering it empty, with a warning, as top-ups are.

    Returns:
        :class:`DeliveryResult`; ``delivered`` is False when it was already delivered.

    Raises:
        DeliveryInProgress: another worker holds a live claim (retry after
            ``lease_until``).
        StoreUnavailable: the store could not be reached; nothing was delivered, unless it
            failed when recording a delivery that happened, and kept failing, retried,
            until the lease ran out.
        LeaseLost: the claim was taken over while ``deliver`` ran.
        ValueError: the order is not completed.
        CodesMissing: ``require_codes`` and the order has none.
    """
    clock = clock or SystemClock()
    flow = delivery_flow(order, deliver, store, lease, require_codes, clock=clock, renew=renew)
    return run(flow, functools.partial(_deliver, clock), clock=clock,
               async_twin="adeliver_once")


async def adeliver_once(
    order: Order,
    deliver: Callable[[Order], Any],
    store: AsyncDedupStore | DedupStore,
    *,
    lease: float = 60.0,
    require_codes: bool = False,
    renew: bool = True,
    clock: Clock | None = None,
) -> DeliveryResult:
    """See :func:`deliver_once`; ``deliver`` may be a coroutine function."""
    clock = clock or SystemClock()
    flow = delivery_flow(order, deliver, store, lease, require_codes, clock=clock, renew=renew)
    return await arun(flow, functools.partial(_adeliver, clock), clock=clock)


def _deliver(clock: Clock, op: Op[Any]) -> Any:
    """Perform :class:`Deliver` blocking: ``deliver`` runs in this thread while a
    :class:`_Renewer` renews the claim.

    The renewer waits on ``clock``, so renewals follow an injected clock, but it never
    sleeps on it: on a :class:`~foxpoll.testing.FakeClock` sleeping moves time, and a
    renewer that did would move it under a delivery that took no time at all. The
    :class:`Clock` has no wait that another thread can cut short, so the renewer waits on
    an event that ``deliver`` returning sets, and reads the clock again every
    :data:`RENEWER_LOOKS_EVERY` seconds (on the real clock, its renewals are that late at
    most).
    """
    if not isinstance(op, Deliver):
        raise TypeError(f"no driver performs {type(op).__name__}")
    stop = threading.Event()
    if op.lease is not None:
        _Renewer.take().renewals.put(
            _renewals(op.lease, clock, lambda until: call(_wait_until, clock, stop, until)))
    try:
        with _interruptions():
            return call_blocking(op.deliver, (op.order,), "use adeliver_once")
    finally:
        stop.set()


class _Renewer(threading.Thread):
    """A daemon thread that runs the renewals of one blocking delivery at a time.

    Between deliveries it waits in :data:`_IDLE` for the next one's, for
    :data:`RENEWER_IDLE_FOR` seconds at most, then ends: a process keeps as many renewers
    as it ran blocking deliveries at once, lately. A forked child finds its parent's
    renewers there, not running, and starts its own. (Renewers are reused because a
    thread started for every delivery put ``deliver_once`` over its cost budget: see
    ``benchmarks/RESULTS.md``.)
    """

    def __init__(self) -> None:
        super().__init__(daemon=True, name="foxpoll-renew")
        self.renewals: queue.SimpleQueue[Flow[None]] = queue.SimpleQueue()

    @classmethod
    def take(cls) -> _Renewer:
        """An idle renewer, or a new one."""
        while _IDLE:
            try:
                renewer = _IDLE.pop()
            except IndexError:  # another thread took the last one
                break
            if renewer.is_alive():
                return renewer
        renewer = cls()
        renewer.start()
        return renewer

    def run(self) -> None:
        while True:
            try:
                renewals = self.renewals.get(timeout=RENEWER_IDLE_FOR)
            except queue.Empty:
                try:
                    _IDLE.remove(self)
                except ValueError:  # taken meanwhile: its delivery's renewals are on the way
                    continue
                return
            try:
                run(renewals)
            except Exception as exc:
                log.error("renewing a claim stopped: %s", type(exc).__name__)
            _IDLE.append(self)


_IDLE: list[_Renewer] = []


def _wait_until(clock: Clock, stop: threading.Event, until: float) -> bool:
    """Wait until ``clock`` reads ``until``; True as soon as ``stop`` is set."""
    while (left := until - clock.monotonic()) > 0:
        if stop.wait(min(left, RENEWER_LOOKS_EVERY)):
            return True
    return stop.is_set()


async def _adeliver(clock: Clock, op: Op[Any]) -> Any:
    """Perform :class:`Deliver` on asyncio: ``deliver`` is awaited while a task renews
    the claim, pausing on ``clock``; the task is cancelled when ``deliver`` returns."""
    if not isinstance(op, Deliver):
        raise TypeError(f"no driver performs {type(op).__name__}")
    renewing = None
    if op.lease is not None:
        renewals = _renewals(op.lease, clock, functools.partial(_pause_until, clock))
        renewing = asyncio.ensure_future(arun(renewals, clock=clock))
        renewing.add_done_callback(_renewing_ended)
    try:
        with _interruptions():
            result = op.deliver(op.order)
            return (await result) if inspect.isawaitable(result) else result
    finally:
        if renewing is not None:
            renewing.cancel()


def _renewing_ended(task: asyncio.Future[None]) -> None:
    """Log what stopped a renewing task, as the blocking renewer does, rather than leave
    it as an exception no one retrieves."""
    if not task.cancelled() and (error := task.exception()) is not None:
        log.error("renewing a claim stopped: %s", type(error).__name__)


def _pause_until(clock: Clock, until: float) -> Flow[bool]:
    if (left := until - clock.monotonic()) > 0:
        yield from pause(left)
    return False
