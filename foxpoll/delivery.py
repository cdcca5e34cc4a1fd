"""Exactly-once delivery: ``deliver_once`` and ``adeliver_once``.

Claim the order in a dedup store, call your ``deliver(order)``, then mark it delivered;
if ``deliver`` raises, give the claim back and re-raise. The flow is written once, as a
generator of :class:`Invoke` effects, and driven by a blocking or an asyncio driver.

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
import contextvars
import functools
import hashlib
import inspect
import itertools
import json
import logging
import math
import os
import threading
import time
import types
from collections.abc import Awaitable, Callable, Generator
from json.encoder import encode_basestring_ascii
from typing import Any, NamedTuple, TypeGuard, TypeVar

import attrs

from ._clock import Clock, SystemClock
from ._deadlines import WATCHDOG
from ._effects import arun_flow, run_flow
from .dedup.base import AsyncDedupStore, DedupStore, DeliveryRecord, DeliveryState
from .errors import CodesMissing, DeliveryInProgress, LeaseLost, StoreUnavailable
from .models import Order, OrderStatus

__all__ = ["DeliveryResult", "Lease", "adeliver_once", "current_lease", "deliver_once"]

log = logging.getLogger("foxpoll.delivery")

T = TypeVar("T")


class Invoke(NamedTuple):
    """Call ``fn(*args)`` (awaiting the result on asyncio); resume with its result, or have
    its exception thrown in. With ``keep_alive``, renew that lease while the call runs.

    A named tuple, not an attrs class: three are built per delivery, and a tuple is built
    in a third of the time."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    keep_alive: Lease | None = None


@attrs.frozen
class Pause:
    """Wait ``seconds`` on the flow's clock; resume with None."""

    seconds: float


Flow = Generator[Invoke | Pause, Any, T]

#: Backoff of the retries of a failed ``complete()``: 0.1 s, doubling, at most 2 s.
COMPLETE_RETRY_FIRST, COMPLETE_RETRY_CAP = 0.1, 2.0


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


# One encoder, built once: json.dumps builds a new one per call when given options.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=str)


def payload_hash(order: Order) -> str:
    """SHA-256 of the order's codes, canonically encoded (never the codes themselves)."""
    return _codes_hash(order.codes)


def _codes_hash(codes: tuple[Any, ...]) -> str:
    try:  # text codes, the usual case, encoded as _CANONICAL would
        text = "[" + ",".join(map(encode_basestring_ascii, codes)) + "]"
    except TypeError:  # not a str: the encoder's own rules (key order, default=str)
        text = _CANONICAL.encode(list(codes))
    return hashlib.sha256(text.encode()).hexdigest()


class _Tokens:
    """Fencing tokens, unique across processes and calls: a random prefix drawn once per
    process (again in a forked child, whose parent goes on counting) and a counter. A
    token only has to differ from every other claim's; drawing 16 random bytes per
    delivery costs a system call, where a counter's next value costs a tenth of it."""

    def __init__(self) -> None:
        self._draw()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._draw)

    def _draw(self) -> None:
        self._prefix = os.urandom(12).hex()
        self._count = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}{next(self._count):08x}"


_TOKENS = _Tokens()


