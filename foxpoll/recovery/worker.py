"""``RecoveryWorker``: re-check stalled orders until they finish, deliver them exactly once.

Each job re-reads its order. Completed: its codes go out through ``deliver_once`` (the
event is published inside the same claim, so it is not lost to a crash between the two).
Failed or cancelled: ``on_terminal`` gets the order, and the event is published. Still
pending, unreadable, or failed along the way (``on_completed`` raised, the dedup store
was down...): the job comes back after the policy's next wait, with the error on record,
until its attempts run out and it moves to the dead letters. The decision is a pure
function, :func:`decide`; the worker only does its I/O.

:meth:`RecoveryWorker.run` outlives outages. A round (sweep, retention, the due jobs)
that fails for any reason but a programming error (:data:`PROGRAMMING_ERRORS`) is an
outage of the queue, a store or the API: it is counted, logged once per outage, and the
round is tried again after a capped, jittered wait (``outage_backoff``).
"""

from __future__ import annotations

import inspect
import logging
import random
import threading
from collections.abc import Callable, Iterable
from typing import Any

import attrs

from foxpoll._client import FoxReload
from foxpoll._core import check_seconds
from foxpoll._io import is_async, run
from foxpoll._outages import OUTAGE_BACKOFF, PROGRAMMING_ERRORS, STOP_LOOKS_EVERY, Outages
from foxpoll.backoff import BackoffPolicy
from foxpoll.dedup.base import DedupStore, DeliveryState
from foxpoll.delivery import deliver_once
from foxpoll.errors import (
    APIConnectionError,
    APIError,
    DeliveryInProgress,
    FoxPollError,
    InternalServerError,
    NotFoundError,
    OrderMismatch,
    RateLimitError,
    StoreUnavailable,
)
from foxpoll.events.base import OrderEvent, Publisher
from foxpoll.models import Order, OrderStatus
from foxpoll.polling import Listener, WaitResult
from foxpoll.ratelimit import Priority

from .base import DELIVERY, JobQueue, RecoveryJob, RecoveryPolicy, RecoveryQueue

__all__ = ["Action", "Checked", "RecoveryPolicy", "RecoveryWorker", "decide"]

log = logging.getLogger("foxpoll.recovery")

#: How much of a foreign exception's message ``last_error`` keeps, in characters: the
#: exception may be the partner's own, whose messages foxpoll cannot vouch for.
ERROR_TEXT_LIMIT = 200

#: Done jobs are kept this long (30 days) before the worker deletes them.
KEEP_DONE = 30 * 86400.0
#: Seconds between two retention rounds of a worker (or a procrastinate dispatcher).
PURGE_EVERY = 300.0
#: Rows one retention statement deletes, and statements one retention round runs at most:
#: short statements that never hold many locks, and a backlog cleared over a few rounds.
PURGE_BATCH = 500
PURGE_BATCHES = 10


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
    #: What was out, if the re-check met an outage (:data:`OUTAGES`) rather than
    #: anything about its order: then it used up no attempt.
    outage: Exception | None = None

    @property
    def attempt_spent(self) -> bool:
        """Whether the re-check used up its job's attempt: not when it met an outage."""
        return self.outage is None


#: What says the API, the request budget or the dedup store is out, not that an order is
#: wrong: no answer, or none in time (``APIConnectionError``, ``BudgetUnavailable``
#: among them), a 5xx, a 429 past ``max_retry_after``, a store that cannot be reached. A
#: re-check that meets one gives its attempt back, so that an outage, however long,
#: dead-letters nothing; :meth:`RecoveryWorker.run` waits it out as a failed round.
OUTAGES: tuple[type[Exception], ...] = (
    APIConnectionError, InternalServerError, RateLimitError, StoreUnavailable,
)


def decide(order: Order | None, attempt: int, policy: RecoveryPolicy,
           rng: random.Random) -> Action:
    """Pure: what re-check number ``attempt`` (from 1) does, given the order as it read it
    (None if it could not be read)."""
    if order is not None and order.status is OrderStatus.COMPLETED:
        return Action("deliver")
    if order is not None and order.status.is_terminal:
        return Action("terminal")
    return _unfinished(attempt, policy, rng)


def _unfinished(attempt: int, policy: RecoveryPolicy, rng: random.Random) -> Action:
    """Pure: after re-check number ``attempt`` left the order unfinished (still pending,
    unreadable, or its handling failed), look again on the schedule, or dead-letter it
    when that was the last attempt."""
    if attempt >= policy.max_attempts:
        return Action("dead")
    return Action("retry", policy.delay(attempt, rng))


