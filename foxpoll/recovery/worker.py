"""``RecoveryWorker``: re-check stalled orders until they finish, deliver them exactly once.

Each job re-reads its order. Completed: its codes go out through ``deliver_once`` (the
event is published inside the same claim, so it is not lost to a crash between the two).
Failed or cancelled: ``on_terminal`` gets the order, and the event is published. Still
pending, or unreadable: the job comes back after the policy's next wait, until its
attempts run out and it moves to the dead letters. The decision is a pure function,
:func:`decide`; the worker only does its I/O.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Iterable
from typing import Any

import attrs

from foxpoll._client import FoxReload
from foxpoll.dedup.base import DedupStore, DeliveryState
from foxpoll.delivery import deliver_once
from foxpoll.errors import APIError, DeliveryInProgress, FoxPollError, NotFoundError
from foxpoll.events.base import OrderEvent, Publisher
from foxpoll.models import Order, OrderStatus
from foxpoll.polling import Listener, WaitResult
from foxpoll.ratelimit import Priority

from .base import DELIVERY, JobQueue, RecoveryJob, RecoveryPolicy, RecoveryQueue

__all__ = ["Action", "Checked", "RecoveryPolicy", "RecoveryWorker", "decide"]

log = logging.getLogger("foxpoll.recovery")

#: How often an idle :meth:`RecoveryWorker.run` looks whether it was told to stop, in
#: seconds.
STOP_LOOKS_EVERY = 0.1


@attrs.frozen
class Action:
    """What to do with a job after a re-check."""

    kind: str  # "deliver", "terminal", "retry", "dead"
    delay: float = 0.0


@attrs.frozen
class Checked:
    """A re-check's result: the action taken or due, and what the order looked like."""

    action: Action
    status: str | None
    error: str | None


def decide(order: Order | None, attempts: int, policy: RecoveryPolicy,
           rng: random.Random) -> Action:
    """Pure: given the order as re-checked now (None if it could not be read) and the
    re-checks made before this one."""
    if order is not None and order.status is OrderStatus.COMPLETED:
        return Action("deliver")
    if order is not None and order.status.is_terminal:
        return Action("terminal")
    done = attempts + 1
    if done >= policy.max_attempts:
        return Action("dead")
    return Action("retry", policy.delay(done, rng))


