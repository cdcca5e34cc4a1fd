"""Watches: the client's side of keeping a paid order from living only in its memory.

A :class:`Watcher` wraps a client's recovery queue. It records a watch before each
payment, and at the start of each wait on an order it is not already watching; while the
process lives it renews them all; it settles the watch, or enqueues the order, when the
wait ends. The queue side (what a watch is, how it fires) is :mod:`foxpoll.recovery.base`.

Renewal is the process's heartbeat: a watch is due one ``watch_lease`` after it was
written or renewed, and the watcher renews every live one in a single write each third of
a lease, so a crashed process's orders fire within a lease of its death. The wait flows
drive it (they wake when a renewal is due and call :meth:`Watcher.beat`, and so do the
sleeps inside their requests and payments: a retry's backoff, a 429's ``Retry-After``, a
wait for a permit of the budget), rather than a thread or task per client: the renewal
then runs on the client's own clock and driver, so a ``FakeClock`` test sees it on
virtual time, and the async client needs no task of its own to start and stop with the
loop. A process that pays without waiting renews at each payment.

The recovery queues do blocking I/O. On an async client every queue call runs in a
worker thread (:func:`asyncio.to_thread`, the loop's default executor), so a slow or
frozen queue holds that thread, until the queue's own timeout, and never the event loop.
The call is still awaited, so its error reaches the caller as it does on the sync client:
a watch that cannot be written before a payment means nothing is paid.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from . import _api
from ._clock import Clock
from ._effects import Flow, Notify
from .errors import APIStatusError, ConflictError
from .models import Order
from .polling import WaitPolicy, WaitResult, WaitStart, with_heartbeat

__all__ = ["WatchQueue", "WatchTerms", "Watcher"]

log = logging.getLogger("foxpoll.recovery")

#: Renewals per lease: one may fail (the queue is briefly down) and the next still comes
#: a period before the watch would fire.
RENEWALS_PER_LEASE = 3
#: A beat this close to its due time renews: a sleep of exactly ``due_in()`` may wake a
#: hair early on a float clock.
EARLY = 1e-3


class WatchTerms(Protocol):
    """What a client reads of its recovery queue's policy
    (:class:`~foxpoll.recovery.RecoveryPolicy` is one)."""

    @property
    def watch_margin(self) -> float: ...

    @property
    def watch_lease(self) -> float: ...


class WatchQueue(Protocol):
    """What a client needs of its ``recovery_queue``: every
    :class:`foxpoll.recovery.RecoveryQueue` is one."""

    @property
    def policy(self) -> WatchTerms: ...

    def watch(self, order_id: str, *, due_at: float, replace: bool = ...) -> bool: ...

    def renew(self, order_ids: Iterable[str], *, due_at: float) -> int: ...

    def unwatch(self, order_id: str) -> bool: ...

    def on_finish(self, result: WaitResult) -> None: ...


class Watcher:
    """Records, renews and settles a client's watches in its recovery queue: a listener
    of every wait of the client, and their :class:`~foxpoll.polling.Heartbeat`.

    Each order this process watches is *live* until its wait ends, or until the wait
    would have given up plus ``watch_margin``: a payment not yet waited on counts a wait
    on the client's policy. Past that, the watch is no longer renewed and fires within a
    lease, as it would had the process died.

    Args:
        policy: The client's wait policy: a payment's watch is renewed, while no wait is
            on it, for the horizon of a wait on it, counting a wait before the first poll
            (the schedule recommended after paying).
        in_thread: Run each queue call in a worker thread and return an awaitable of it:
            the async client's watches, which must not block the event loop.
    """

    def __init__(self, queue: WatchQueue, clock: Clock, policy: WaitPolicy, *,
                 in_thread: bool = False) -> None:
        self.queue, self.clock, self.in_thread = queue, clock, in_thread
        self.pay_horizon = policy.horizon(first_poll_waits=True)
        # order id -> until when (monotonic) it is renewed
        self._live: dict[str, float] = {}
        self._renewed = -math.inf  # when (monotonic) the last renewal began
        self._lock = threading.Lock()

    @property
    def period(self) -> float:
        """Seconds between two renewals: a third of the queue's ``watch_lease``."""
        return self.queue.policy.watch_lease / RENEWALS_PER_LEASE

    def _call(self, fn: Callable[[Any], None], arg: Any) -> Any:
        """``fn(arg)``, or, ``in_thread``, a coroutine running it in a worker thread."""
        if self.in_thread:
            return asyncio.to_thread(fn, arg)
        fn(arg)
        return None

    def pay(self, order_id: str, pay: Flow[Order]) -> Flow[Order]:
        """Record the watch, then pay: a payment is never known only to this process.

        If the watch cannot be written, nothing is paid and the store's error is raised.
        """
        _api.resource_path("/api/orders/", order_id, kind="order")
        yield from Notify(self._call, (self._watch_payment, order_id))
        yield from Notify(self.beat, ())  # a process that only pays renews as it pays
        try:
            return (yield from with_heartbeat(pay, self))  # a 429's wait is not a death
        except APIStatusError as refused:
            # The server said no: nothing was paid by this call. A 409 may mean another
            # caller paid it, whose watch this row may be, so it stays.
            if not isinstance(refused, ConflictError):
                yield from Notify(self._call, (self._unwatch, order_id))
            raise

    def _due(self) -> float:
        return self.clock.time() + self.queue.policy.watch_lease

    def _keep(self, order_id: str, horizon: float) -> None:
        """Renew ``order_id``'s watch until ``horizon`` seconds, plus the margin, from now."""
        now = self.clock.monotonic()
        until = now + horizon + self.queue.policy.watch_margin
        with self._lock:
            if not self._live:
                self._renewed = now  # the watch just written is as fresh as a renewal
            self._live[order_id] = max(until, self._live.get(order_id, until))

    def _watch_payment(self, order_id: str) -> None:
        if self.queue.watch(order_id, due_at=self._due(), replace=False):
            self._keep(order_id, self.pay_horizon)
        # else a wait elsewhere has already set its watch; this process's wait sets its own

    def release(self, order_ids: Iterable[str]) -> None:
        """Stop renewing these orders' watches (their waits are over)."""
        with self._lock:
            for order_id in order_ids:
                self._live.pop(order_id, None)

    def _unwatch(self, order_id: str) -> None:
        self.release((order_id,))
        self.queue.unwatch(order_id)

    def due_in(self) -> float:
        """Seconds until the next renewal is due: a period after the last one began (a
        whole period while nothing is live)."""
        now = self.clock.monotonic()
        with self._lock:
            if not self._live:
                return self.period
            return max(0.0, self._renewed + self.period - now)

    def beat(self) -> Any:
        """Renew every live watch, in one write, if a period has passed since the last
        renewal; else do nothing. Returns None, or (``in_thread``) an awaitable of the
        write."""
        now = self.clock.monotonic()
        with self._lock:
            if not self._live or now - self._renewed < self.period - EARLY:
                return None
            self._renewed = now  # the other waits skip it, even while this one writes
            for order_id in [i for i, until in self._live.items() if until <= now]:
                del self._live[order_id]  # its wait would have given up: let it fire
            order_ids = list(self._live)
        return self._call(self._renew, order_ids) if order_ids else None

    def _renew(self, order_ids: list[str]) -> None:
        try:
            self.queue.renew(order_ids, due_at=self._due())
        except Exception:  # tried again a period later, still a period before it is due
            log.exception("could not renew the watches of %d orders", len(order_ids))

    def on_start(self, start: WaitStart) -> Any:
        """A wait began: watch the order, unless this process already does."""
        return self._call(self._on_start, start)

    def on_finish(self, result: WaitResult) -> Any:
        """A wait ended: settle the watch, or enqueue a stalled order."""
        return self._call(self._on_finish, result)

    def _on_start(self, start: WaitStart) -> None:
        with self._lock:
            watched = start.order_id in self._live
        if not watched:
            try:
                if not self.queue.watch(start.order_id, due_at=self._due()):
                    return  # under recovery already: the worker's, not a watch to renew
            except Exception:  # the wait goes on; only this process knows the order now
                log.exception("order %s: could not record its watch", start.order_id)
                return
        # A payment's watch, written moments ago and renewed since, serves as this wait's.
        self._keep(start.order_id, start.horizon)

    def _on_finish(self, result: WaitResult) -> None:
        self.release((result.order_id,))
        try:
            self.queue.on_finish(result)
        except Exception:
            if result.stalled:  # the caller is told it is queued: a failure must be seen
                raise
            # A watch that could not be settled stays and fires later, which is safe.
            log.exception("order %s: could not settle its watch", result.order_id)