def _error_text(exc: BaseException) -> str:
    """``TypeName: message`` on one line, for ``last_error``. foxpoll's own messages are
    kept whole (they never hold the API key or codes); any other exception's is cut to
    :data:`ERROR_TEXT_LIMIT` characters."""
    text = " ".join(str(exc).split())
    if not isinstance(exc, FoxPollError) and len(text) > ERROR_TEXT_LIMIT:
        text = text[:ERROR_TEXT_LIMIT - 1] + "…"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


#: The longest lease the worker takes, in seconds (over 115 days), as a dedup store's
#: claim: a longer one is a unit mistake.
MAX_LEASE = 1e7


class _Miswired(TypeError):
    """A callback the worker cannot call with an order (wrong signature, or async): the
    worker's wiring is wrong, not the job, so it ends the worker instead of being recorded
    on every job."""


def _check_callback(name: str, callback: Callable[..., Any]) -> None:
    """Refuse a callback the worker could not call with an order, before any job is
    taken: one that is not callable, is async, or whose signature takes no single
    positional argument. A callback without a readable signature (some builtins) is
    left to the check of each call.

    Raises:
        TypeError: ``callback`` cannot be called with an order.
    """
    if not callable(callback):
        raise TypeError(f"{name} must be callable, not {type(callback).__name__}")
    if is_async(callback):
        raise TypeError(f"{name} is async; RecoveryWorker calls it in blocking code")
    try:
        signature = inspect.signature(callback)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(object())
    except TypeError as exc:
        raise TypeError(f"{name} cannot be called with an order: {exc}") from None


