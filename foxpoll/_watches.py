"""Watches: the client's side of keeping a paid order from living only in its memory.

A :class:`Watcher` wraps a client's recovery queue. It records a watch before each
payment, and at the start of each wait whose horizon the payment's watch does not fit;
it settles the watch, or enqueues the order, when the wait ends. The queue side (what a
watch is, how it fires) is :mod:`foxpoll.recovery.base`.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING

from . import _api
from ._clock import Clock
from ._effects import Flow, Notify
from .backoff import ExponentialJitter
from .errors import APIStatusError, ConflictError
from .models import Order
from .polling import WaitOptions, WaitResult, WaitStart

if TYPE_CHECKING:
    from .recovery.base import RecoveryQueue

__all__ = ["Watcher"]

log = logging.getLogger("foxpoll.recovery")

# What a watch written at pay covers: the default schedule, and the one recommended after
# paying (no poll at once), whichever runs longer.
PAY_HORIZON = WaitOptions(backoff=ExponentialJitter(poll_at_start=False)).horizon()
REMEMBERED = 10_000  # orders remembered between pay and wait, per client


class Watcher:
    """Records and settles a client's watches in its recovery queue."""

    def __init__(self, queue: RecoveryQueue, clock: Clock) -> None:
        self.queue, self.clock = queue, clock
        self._paid: OrderedDict[str, float] = OrderedDict()  # order id -> its watch's due
        self._lock = threading.Lock()

    def pay(self, order_id: str, pay: Flow[Order]) -> Flow[Order]:
        """Record the watch, then pay: a payment is never known only to this process.

        If the watch cannot be written, nothing is paid and the store's error is raised.
        """
        _api.resource_path("/api/orders/", order_id, kind="order")
        yield Notify(self._watch_payment, (order_id,))
        try:
            return (yield from pay)
        except APIStatusError as refused:
            # The server said no: nothing was paid by this call. A 409 may mean another
            # caller paid it, whose watch this row may be, so it stays.
            if not isinstance(refused, ConflictError):
                yield Notify(self._unwatch, (order_id,))
            raise

    def _due(self, start: WaitStart) -> float:
        return start.started_at + start.horizon + self.queue.policy.watch_margin

    def _watch_payment(self, order_id: str) -> None:
        due_at = self._due(WaitStart(order_id, self.clock.time(), PAY_HORIZON))
        if self.queue.watch(order_id, due_at=due_at, replace=False):
            with self._lock:
                self._paid[order_id] = due_at
                if len(self._paid) > REMEMBERED:
                    self._paid.popitem(last=False)
        # else a wait elsewhere has already set its watch; this process's wait sets its own

    def _forget(self, order_id: str) -> float | None:
        with self._lock:
            return self._paid.pop(order_id, None)

    def _unwatch(self, order_id: str) -> None:
        self._forget(order_id)
        self.queue.unwatch(order_id)

    def on_start(self, start: WaitStart) -> None:
        """The wait's ``on_start``: watch the order, unless the payment's watch fits."""
        due_at = self._due(start)
        paid_due = self._forget(start.order_id)
        if paid_due is not None and 0 <= paid_due - due_at <= self.queue.policy.watch_margin:
            # The watch written at pay fires after this wait would give up, and not much
            # later: it serves as this wait's.
            return
        try:
            self.queue.watch(start.order_id, due_at=due_at)
        except Exception:  # the wait goes on; only this process knows the order now
            log.exception("order %s: could not record its watch", start.order_id)

    def on_finish(self, result: WaitResult) -> None:
        """The wait's ``on_finish``: settle the watch, or enqueue a stalled order."""
        try:
            self.queue.on_finish(result)
        except Exception:
            if result.stalled:  # the caller is told it is queued: a failure must be seen
                raise
            # A watch that could not be settled stays and fires later, which is safe.
            log.exception("order %s: could not settle its watch", result.order_id)