class RecoveryWorker:
    """Works a recovery queue, on the queue's :class:`RecoveryPolicy`.

    Args:
        client: The FoxReload client that re-reads orders.
        queue: The recovery queue.
        store: The dedup store that ``deliver_once`` claims in.
        on_completed: Delivers a completed order's codes (as for ``deliver_once``).
        on_terminal: Called with a failed or cancelled order (refund, notify...).
        publisher: Publishes an :class:`OrderEvent` for every order that finishes.
        metrics: A ``foxpoll.metrics`` object (a :class:`foxpoll.Listener`): recovered
            completions count as completed.
        lease: Seconds a taken job stays with this worker if it dies.
        rng: Random source for the jitter.
    """

    def __init__(
        self,
        client: FoxReload,
        queue: RecoveryQueue,
        store: DedupStore,
        *,
        on_completed: Callable[[Order], Any],
        on_terminal: Callable[[Order], Any] | None = None,
        publisher: Publisher | None = None,
        metrics: Listener | None = None,
        lease: float = 300.0,
        rng: random.Random | None = None,
    ) -> None:
        self.client, self.queue, self.store = client, queue, store
        self.on_completed, self.on_terminal = on_completed, on_terminal
        self.publisher, self.metrics = publisher, metrics
        self.lease = lease
        self.rng = rng or random.Random()

    @property
    def policy(self) -> RecoveryPolicy:
        """The re-check policy: its queue's, the one policy of the queue and its workers."""
        return self.queue.policy

    def recheck(self, order_id: str, attempts: int, *, since: float | None = None
                ) -> Checked:
        """Re-read the order and act on it: deliver, hand over, or say when to look again.

        Args:
            order_id: The order.
            attempts: Re-checks made before this one.
            since: When recovery began (for the metrics' completion time).
        """
        order: Order | None = None
        error: str | None = None
        try:
            order = self.client.orders.get(order_id, priority=Priority.POLL)
        except NotFoundError:
            error = "order not found"
        except APIError as exc:
            error = f"{type(exc).__name__}: {exc}"
        status = order.status.value if order is not None else None
        action = decide(order, attempts, self.policy, self.rng)
        if action.kind == "deliver":
            assert order is not None
            try:
                deliver_once(order, self._deliver_and_publish, self.store, lease=self.lease,
                             clock=self.client.clock)
            except DeliveryInProgress as busy:  # another worker is on it: look again soon
                delay = max(1.0, busy.lease_until - self.client.clock.time())
                return Checked(Action("retry", delay), status, "delivery in progress")
            self._count(order, attempts, since)
        elif action.kind == "terminal":
            assert order is not None
            if self.on_terminal is not None:
                self.on_terminal(order)
            self._publish(order)
            self._count(order, attempts, since)
        elif action.kind == "dead":
            log.error("order %s: recovery attempts used up (last status %s); dead-lettered",
                      order_id, status)
        return Checked(action, status, error)

    def process(self, job: RecoveryJob) -> RecoveryJob:
        """Re-check one taken job of a :class:`JobQueue` and move it on.

        A job whose wait saw the order completed (reason ``delivery``) is first looked up
        in the dedup store: delivered there means done, with no request to the API.
        """
        queue = self._job_queue()
        if job.reason == DELIVERY:
            record = self.store.get(job.order_id)
            if record is not None and record.state is DeliveryState.DELIVERED:
                return queue.finish(job.order_id, final_status="completed")
        checked = self.recheck(job.order_id, job.attempts, since=job.created_at)
        kind = checked.action.kind
        if kind in ("deliver", "terminal"):
            return queue.finish(job.order_id, final_status=checked.status or kind)
        try:
            if kind == "dead":
                return queue.bury(job.order_id, last_status=checked.status,
                                  last_error=checked.error)
            return queue.retry(job.order_id,
                               due_at=self.client.clock.time() + checked.action.delay,
                               last_status=checked.status, last_error=checked.error)
        except ValueError:
            # A watch that fired while its wait was still running: the wait has settled
            # it meanwhile, and the job is no longer queued. Nothing is left to do.
            log.info("order %s: settled by its wait during the re-check", job.order_id)
            return queue.get(job.order_id) or job

    def _job_queue(self) -> JobQueue:
        if not isinstance(self.queue, JobQueue):
            raise TypeError(f"{type(self.queue).__name__} runs its own workers; see its docs")
        return self.queue

    def _deliver_and_publish(self, order: Order) -> Any:
        receipt = self.on_completed(order)
        self._publish(order)  # inside the claim: a crash before it means a retry, not a loss
        return receipt

    def _publish(self, order: Order) -> None:
        if self.publisher is not None:
            self.publisher.publish(OrderEvent.from_order(order, now=self.client.clock.time()))

    def _count(self, order: Order, attempts: int, since: float | None) -> None:
        if self.metrics is not None:
            error = None if order.status is OrderStatus.COMPLETED else FoxPollError(order.id)
            now = self.client.clock.time()
            elapsed = now - (since if since is not None else now)
            self.metrics.on_finish(WaitResult(order.id, order, error, attempts + 1, elapsed))

    def run_pending(self, *, limit: int | None = None) -> int:
        """Process every job due now (up to ``limit``); return how many were processed."""
        processed = 0
        queue = self._job_queue()
        while limit is None or processed < limit:
            job = queue.take(lease=self.lease)
            if job is None:
                return processed
            try:
                self.process(job)
            except Exception:  # a broken job must not stop the others; it will be re-taken
                log.exception("order %s: recovery check failed", job.order_id)
            processed += 1
        return processed

    def sweep(self, pending_orders: Callable[[], Iterable[tuple[str, float]]], *,
              older_than: float = 600.0) -> int:
        """Enqueue the orders ``pending_orders()`` reports as non-terminal, as
        ``(order_id, since)`` pairs, for longer than ``older_than`` seconds (10 minutes):
        your own records catch what no wait saw stall (a crashed web worker, say)."""
        return self.queue.sweep(pending_orders(), now=self.client.clock.time(),
                                older_than=older_than)

    def run(
        self,
        *,
        stop: threading.Event | None = None,
        idle: float = 5.0,
        pending_orders: Callable[[], Iterable[tuple[str, float]]] | None = None,
        sweep_every: float = 300.0,
    ) -> None:
        """Process jobs as they come due, and sweep ``pending_orders`` every
        ``sweep_every`` seconds, until ``stop`` is set.

        With nothing due it waits ``idle`` seconds on the client's clock (a ``FakeClock``
        runs the loop on virtual time), and ends within :data:`STOP_LOOKS_EVERY` seconds
        of ``stop`` being set.
        """
        stop = stop or threading.Event()
        last_sweep: float | None = None
        while not stop.is_set():
            now = self.client.clock.monotonic()
            if pending_orders is not None and (last_sweep is None
                                               or now - last_sweep >= sweep_every):
                self.sweep(pending_orders)
                last_sweep = now
            if self.run_pending() == 0:
                self._idle(stop, idle)

    def _idle(self, stop: threading.Event, seconds: float) -> None:
        """Sleep ``seconds`` on the client's clock, or until ``stop`` is set.

        A :class:`~foxpoll.Clock` has no sleep that another thread can cut short, so this
        sleeps in slices and looks at ``stop`` between them.
        """
        clock = self.client.clock
        until = clock.monotonic() + seconds
        while not stop.is_set() and (left := until - clock.monotonic()) > 0:
            clock.sleep(min(left, STOP_LOOKS_EVERY))
