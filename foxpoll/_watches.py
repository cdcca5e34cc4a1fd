"""Watches: the client's side of keeping a paid order from living only in its memory.

A :class:`Watcher` wraps a client's recovery queue. It records a watch before each
payment, and at the start of each wait whose horizon the payment's watch does not fit;
it settles the watch, or enqueues the order, when the wait ends. The queue side (what a
watch is, how it fires) is :mod:`foxpoll.recovery.base`.

The recovery queues do blocking I/O. On an async client every queue call runs in a
worker thread (:func:`asyncio.to_thread`, the loop's default executor), so a slow or
frozen queue holds that thread, until the queue's own timeout, and never the event loop.
The call is still awaited, so its error reaches the caller as it does on the sync client:
a watch that cannot be written before a payment means nothing is paid.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

from . import _api
from ._clock import Clock
from ._effects import Flow, Notify
from .errors import APIStatusError, ConflictError
from .models import Order
from .polling import WaitPolicy, WaitResult, WaitStart

__all__ = ["WatchQueue", "Watcher"]

log = logging.getLogger("foxpoll.recovery")

REMEMBERED = 10_000  # orders remembered between pay and wait, per client


class WatchPolicy(Protocol):
    @property
    def watch_margin(self) -> float: ...


class WatchQueue(Protocol):
    """What a client needs of its ``recovery_queue``: every
    :class:`foxpoll.recovery.RecoveryQueue` is one."""

    @property
    def policy(self) -> WatchPolicy: ...

    def watch(self, order_id: str, *, due_at: float, replace: bool = ...) -> bool: ...

    def unwatch(self, order_id: str) -> bool: ...

    def on_finish(self, result: WaitResult) -> None: ...


class Watcher:
    """Records and settles a client's watches in its recovery queue: a listener of every
    wait of the client.

    Args:
        policy: The client's wait policy. A watch written at pay covers its horizon,
            counting a wait before the first poll (the schedule recommended after paying).
        in_thread: Run each queue call in a worker thread and return an awaitable of it:
            the async client's watches, which must not block the event loop.
    """

    def __init__(self, queue: WatchQueue, clock: Clock, policy: WaitPolicy, *,
                 in_thread: bool = False) -> None:
        self.queue, self.clock, self.in_thread = queue, clock, in_thread
        self.pay_horizon = policy.horizon(first_poll_waits=True)
        self._paid: OrderedDict[str, float] = OrderedDict()  # order id -> its watch's due
        self._lock = threading.Lock()

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
        try:
            return (yield from pay)
        except APIStatusError as refused:
            # The server said no: nothing was paid by this call. A 409 may mean another
            # caller paid it, whose watch this row may be, so it stays.
            if not isinstance(refused, ConflictError):
                yield from Notify(self._call, (self._unwatch, order_id))
            raise

    def _due(self, start: WaitStart) -> float:
        return start.started_at + start.horizon + self.queue.policy.watch_margin

    def _watch_payment(self, order_id: str) -> None:
        due_at = self._due(WaitStart(order_id, self.clock.time(), self.pay_horizon))
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

    def on_start(self, start: WaitStart) -> Any:
        """A wait began: watch the order, unless the payment's watch fits."""
        return self._call(self._on_start, start)

    def on_finish(self, result: WaitResult) -> Any:
        """A wait ended: settle the watch, or enqueue a stalled order."""
        return self._call(self._on_finish, result)

    def _on_start(self, start: WaitStart) -> None:
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

    def _on_finish(self, result: WaitResult) -> None:
        try:
            self.queue.on_finish(result)
        except Exception:
            if result.stalled:  # the caller is told it is queued: a failure must be seen
                raise
            # A watch that could not be settled stays and fires later, which is safe.
            log.exception("order %s: could not settle its watch", result.order_id)