def _awaitable(value: object) -> TypeGuard[Awaitable[Any]]:
    """``inspect.isawaitable``, without its slow ``Awaitable`` ABC check for the plain
    values (records, receipts) most calls return: only generator-based coroutines are
    awaitable without an ``__await__``."""
    return hasattr(type(value), "__await__") or (
        type(value) is types.GeneratorType and inspect.isawaitable(value))


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
    codes = order.codes
    if not codes:
        if require_codes:
            raise CodesMissing(order)  # nothing claimed: a later attempt may have codes
        log.warning("order %s is completed with no codes: delivering it empty", order.id)
    if not order.id or not order.id.strip():
        raise ValueError("order id is empty")
    if not lease > 0:
        raise ValueError("lease must be positive")
    token = _TOKENS.next()
    asked = clock.monotonic()
    claim = yield Invoke(store.claim, (order.id, token, lease))
    if not claim.acquired:
        if claim.record.state is DeliveryState.DELIVERED:
            log.info("order %s already delivered; skipping", order.id)
            return DeliveryResult(delivered=False, record=claim.record)
        raise DeliveryInProgress(order.id, lease_until=claim.record.lease_until or claim.now)
    held = Lease(order.id, token, lease, claim.record.lease_until, store, clock,
                 expires=asked + lease)
    reset = _current.set(held)
    try:
        receipt = yield Invoke(deliver, (order,), keep_alive=held if renew else None)
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
    record = yield from _record_delivery(held, _codes_hash(codes), _receipt_text(receipt),
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
            record: DeliveryRecord = yield Invoke(
                store.complete, (held.order_id, held.token, payload, receipt))
            return record
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
        yield Pause(delay)
        delay = min(delay * 2, COMPLETE_RETRY_CAP)


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

    Args:
        order: A completed order.
        deliver: Sends the codes to your customer; its return value is kept as the
            receipt. Raise to signal failure: the claim is released and the error re-raised.
        store: The dedup store shared by every worker.
        lease: Seconds the claim lasts; another worker may take over after that.
        renew: Renew the claim every third of ``lease`` while ``deliver`` runs, so a slow
            delivery keeps it (``current_lease().renew()`` also works, by hand).
        clock: Time and sleep for the retries of ``complete()``; a
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
    perform = _CALL if clock is None else functools.partial(_call, clock)
    flow = delivery_flow(order, deliver, store, lease, require_codes,
                         clock=clock or _SYSTEM_CLOCK, renew=renew)
    return run_flow(flow, perform, throw_errors=True)


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
    clock = clock or _SYSTEM_CLOCK
    flow = delivery_flow(order, deliver, store, lease, require_codes, clock=clock, renew=renew)
    # Exceptions go back into the flow: it releases the claim, then re-raises.
    return await arun_flow(flow, functools.partial(_acall, clock), throw_errors=True)


def _call(clock: Clock, effect: Invoke | Pause) -> Any:
    if isinstance(effect, Pause):
        return clock.sleep(effect.seconds)
    fn, args, keep_alive = effect
    if keep_alive is None:
        result = fn(*args)
    else:
        renewer = _Renewer(keep_alive)
        try:
            result = fn(*args)
        finally:
            renewer.stop()
    if _awaitable(result):
        if inspect.iscoroutine(result):
            result.close()
        raise TypeError(f"{fn!r} is async; use adeliver_once")
    return result


_SYSTEM_CLOCK = SystemClock()
_CALL = functools.partial(_call, _SYSTEM_CLOCK)  # deliver_once's, unless given a clock


async def _acall(clock: Clock, effect: Invoke | Pause) -> Any:
    if isinstance(effect, Pause):
        return await clock.asleep(effect.seconds)
    renewing = None
    if effect.keep_alive is not None:
        renewing = asyncio.ensure_future(_keep_renewing(effect.keep_alive))
    try:
        result = effect.fn(*effect.args)
        return (await result) if _awaitable(result) else result
    finally:
        if renewing is not None:
            renewing.cancel()


def _renewed(lease: Lease, outcome: BaseException | None) -> bool:
    """Log a renewal's failure; whether renewing should go on."""
    if isinstance(outcome, LeaseLost):
        log.error("order %s: the claim was taken over while deliver ran; it may be "
                  "delivered twice (use order.id as the idempotency key)", lease.order_id)
        return False
    if outcome is not None:
        log.warning("order %s: renewing the claim failed (%s); trying again",
                    lease.order_id, type(outcome).__name__)
    return True


class _Renewer:
    """Renews ``lease`` every third of it while a blocking ``deliver`` runs, from a thread
    that starts only when the delivery outlasts its first third (see :class:`_Renewals`)."""

    __slots__ = ("due", "lease", "stopped", "wake")

    def __init__(self, lease: Lease) -> None:
        self.lease = lease
        self.due = time.monotonic() + lease.seconds / 3
        self.stopped = False
        self.wake: threading.Event | None = None
        _RENEWALS.add(self)

    def start(self) -> None:
        self.wake = threading.Event()
        threading.Thread(target=self._run, args=(self.wake,), daemon=True,
                         name=f"foxpoll-renew-{self.lease.order_id[:24]}").start()

    def _run(self, wake: threading.Event) -> None:
        while not self.stopped:
            try:
                self.lease.renew()
                outcome = None
            except (LeaseLost, StoreUnavailable) as exc:
                outcome = exc
            if not _renewed(self.lease, outcome) or wake.wait(self.lease.seconds / 3):
                return

    def stop(self) -> None:
        self.stopped = True
        _RENEWALS.discard(self)
        if self.wake is not None:
            self.wake.set()


class _Renewals:
    """The blocking deliveries in flight, and one watchdog alarm, at the earliest first
    renewal among them, that starts the renewing threads of those then due.

    Most deliveries end long before their first renewal, and thousands run a second: each
    joins and leaves a set, where an alarm of its own would cost a heap entry and the
    watchdog's lock twice. Under steady traffic one alarm fires per third of a lease.
    """

    def __init__(self) -> None:
        self._forget()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        """Start empty; in a forked child too, whose parent's deliveries are not its own."""
        self._lock = threading.Lock()
        self._running: set[_Renewer] = set()
        self._alarm_at = math.inf  # when the live alarm fires, inf for none
        self._alarm = 0  # the live alarm's number: those it overtook do nothing

    def add(self, renewer: _Renewer) -> None:
        with self._lock:
            self._running.add(renewer)
            if renewer.due >= self._alarm_at:
                return
            self._alarm_at, self._alarm = renewer.due, self._alarm + 1
            number = self._alarm
        WATCHDOG.arm(renewer.due - time.monotonic(), functools.partial(self._check, number))

    def discard(self, renewer: _Renewer) -> None:
        with self._lock:
            self._running.discard(renewer)

    def _check(self, number: int) -> None:
        """Start the threads of the deliveries due; arm for the next one due."""
        now = time.monotonic()
        with self._lock:
            if number != self._alarm:  # an earlier alarm overtook this one, and re-arms
                return
            due = [renewer for renewer in self._running if renewer.due <= now]
            self._running.difference_update(due)
            self._alarm_at = min((r.due for r in self._running), default=math.inf)
            if self._running:  # the watchdog's lock, held here, lets its action arm
                self._alarm += 1
                WATCHDOG.arm(self._alarm_at - now, functools.partial(self._check, self._alarm))
        for renewer in due:
            renewer.start()


_RENEWALS = _Renewals()


async def _keep_renewing(lease: Lease) -> None:
    while True:
        await asyncio.sleep(lease.seconds / 3)
        try:
            result = lease.renew()
            if _awaitable(result):
                await result
            outcome = None
        except (LeaseLost, StoreUnavailable) as exc:
            outcome = exc
        if not _renewed(lease, outcome):
            return