def _used_up(job: RecoveryJob, policy: RecoveryPolicy) -> str:
    """The ``last_error`` of a job taken with its attempts already used up."""
    begun, allowed = job.attempts - 1, policy.max_attempts
    if begun == allowed:  # the last re-check would have recorded its end, had it reached it
        text = (f"re-check {begun} of {allowed} never ended (its worker stopped, or its "
                "lease ran out first): dead-lettered when taken again")
    else:  # a policy with fewer attempts than the job's
        text = f"attempts used up: {begun} re-checks begun, the policy allows {allowed}"
    return f"{text}; before it: {job.last_error}" if job.last_error else text


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
            completions count as completed, and the failed rounds of :meth:`run` on its
            ``on_worker_error``, if it has one (``foxpoll.metrics`` objects do): a
            blocking one, which :meth:`run` calls (an async one is a :class:`TypeError`
            there; the procrastinate worker awaits it).
        lease: Seconds a taken job stays with this worker if it dies.
        rng: Random source for the jitter.
        outage_backoff: The waits between failed rounds of :meth:`run` during an outage
            (:data:`OUTAGE_BACKOFF`: up to 1 s, 2 s, 4 s... capped at a minute).
        keep_done: Seconds a done job is kept (by its last change) before :meth:`run`
            deletes it: 30 days by default, None to keep done jobs forever. Dead and
            resolved jobs are always kept.

    Raises:
        ValueError: ``lease`` is not a number of seconds above zero and under
            :data:`MAX_LEASE`, or ``keep_done`` not a finite one, zero or more.
        TypeError: ``outage_backoff`` is not a backoff policy; or ``on_completed`` or
            ``on_terminal`` cannot be called with an order (not callable, async, or a
            signature that takes no single positional argument): refused before any job
            is taken. A callback that passes this check and still cannot take the call
            ends the worker when first called (see :meth:`recheck`).
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
        outage_backoff: BackoffPolicy = OUTAGE_BACKOFF,
        keep_done: float | None = KEEP_DONE,
    ) -> None:
        check_seconds(lease, "lease", below=MAX_LEASE)
        if keep_done is not None:
            check_seconds(keep_done, "keep_done", above_zero=False)
        if not callable(getattr(outage_backoff, "delays", None)):
            raise TypeError("outage_backoff must be a backoff policy (anything with "
                            "delays(rng)), such as foxpoll.backoff.ExponentialJitter")
        _check_callback("on_completed", on_completed)
        if on_terminal is not None:
            _check_callback("on_terminal", on_terminal)
        self.client, self.queue, self.store = client, queue, store
        self.on_completed, self.on_terminal = on_completed, on_terminal
        self.publisher, self.metrics = publisher, metrics
        self.lease = lease
        self.rng = rng or random.Random()
        self.outage_backoff = outage_backoff
        self.keep_done = keep_done

    @property
    def policy(self) -> RecoveryPolicy:
        """The re-check policy: its queue's (``max_attempts`` and ``backoff`` govern this
        worker's re-checks; a job's due time and attempts are on its row)."""
        return self.queue.policy

    def recheck(self, order_id: str, attempt: int, *, since: float | None = None
                ) -> Checked:
        """Re-read the order and act on it: deliver, hand over, or say when to look again.

        Whatever fails along the way (the API or its answer, ``on_completed``,
        ``on_terminal``, the publisher, the dedup store) is caught and returned as the
        error (``TypeName: message``), with the next step on the policy's schedule.

        Args:
            order_id: The order.
            attempt: This re-check's number, from 1 (the taken job's ``attempts``).
            since: When recovery began (for the metrics' completion time).

        Raises:
            TypeError: ``on_completed`` or ``on_terminal`` cannot be called with an order
                (its signature, or it is async): the worker's wiring, not this order.
        """
        order: Order | None = None
        error: str | None = None
        try:
            order = self.client.orders.get(order_id, priority=Priority.POLL)
        except OUTAGES as exc:
            return self._outage(order_id, attempt, exc)
        except NotFoundError:
            error = "order not found"
        except APIError as exc:
            error = _error_text(exc)
        except Exception as exc:  # an answer the client could not take, an id it refused
            error = _error_text(exc)
            log.warning("order %s: re-check %d could not read the order: %s", order_id,
                        attempt, error, exc_info=True)
        if order is not None and order.id != order_id:
            # The client refuses such an answer; a client subclass or wrapper might not,
            # and another order's codes must never go out under this job.
            mismatch = OrderMismatch(requested=order_id, received=order.id)
            error, order = _error_text(mismatch), None
            log.warning("order %s: re-check %d: %s", order_id, attempt, mismatch)
        status = order.status.value if order is not None else None
        action = decide(order, attempt, self.policy, self.rng)
        try:
            if action.kind == "deliver":
                assert order is not None
                deliver_once(order, self._deliver_and_publish, self.store, lease=self.lease,
                             clock=self.client.clock)
            elif action.kind == "terminal":
                assert order is not None
                if self.on_terminal is not None:
                    self._call("on_terminal", self.on_terminal, order)
                self._publish(order)
        except _Miswired:
            raise
        except OUTAGES as exc:  # the dedup store or the publisher's server is out
            return self._outage(order_id, attempt, exc, status)
        except DeliveryInProgress as busy:  # another worker is on it: look again soon
            error = _error_text(busy)
            action = _unfinished(attempt, self.policy, self.rng)
            if action.kind == "retry":
                action = Action("retry", max(1.0, busy.lease_until - self.client.clock.time()))
        except Exception as exc:
            error = _error_text(exc)
            action = _unfinished(attempt, self.policy, self.rng)
            log.warning("order %s: re-check %d failed: %s", order_id, attempt, error,
                        exc_info=True)
        else:
            if action.kind in ("deliver", "terminal"):
                assert order is not None
                self._count(order, attempt, since)
        if action.kind == "dead":
            log.error("order %s: recovery attempts used up (last status %s, last error %s); "
                      "dead-lettered", order_id, status, error)
        return Checked(action, status, error)

    def _outage(self, order_id: str, attempt: int, exc: Exception,
                status: str | None = None) -> Checked:
        """A re-check that met an outage: its attempt given back, the job due again on the
        policy's schedule. Logged quietly here: the round's outage is logged once."""
        error = _error_text(exc)
        log.debug("order %s: re-check %d met an outage: %s", order_id, attempt, error)
        return Checked(Action("retry", self.policy.delay(attempt, self.rng)), status,
                       error, outage=exc)

    def process(self, job: RecoveryJob) -> RecoveryJob:
        """Re-check one taken job of a :class:`JobQueue` and move it on: done, retried
        with its status and error on record, or dead-lettered.

        A job taken with more attempts than the policy allows (its last re-check never
        ended: the worker died, or the lease ran out first) is dead-lettered without a
        re-check. A job whose wait saw the order completed (reason ``delivery``) is first
        looked up in the dedup store: delivered there means done, with no request to the
        API.

        Raises:
            StoreUnavailable: the queue could not record the outcome; the job comes back
                when its lease runs out.
            TypeError: a callback cannot be called with an order (see :meth:`recheck`).
        """
        return self._process(job)[0]

    def _process(self, job: RecoveryJob) -> tuple[RecoveryJob, Exception | None]:
        """:meth:`process`, and the outage its re-check met, if any (the job is retried
        with its attempt given back by then)."""
        queue = self._job_queue()
        if job.attempts > self.policy.max_attempts:
            checked = Checked(Action("dead"), job.last_status, _used_up(job, self.policy))
            log.error("order %s: %s; dead-lettered", job.order_id, checked.error)
        elif job.reason == DELIVERY and self._delivered(job.order_id):
            return queue.finish(job.order_id, final_status="completed"), None
        else:
            checked = self.recheck(job.order_id, job.attempts, since=job.created_at)
        kind = checked.action.kind
        if kind in ("deliver", "terminal"):
            return queue.finish(job.order_id, final_status=checked.status or kind), None
        try:
            if kind == "dead":
                return queue.bury(job.order_id, last_status=checked.status,
                                  last_error=checked.error), None
            return queue.retry(job.order_id,
                               due_at=self.client.clock.time() + checked.action.delay,
                               last_status=checked.status, last_error=checked.error,
                               attempt_spent=checked.attempt_spent), checked.outage
        except ValueError:
            # A watch that fired while its wait was still running: the wait has settled
            # it meanwhile, and the job is no longer queued. Nothing is left to do.
            log.info("order %s: settled by its wait during the re-check", job.order_id)
            return queue.get(job.order_id) or job, None

    def _delivered(self, order_id: str) -> bool:
        """The dedup store says the order was delivered. A store that cannot say is only
        logged: the re-check that follows goes through the store again, and records it."""
        try:
            record = self.store.get(order_id)
        except Exception as exc:
            log.warning("order %s: the dedup store could not be read (%s); re-checking",
                        order_id, _error_text(exc))
            return False
        return record is not None and record.state is DeliveryState.DELIVERED

    def _call(self, name: str, callback: Callable[[Order], Any], order: Order) -> Any:
        """``callback(order)``, telling a callback that cannot take the call (a
        :class:`TypeError` raised by the call itself, before any of its code ran; an
        awaitable result) from one that failed inside."""
        try:
            result = callback(order)
        except TypeError as exc:
            if exc.__traceback__ is not None and exc.__traceback__.tb_next is None:
                raise _Miswired(f"{name} cannot be called with an order: {exc}") from exc
            raise
        if inspect.isawaitable(result):
            if inspect.iscoroutine(result):
                result.close()  # not reported as never awaited
            raise _Miswired(f"{name} is async; RecoveryWorker calls it in blocking code")
        return result

    def _job_queue(self) -> JobQueue:
        if not isinstance(self.queue, JobQueue):
            raise TypeError(f"{type(self.queue).__name__} runs its own workers; see its docs")
        return self.queue

    def _deliver_and_publish(self, order: Order) -> Any:
        receipt = self._call("on_completed", self.on_completed, order)
        try:
            self._publish(order)  # inside the claim: a crash before it means a retry
        except Exception as exc:
            # The codes are out: releasing the claim would deliver them again. The event is
            # lost (at most once, where the codes are exactly once), and said so.
            log.error("order %s delivered, but its completion event was not published "
                      "(%s)", order.id, _error_text(exc))
        return receipt

    def _publish(self, order: Order) -> None:
        if self.publisher is not None:
            self.publisher.publish(OrderEvent.from_order(order, now=self.client.clock.time()))

    def _count(self, order: Order, attempt: int, since: float | None) -> None:
        if self.metrics is not None:
            error = None if order.status is OrderStatus.COMPLETED else FoxPollError(order.id)
            now = self.client.clock.time()
            elapsed = now - (since if since is not None else now)
            self.metrics.on_finish(WaitResult(order.id, order, error, attempt, elapsed))

    def run_pending(self, *, limit: int | None = None,
                    stop: threading.Event | None = None) -> int:
        """Process every job due now (up to ``limit``, and until ``stop`` is set); return
        how many were processed.

        A job's own failure is recorded on the job (see :meth:`process`) and the next job
        is taken. A re-check that met an outage (:data:`OUTAGES`: the API, the budget or
        the dedup store out) is retried with its attempt given back, and the outage is
        raised: the jobs behind it would only meet it too.
        ``stop`` is looked at before each take: once it is set, the job in hand is
        finished and no other is taken.

        Raises:
            StoreUnavailable: the queue could not be reached; a job taken meanwhile comes
                back when its lease runs out (counted as an attempt). Or a re-check's
                dedup store or budget was out.
            APIConnectionError: and the other :data:`OUTAGES` a re-check met.
            TypeError: a callback cannot be called with an order.
        """
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                                  or limit < 0):
            raise ValueError("limit must be a whole number, zero or more, or None")
        processed = 0
        queue = self._job_queue()
        while (limit is None or processed < limit) and not (stop and stop.is_set()):
            job = queue.take(lease=self.lease)
            if job is None:
                return processed
            _, outage = self._process(job)
            processed += 1
            if outage is not None:  # the jobs behind it would meet it too: wait it out
                raise outage
        return processed

    def sweep(self, pending_orders: Callable[[], Iterable[tuple[str, float]]], *,
              older_than: float = 600.0) -> int:
        """Enqueue the orders ``pending_orders()`` reports as non-terminal, as
        ``(order_id, since)`` pairs, for longer than ``older_than`` seconds (10 minutes):
        your own records catch what no wait saw stall (a crashed web worker, say)."""
        return self.queue.sweep(pending_orders(), now=self.client.clock.time(),
                                older_than=older_than)

    def purge_done(self) -> int:
        """Delete the queue's done jobs older than ``keep_done``: up to
        :data:`PURGE_BATCHES` statements of :data:`PURGE_BATCH` rows, fewer once a batch
        comes back short. Return how many were deleted (0 with ``keep_done=None``).

        :meth:`run` calls it every :data:`PURGE_EVERY` seconds.
        """
        if self.keep_done is None:
            return 0
        deleted = 0
        for _ in range(PURGE_BATCHES):
            batch = self.queue.delete_done(older_than=self.keep_done, limit=PURGE_BATCH)
            deleted += batch
            if batch < PURGE_BATCH:
                break
        if deleted:
            log.info("recovery: deleted %d done job(s) older than %g s", deleted,
                     self.keep_done)
        return deleted

    def _outages(self, component: str, label: str, *, clock: Callable[[], float] | None = None
                ) -> Outages:
        """The outage bookkeeping of one of this worker's loops: its ``outage_backoff``,
        ``rng`` and ``metrics``, on ``clock`` (the client's monotonic clock by default)."""
        return Outages(component, label, log=log, backoff=self.outage_backoff, rng=self.rng,
                       metrics=self.metrics, clock=clock or self.client.clock.monotonic)

    def run(
        self,
        *,
        stop: threading.Event | None = None,
        idle: float = 5.0,
        pending_orders: Callable[[], Iterable[tuple[str, float]]] | None = None,
        sweep_every: float = 300.0,
    ) -> None:
        """Process jobs as they come due, sweep ``pending_orders`` every ``sweep_every``
        seconds and delete old done jobs every :data:`PURGE_EVERY` seconds (see
        ``keep_done``), until ``stop`` is set.

        With nothing due it waits ``idle`` seconds on the client's clock (a ``FakeClock``
        runs the loop on virtual time), and ends within :data:`STOP_LOOKS_EVERY` seconds
        of ``stop`` being set; working through a backlog of due jobs, it ends once the
        job in hand is done.

        It outlives outages. A round that raises anything but a programming error (a
        queue, store or API outage: :class:`~foxpoll.errors.StoreUnavailable`,
        :class:`~foxpoll.errors.APIConnectionError`...) is counted on the metrics'
        ``on_worker_error("recovery", error)``, logged at WARNING once per outage (and at
        INFO when a round works again), and tried again after ``outage_backoff``, waited
        on the client's clock like ``idle``. A sweep or a retention round that fails
        waits for its next turn, so it never holds the due jobs back.

        A job's own failure (its ``on_completed`` raising, say) never reaches this loop:
        it is recorded on the job (see :meth:`process`). A queue table that does not
        exist, or a row that cannot be read, fails its round like an outage: logged and
        counted, and waited out, so a worker started before ``create_schema()`` ran starts
        working once it has.

        Raises:
            TypeError: and the other :data:`PROGRAMMING_ERRORS` escaping a round: a
                callback that cannot be called with an order (see :meth:`recheck`), a
                ``pending_orders`` that takes arguments, a queue that runs its own
                workers... No wait can cure them.
        """
        check_seconds(idle, "idle", above_zero=False)
        check_seconds(sweep_every, "sweep_every", above_zero=False)
        stop = stop or threading.Event()
        clock = self.client.clock
        outages = self._outages("recovery", "recovery worker")
        last_sweep: float | None = None
        last_purge: float | None = None
        while not stop.is_set():
            now = clock.monotonic()
            try:
                if pending_orders is not None and (last_sweep is None
                                                   or now - last_sweep >= sweep_every):
                    last_sweep = now
                    self.sweep(pending_orders)
                if self.keep_done is not None and (last_purge is None
                                                   or now - last_purge >= PURGE_EVERY):
                    last_purge = now
                    self.purge_done()
                processed = self.run_pending(stop=stop)
            except PROGRAMMING_ERRORS:
                raise
            except Exception as exc:  # an outage: wait, then try the round again
                wait = outages.failed(exc)
                run(outages.count(exc), async_twin="a blocking on_worker_error: "
                    "RecoveryWorker.run cannot await it")
                self._idle(stop, wait)
                continue
            outages.succeeded()
            if processed == 0:
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
