"""Waiting for orders without webhooks: ``wait_for_completion`` and ``wait_many``.

Everything here is sans-io. :class:`OrderWatch` is the state of one wait and makes every
decision (is this poll's error transient? did the status change? is the order stalled?
how long until the next poll?). :func:`wait_flow` drives one watch with one request at a
time; :func:`wait_many_flow` drives thousands of them under a shared :class:`RequestBudget`.
The clients run both flows with their sync or async driver. A client with a recovery
queue gives them a :class:`Heartbeat`: they then also wake whenever its renewal is due
and let it renew the process's watches, so a long wait keeps them fresh without a thread.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol, TypeVar, cast

import attrs

from . import _api
from ._core import check_timeout
from ._effects import Emit, Flow, Notify, Sleep, Start, WaitAny
from ._gate import check_in_flight
from ._sweep import Sweep, Sweeper
from .backoff import (
    Adaptive,
    BackoffPolicy,
    ExponentialJitter,
    LearningPolicy,
    UpperRandom,
    _non_negative,
    next_instant,
)
from .errors import (
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    APIStatusError,
    CodesMissing,
    InternalServerError,
    NotFoundError,
    OrderCancelled,
    OrderError,
    OrderFailed,
    OrderStalled,
    RateLimitError,
)
from .models import Order, OrderStatus
from .ratelimit import Priority, RateLimit

__all__ = [
    "DEFAULT_POLICY",
    "Heartbeat",
    "Listener",
    "PollAttempt",
    "Stall",
    "StatusChange",
    "Sweep",
    "WaitPolicy",
    "WaitResult",
    "WaitStart",
    "wait_flow",
    "wait_many_flow",
]

log = logging.getLogger("foxpoll.polling")

T = TypeVar("T")

DEFAULT_BACKOFF = ExponentialJitter()
UNMETERED = 6_000_000.0  # requests a minute: a budget that only ever pauses, on a 429
LAST_POLL_GUARD = 1.0  # seconds before a deadline the last poll goes, for its request
#: The waits of a schedule :meth:`WaitPolicy.horizon` sums one by one, at most.
HORIZON_TERMS = 10_000
_MIN_WAIT = 1e-3
#: :meth:`WaitPolicy.fleet`'s deadline: past the documented minutes an order takes, a
#: recovery queue's sparse re-checks cost the key less than polls every 30 s.
FLEET_TIMEOUT = 600.0
#: Finished waits before a fleet process plans from what it learned, and between two
#: plans. The first orders to finish are the fast ones: a plan made from them alone
#: leaves the slow ones the longest gaps, so it is made again as they come in.
FLEET_MIN_SAMPLES = 20
FLEET_REFRESH = 20


@attrs.frozen
class PollAttempt:
    """What one poll saw; passed to :meth:`Listener.on_poll`.

    Attributes:
        order_id: The order polled.
        attempt: Polls of this order so far, this one included.
        elapsed: Seconds since the wait began.
        outcome: ``"ok"``, ``"not_found"`` (not visible yet), ``"rate_limited"`` or
            ``"error"``.
        order: The order, when the poll succeeded.
        error: The error, when it did not.
        next_poll_in: Seconds until the next poll; None when this poll ended the wait.
    """

    order_id: str
    attempt: int
    elapsed: float
    outcome: str
    order: Order | None = None
    error: APIError | None = None
    next_poll_in: float | None = None


@attrs.frozen
class StatusChange:
    """An order's status moved; passed to ``on_status_change``.

    Attributes:
        previous: The status before, or None on the first sighting.
    """

    order_id: str
    order: Order
    previous: OrderStatus | None
    elapsed: float


@attrs.frozen
class WaitResult:
    """How one wait of ``wait_many`` ended: an order, or the exception that ended it.

    ``error`` is an :class:`OrderFailed`, :class:`OrderCancelled`, :class:`OrderStalled`
    or a non-transient :class:`APIError`. Also what ``on_finish`` receives.

    Attributes:
        attempts: Polls made.
        elapsed: Seconds the wait took.
    """

    order_id: str
    order: Order | None = None
    error: BaseException | None = None
    attempts: int = 0
    elapsed: float = 0.0

    @property
    def stalled(self) -> bool:
        """True when attempts, errors or the deadline ran out first."""
        return isinstance(self.error, OrderStalled)

    @property
    def ok(self) -> bool:
        """True when the order completed."""
        return (
            self.error is None
            and self.order is not None
            and self.order.status is OrderStatus.COMPLETED
        )

    def unwrap(self) -> Order:
        """The completed order, or raise the error."""
        if self.error is not None:
            raise self.error
        assert self.order is not None
        return self.order


@attrs.frozen
class WaitStart:
    """A wait began; passed to ``on_start`` (recovery queues record their watch here).

    Attributes:
        order_id: The order waited for.
        started_at: When, in seconds since the epoch.
        horizon: The longest the wait can run before it gives up, in seconds: its
            timeout, or its attempts on the latest schedule its backoff can draw (time
            spent retrying errors comes on top).
    """

    order_id: str
    started_at: float
    horizon: float


@attrs.frozen
class Stall:
    """An order stalled; passed to ``on_stall``.

    Attributes:
        order_id: The order waited for.
        order: The order as last seen, or None when no poll has read it.
        attempts: Polls made.
        elapsed: Seconds since the wait began.
        final: True when the wait gives up (:class:`OrderStalled` follows); False for the
            early warning of ``stall_after``, after which polling goes on.
    """

    order_id: str
    order: Order | None
    attempts: int
    elapsed: float
    final: bool


class Listener(Protocol):
    """What a wait tells the code that watches it: subclass it and override the events
    you need (the others do nothing).

    A listener is given to a client (``FoxReload(listeners=[...])``, for every wait) or
    to one call (``wait_for_completion(..., listener=...)``). It is a protocol: a class
    with all five methods needs no base class, and at run time any object with some of
    them will do (a type checker wants the subclass for that). On
    :class:`~foxpoll.AsyncFoxReload` a method may be a coroutine function, which is
    awaited before the wait goes on. What a method raises ends the wait with that
    exception.
    """

    # Each method returns explicitly: a type checker takes an empty protocol method for an
    # abstract one, and a subclass must be free to leave any event out.

    def on_start(self, start: WaitStart) -> Any:
        """A wait began, before its first poll (recovery queues record a watch here)."""
        return None

    def on_poll(self, attempt: PollAttempt) -> Any:
        """A poll was answered, or failed."""
        return None

    def on_status_change(self, change: StatusChange) -> Any:
        """The order's status moved (or was first seen)."""
        return None

    def on_stall(self, stall: Stall) -> Any:
        """The status has not moved for ``stall_after`` seconds, or the wait gives up."""
        return None

    def on_finish(self, result: WaitResult) -> Any:
        """The wait ended, however it ended (metrics and recovery queues count here)."""
        return None


EVENTS = ("on_start", "on_poll", "on_status_change", "on_stall", "on_finish")


@attrs.frozen
class Listeners:
    """The methods of a wait's listeners, by event, in the order the listeners came."""

    on_start: tuple[Callable[[WaitStart], Any], ...] = ()
    on_poll: tuple[Callable[[PollAttempt], Any], ...] = ()
    on_status_change: tuple[Callable[[StatusChange], Any], ...] = ()
    on_stall: tuple[Callable[[Stall], Any], ...] = ()
    on_finish: tuple[Callable[[WaitResult], Any], ...] = ()

    @classmethod
    def of(cls, listeners: Iterable[object]) -> Listeners:
        """Collect the event methods of ``listeners``.

        Raises:
            TypeError: a listener has none of the five methods (a function passed where
                an object was expected, say).
        """
        hooks: dict[str, list[Callable[[Any], Any]]] = {name: [] for name in EVENTS}
        for listener in listeners:
            found = False
            for name in EVENTS:
                method = getattr(listener, name, None)
                if method is None:
                    continue
                if not callable(method):
                    raise TypeError(f"{type(listener).__name__}.{name} is not callable")
                found = True
                if getattr(type(listener), name, None) is not getattr(Listener, name):
                    hooks[name].append(method)  # the base class's no-ops are skipped
            if not found:
                raise TypeError(f"{type(listener).__name__} is not a listener: it has none "
                                f"of {', '.join(EVENTS)}")
        return cls(**{name: tuple(found) for name, found in hooks.items()})

    def __add__(self, other: Listeners) -> Listeners:
        return Listeners(*(getattr(self, name) + getattr(other, name) for name in EVENTS))


NO_LISTENERS = Listeners()


def _notes(hooks: tuple[Callable[[Any], Any], ...], event: object) -> Iterator[Notify]:
    for hook in hooks:
        yield Notify(hook, (event,))


class Heartbeat(Protocol):
    """What keeps a process's watches fresh while its waits run: the client's watcher
    (:mod:`foxpoll._watches`), given to the wait flows.

    A flow sleeps no longer than :meth:`due_in` at a time and calls :meth:`beat` when it
    wakes, whether it polls or not; the heartbeat renews when a renewal is due (one write
    for every wait of the process, whichever wakes first). Waking costs no API request.
    """

    def due_in(self) -> float:
        """Seconds until the next renewal is due (0 when it is), from the heartbeat's
        clock: the longest a wait may sleep before it beats."""
        ...

    def beat(self) -> Any:
        """Renew the process's live watches if a renewal is due; None, or an awaitable of
        the renewal on the async client."""
        ...

    def release(self, order_ids: Iterable[str]) -> None:
        """A wait on ``order_ids`` is over, however it ended: stop renewing their watches.
        In memory only, so a flow may call it as it is closed."""
        ...


def _sleep(seconds: float, heartbeat: Heartbeat | None) -> Flow[None]:
    """Sleep ``seconds``; with a heartbeat, waking to beat whenever a renewal is due."""
    if heartbeat is None or seconds <= 0:
        yield from Sleep(seconds)
        return
    while seconds > 0:
        step = min(seconds, heartbeat.due_in())
        if step > 0:
            yield from Sleep(step)
            seconds -= step
        yield from Notify(heartbeat.beat, ())


def with_heartbeat(flow: Flow[T], heartbeat: Heartbeat | None) -> Flow[T]:
    """Run ``flow``, a request of a wait, its sleeps (a retry's backoff, a 429's
    ``Retry-After``, a wait for a permit of the budget) waking to beat as the wait's own
    do: a wait held in one request is alive, and its watch must not fall due. (The
    client's drivers never throw into a flow, so only its effects need passing on.)"""
    if heartbeat is None:
        return (yield from flow)
    try:
        effect = next(flow)
        while True:
            if isinstance(effect, Sleep):
                yield from _sleep(effect.seconds, heartbeat)
                result = None
            else:
                result = yield effect
            effect = flow.send(result)
    except StopIteration as stop:
        return cast(T, stop.value)
    finally:
        flow.close()


def _default_backoff(policy: BackoffPolicy | None) -> BackoffPolicy:
    return DEFAULT_BACKOFF if policy is None else policy


@attrs.frozen
class WaitPolicy:
    """How long and how often to wait for an order: a client's default
    (``FoxReload(wait_policy=...)``) or one call's (``wait_for_completion(policy=...)``).

    Attributes:
        backoff: The wait between polls (:mod:`foxpoll.backoff`); the vendor's
            ``ExponentialJitter()``, which polls at once, by default.
        max_attempts: Successful polls before the order counts as stalled.
        timeout: The wait's deadline, in seconds, over every poll, sleep and HTTP retry;
            None: only ``max_attempts`` bounds it. A call's ``timeout=`` replaces it.
        stall_after: Tell ``on_stall`` early when the status has not changed for this
            long, and keep polling.
        not_found_grace: Seconds during which a 404 means "not visible yet".
        max_errors: Transient poll errors (5xx, 429, timeouts, unreadable bodies)
            tolerated before the order counts as stalled; ``max_attempts`` if None.
        polls_for_codes: A completed order with no codes is a top-up credited to its note
            (a player id), or a supplier whose codes are late. None (the default)
            returns it, with a warning; a number polls it that many more times for its
            codes, then raises :class:`CodesMissing`.
        sweep: ``wait_many`` also sweeps the order history for hints
            (:class:`~foxpoll.Sweep`); None (the default): it does not. A single wait
            ignores it.
    """

    backoff: BackoffPolicy = attrs.field(default=DEFAULT_BACKOFF, converter=_default_backoff)
    max_attempts: int = 40
    timeout: float | None = None
    stall_after: float | None = None
    not_found_grace: float = attrs.field(default=30.0, validator=_non_negative)
    max_errors: int | None = None
    polls_for_codes: int | None = None
    sweep: Sweep | None = None

    def __attrs_post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) \
                or self.max_attempts < 1:
            raise ValueError("max_attempts must be a whole number, at least 1")
        if self.timeout is not None:
            check_timeout(self.timeout)
        if self.stall_after is not None:
            check_timeout(self.stall_after, "stall_after")
        for name in ("max_errors", "polls_for_codes"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 0):
                raise ValueError(f"{name} must be a whole number, zero or more")
        if not isinstance(self.backoff, BackoffPolicy):
            raise TypeError("backoff must have a delays(rng) method (see foxpoll.backoff)")
        if self.sweep is not None and not isinstance(self.sweep, Sweep):
            raise TypeError("sweep must be a foxpoll.Sweep")

    @classmethod
    def after_payment(
        cls,
        *,
        max_attempts: int = 40,
        timeout: float | None = None,
        stall_after: float | None = None,
        not_found_grace: float = 30.0,
        max_errors: int | None = None,
        polls_for_codes: int | None = None,
    ) -> WaitPolicy:
        """The schedule for an order just paid: the vendor's, with its first wait before
        the first poll (nothing is done yet, so a poll at once is wasted)."""
        return cls(ExponentialJitter(poll_at_start=False), max_attempts, timeout, stall_after,
                   not_found_grace, max_errors, polls_for_codes)

    @classmethod
    def fleet(
        cls,
        *,
        target_delay: float | None = None,
        timeout: float | None = FLEET_TIMEOUT,
        max_attempts: int = 40,
        stall_after: float | None = None,
        not_found_grace: float = 30.0,
        max_errors: int | None = None,
        polls_for_codes: int | None = None,
    ) -> WaitPolicy:
        """The schedule for the processes of a fleet that share one key's budget: the
        fewest polls for the vendor schedule's mean detection delay (or ``target_delay``
        seconds), stretched when the budget is short.

        It learns (:class:`~foxpoll.backoff.Adaptive`, one instance per call: make one
        policy per process and product family, and set it on the client) from its first
        20 finished waits on, and plans again every 20. It waits before its first poll,
        and keeps to its plan: a poll the budget postponed skips the instants it
        overran (``foxpoll.backoff.next_instant``), so polls thin out as permits
        get short instead of queueing. It gives up after ``timeout`` seconds (10
        minutes), so an order stalled at the supplier costs about twenty polls before
        a recovery queue takes it, not forty. Pair it with a shared budget
        (``rate_limit=``); ``benchmarks/capacity.py`` measures the pair.

        Args:
            target_delay: The mean detection delay to plan for, in seconds; None: the
                vendor schedule's, as estimated from what was learned.
            timeout: The wait's deadline (see the class's attributes, as the others).
        """
        learner = Adaptive(target_delay=target_delay,
                           baseline=ExponentialJitter(poll_at_start=False),
                           min_samples=FLEET_MIN_SAMPLES, refresh_every=FLEET_REFRESH)
        return cls(learner, max_attempts, timeout, stall_after, not_found_grace,
                   max_errors, polls_for_codes)

    @property
    def error_budget(self) -> int:
        """Transient errors tolerated: ``max_errors``, else ``max_attempts``."""
        return self.max_errors if self.max_errors is not None else self.max_attempts

    def horizon(self, *, first_poll_waits: bool = False) -> float:
        """The longest a wait with this policy polls before it gives up (see
        :class:`WaitStart`).

        Args:
            first_poll_waits: Count a wait before the first poll even when the schedule
                polls at once: the horizon of any wait on this policy, with or without
                that first wait (what a watch written at pay must cover).
        """
        waits = self.max_attempts
        if not first_poll_waits and getattr(self.backoff, "polls_immediately", True):
            waits -= 1  # the first poll comes at once
        # Bounded work before the first poll, whatever max_attempts says: the sum stops
        # at the deadline, and past HORIZON_TERMS waits the rest count as the longest so
        # far (a schedule has reached its cap long before).
        timeout = math.inf if self.timeout is None else self.timeout
        longest = most = 0.0
        for counted, delay in enumerate(itertools.islice(
                self.backoff.delays(UpperRandom()), waits), start=1):
            longest += delay
            most = max(most, delay)
            if longest >= timeout:
                return timeout
            if counted == HORIZON_TERMS:
                longest += (waits - counted) * most
                break
        return min(longest, timeout)

    def deadline(self, timeout: float | None) -> WaitPolicy:
        """This policy, with the wait's deadline ``timeout`` instead, when one is given."""
        return self if timeout is None else attrs.evolve(self, timeout=check_timeout(timeout))


#: The default policy: the vendor's schedule, polling at once.
DEFAULT_POLICY = WaitPolicy()


def start_notes(policy: WaitPolicy, listeners: Listeners, order_ids: Iterable[str],
                now: float) -> Iterator[Notify]:
    """The ``on_start`` calls for waits on ``order_ids`` beginning at ``now`` (epoch)."""
    if not listeners.on_start:
        return
    horizon = policy.horizon()
    for order_id in order_ids:
        yield from _notes(listeners.on_start, WaitStart(order_id, now, horizon))


@attrs.frozen
class Decision:
    """What to do after a poll: run ``notes``, then finish or sleep ``delay``."""

    notes: tuple[Notify, ...] = ()
    finished: bool = False
    order: Order | None = None
    error: BaseException | None = None
    delay: float = 0.0


class OrderWatch:
    """The state of one wait, fed with each poll's outcome. Pure: no I/O, no clock."""

    __slots__ = (
        "_aimed", "_code_polls", "_delays", "_errors", "_final", "_instants",
        "_last_change", "_listeners", "_max_retry_after", "_pending_at", "_policy",
        "_raise_on_failure", "_started", "_warned", "attempts", "first_delay",
        "last_order", "order_id",
    )

    def __init__(
        self, order_id: str, policy: WaitPolicy, started: float, rng: random.Random,
        *, listeners: Listeners = NO_LISTENERS, raise_on_failure: bool = True,
        max_retry_after: float = 60.0,
    ) -> None:
        self.order_id = order_id
        self._max_retry_after = max_retry_after
        self._policy = options = policy
        self._listeners = listeners
        self._raise_on_failure = raise_on_failure
        self._started = started
        self._delays: Iterator[float] = options.backoff.delays(rng)
        self.attempts = 0
        self._errors = 0
        self.last_order: Order | None = None
        self._last_change = started
        self._pending_at: float | None = None  # elapsed at the last poll that saw it pending
        self._warned = False
        self._final = False  # the last poll before the deadline is scheduled
        self._code_polls = 0  # polls of a completed order, waiting for its codes
        self.first_delay = 0.0
        if not getattr(options.backoff, "polls_immediately", True):
            self.first_delay = next(self._delays)
            if options.timeout is not None:  # leave the deadline room for a poll
                self.first_delay = min(self.first_delay, options.timeout / 2)
            if self.first_delay > 0:
                self._pending_at = 0.0  # waited on the assumption it was not done yet
        # A schedule that keeps to a plan is followed by its instants (seconds since the
        # start), so that a poll the budget postponed skips those it overran.
        self._aimed = self.first_delay
        self._instants: Iterator[float] | None = None
        if getattr(options.backoff, "keeps_to_plan", False):
            self._instants = itertools.accumulate(self._delays, initial=self.first_delay)
            next(self._instants)  # the first poll's, aimed at above

    @property
    def started(self) -> float:
        return self._started

    @property
    def priority(self) -> Priority:
        """The next poll's rate-limit lane: the first poll of an order goes before later
        ones."""
        return Priority.FRESH if self.attempts == 0 else Priority.POLL

    @property
    def deadline(self) -> float | None:
        timeout = self._policy.timeout
        return None if timeout is None else self._started + timeout

    def record(self, outcome: Order | Exception, now: float) -> Decision:
        """Take one poll's outcome (the order, or the exception the poll raised)."""
        opts = self._policy
        hooks = self._listeners
        self.attempts += 1
        elapsed = now - self._started
        notes: list[Notify] = []
        attempt = self._attempt(outcome, elapsed)
        notes.extend(_notes(hooks.on_poll, attempt))
        if isinstance(outcome, Exception):
            if not self._is_transient(outcome, elapsed):
                # An account or programming error (401, 400, ...): polling again won't help.
                return self._done(notes, elapsed, error=outcome)
            self._errors += 1

        if isinstance(outcome, Order):
            previous = self.last_order.status if self.last_order is not None else None
            self.last_order = outcome
            if outcome.status != previous:
                self._last_change = now
                self._warned = False
                if hooks.on_status_change:
                    change = StatusChange(self.order_id, outcome, previous, elapsed)
                    notes.extend(_notes(hooks.on_status_change, change))
            if outcome.status is OrderStatus.COMPLETED and not outcome.codes:
                decision = self._without_codes(outcome, notes, elapsed)
                if decision is not None:
                    return decision
            elif outcome.status.is_terminal:
                self._learn(elapsed)
                return self._finish(outcome, notes, elapsed)
            else:
                self._pending_at = elapsed

        polls = self.attempts - self._errors
        if polls >= opts.max_attempts or self._errors > opts.error_budget:
            return self._stall(notes, elapsed, outcome)
        if (
            opts.stall_after is not None
            and not self._warned
            and now - self._last_change >= opts.stall_after
        ):
            self._warned = True
            log.warning("order %s unchanged for %.0fs", self.order_id, now - self._last_change)
            notes.extend(_notes(hooks.on_stall, self._stall_event(elapsed, final=False)))

        if self._instants is not None:
            self._aimed = next_instant(self._instants, self._aimed, elapsed)
            delay = max(0.0, self._aimed - elapsed)
        else:
            delay = next(self._delays)
        if isinstance(outcome, RateLimitError) and outcome.retry_after is not None:
            # A server may ask for days (Retry-After: 999999, or a date years out); no
            # more than the client's max_retry_after is honoured between two polls.
            delay = max(delay, min(outcome.retry_after, self._max_retry_after))
        deadline = self.deadline
        if deadline is not None and now + delay >= deadline:
            # The schedule's next poll comes too late: poll once more just before the
            # deadline instead, rather than give up a whole step early.
            last = deadline - now - min(LAST_POLL_GUARD, (deadline - now) / 2)
            if self._final or last <= _MIN_WAIT:
                log.info("order %s: the deadline has come", self.order_id)
                return self._stall(notes, elapsed, outcome)
            self._final = True
            delay = last
        if hooks.on_poll:  # now that it is known, tell on_poll the next wait too
            told = attrs.evolve(attempt, next_poll_in=delay)
            notes[:len(hooks.on_poll)] = _notes(hooks.on_poll, told)
        return Decision(tuple(notes), delay=delay)

    def _stall_event(self, elapsed: float, *, final: bool) -> Stall:
        return Stall(self.order_id, self.last_order, self.attempts, elapsed, final)

    def _without_codes(self, order: Order, notes: list[Notify], elapsed: float
                       ) -> Decision | None:
        """A completed order with no codes: done (a top-up), or, when codes are required,
        polled again up to ``polls_for_codes`` times (None) before :class:`CodesMissing`."""
        required = self._policy.polls_for_codes
        if required is None:
            log.warning("order %s completed with no codes", self.order_id)
            self._learn(elapsed)
            return self._finish(order, notes, elapsed)
        if self._code_polls >= required:
            log.warning("order %s completed, but its codes never came (%d more polls)",
                        self.order_id, required)
            return self._done(notes, elapsed, order=order, error=CodesMissing(order))
        self._code_polls += 1
        return None

    def _attempt(self, outcome: Order | Exception, elapsed: float) -> PollAttempt:
        if isinstance(outcome, Order):
            return PollAttempt(self.order_id, self.attempts, elapsed, "ok", order=outcome)
        error = outcome if isinstance(outcome, APIError) else None
        label = _outcome_label(outcome)
        return PollAttempt(self.order_id, self.attempts, elapsed, label, error=error)

    def _is_transient(self, error: Exception, elapsed: float) -> bool:
        if isinstance(error, NotFoundError):
            # Right after create the order may not be readable yet.
            return self.last_order is None and elapsed <= self._policy.not_found_grace
        if isinstance(error, APIStatusError):
            return isinstance(error, (InternalServerError, RateLimitError)) or (
                error.status_code == 408
            )
        return isinstance(error, (APIConnectionError, APIResponseValidationError))

    def _learn(self, elapsed: float) -> None:
        backoff = self._policy.backoff
        if self._pending_at is not None and isinstance(backoff, LearningPolicy):
            backoff.observe(self._pending_at, elapsed)

    def _finish(self, order: Order, notes: list[Notify], elapsed: float) -> Decision:
        error: OrderError | None = None
        if order.status is OrderStatus.FAILED:
            error = OrderFailed(order)
        elif order.status is OrderStatus.CANCELLED:
            error = OrderCancelled(order)
        return self._done(notes, elapsed, order=order, error=error)

    def _done(
        self,
        notes: list[Notify],
        elapsed: float,
        *,
        order: Order | None = None,
        error: BaseException | None = None,
    ) -> Decision:
        """End the wait: tell ``on_finish`` how, and decide what the caller gets."""
        if self._listeners.on_finish:
            result = WaitResult(self.order_id, order, error, self.attempts, elapsed)
            notes.extend(_notes(self._listeners.on_finish, result))
        if isinstance(error, (OrderFailed, OrderCancelled)) and not self._raise_on_failure:
            error = None  # the caller asked for the failed order back instead
        return Decision(tuple(notes), finished=True, order=order, error=error)

    def _stall(
        self, notes: list[Notify], elapsed: float, outcome: Order | Exception
    ) -> Decision:
        stalled = OrderStalled(
            self.order_id, order=self.last_order, attempts=self.attempts, elapsed=elapsed
        )
        if isinstance(outcome, Exception):
            stalled.__cause__ = outcome
        log.warning("%s", stalled)
        notes.extend(_notes(self._listeners.on_stall, self._stall_event(elapsed, final=True)))
        return self._done(notes, elapsed, order=self.last_order, error=stalled)


def _outcome_label(error: Exception) -> str:
    if isinstance(error, NotFoundError):
        return "not_found"
    if isinstance(error, RateLimitError):
        return "rate_limited"
    return "error"


def wait_flow(rt: _api.Runtime, order_id: str, policy: WaitPolicy, *,
              listeners: Listeners = NO_LISTENERS, raise_on_failure: bool = True,
              heartbeat: Heartbeat | None = None) -> Flow[Order]:
    """Poll one order until it finishes; return it, or raise what ended the wait.

    With a ``heartbeat``, a sleep also wakes, and beats, whenever a renewal is due.
    """
    _api.resource_path("/api/orders/", order_id, kind="order")  # fail fast on a bad id
    try:
        yield from start_notes(policy, listeners, (order_id,), rt.clock.time())
        watch = OrderWatch(order_id, policy, rt.clock.monotonic(), rt.rng,
                           listeners=listeners, raise_on_failure=raise_on_failure,
                           max_retry_after=rt.config.max_retry_after)
        if watch.first_delay > 0:
            yield from _sleep(watch.first_delay, heartbeat)
        while True:
            outcome: Order | Exception
            try:
                outcome = yield from with_heartbeat(_api.get_order(
                    rt, order_id, deadline=watch.deadline, priority=watch.priority), heartbeat)
            except APIError as exc:
                outcome = exc
            decision = watch.record(outcome, rt.clock.monotonic())
            yield from decision.notes
            if decision.finished:
                if decision.error is not None:
                    raise decision.error
                assert decision.order is not None
                return decision.order
            yield from _sleep(decision.delay, heartbeat)
    finally:
        # However the wait ended (a listener raised, the task was cancelled): a watch
        # nobody waits on must fire, not be renewed by the process's other waits.
        if heartbeat is not None:
            heartbeat.release((order_id,))


def wait_many_flow(
    rt: _api.Runtime,
    order_ids: Iterable[str],
    policy: WaitPolicy,
    *,
    listeners: Listeners = NO_LISTENERS,
    max_requests_per_minute: float | None = None,
    max_in_flight: int,
    heartbeat: Heartbeat | None = None,
) -> Flow[None]:
    """Poll many orders in one loop, each on its own schedule; emit a :class:`WaitResult`
    for each as it finishes.

    Every poll takes a permit from the client's rate limit (first polls before later
    ones), so a 429 pauses them all. Without one, ``max_requests_per_minute`` gives this
    call its own :class:`~foxpoll.ratelimit.RateLimit`; with neither, polls are not
    metered, but a 429 still pauses them all. A poll retries a transient failure
    within itself, as :func:`wait_flow`'s do (each attempt takes its own permit); a
    poll that still fails counts against the order's error budget. At most
    ``max_in_flight`` polls are started and not yet finished at once. With a
    ``heartbeat``, the loop also wakes, and beats, whenever a renewal is due. With the
    policy's ``sweep`` on, listings of the order history hint which polls to make now
    and which to put off (:mod:`foxpoll._sweep`); they take permits as polls do.
    """
    check_in_flight(max_in_flight)
    sweeper = None
    if policy.sweep is not None and policy.sweep.off_reason is None:
        sweeper = Sweeper(policy.sweep, rt.clock.monotonic())
        if policy.timeout is None:
            # Polls put off must not make a wait outlast the one it would be without.
            policy = policy.deadline(policy.horizon())
    limit = rt.limit
    if max_requests_per_minute is not None and limit is not None:
        raise ValueError("this client has a rate_limit: max_requests_per_minute would be "
                         "a second budget; leave it out")
    if limit is None:
        limit = RateLimit(max_requests_per_minute or UNMETERED, clock=rt.clock)
    metered = attrs.evolve(rt, limit=limit)
    now = rt.clock.monotonic()
    watches: dict[str, OrderWatch] = {}
    due: list[tuple[float, int, str]] = []
    order = itertools.count()
    for order_id in dict.fromkeys(order_ids):  # each order once, in the order given
        _api.resource_path("/api/orders/", order_id, kind="order")
        watch = watches[order_id] = OrderWatch(order_id, policy, now, rt.rng,
                                               listeners=listeners,
                                               max_retry_after=rt.config.max_retry_after)
        due.append((now + watch.first_delay, next(order), order_id))
    heapq.heapify(due)
    try:
        yield from start_notes(policy, listeners, watches, rt.clock.time())
        yield from _poll_due(metered, watches, due, order, max_in_flight, heartbeat, sweeper)
    finally:
        if heartbeat is not None:  # the waits still open when the consumer left
            heartbeat.release(list(watches))


#: The key of a sweep among the loop's sub-flows: no order id has a control character.
SWEEP_KEY = "\x00sweep"


def _poll_due(rt: _api.Runtime, watches: dict[str, OrderWatch],
              due: list[tuple[float, int, str]], order: Iterator[int], max_in_flight: int,
              heartbeat: Heartbeat | None, sweeper: Sweeper | None = None) -> Flow[None]:
    """:func:`wait_many_flow`'s loop: poll each order as it comes due, until every wait has
    ended; ``watches`` keeps the waits not yet ended."""
    in_flight = 0
    # Each order's one live entry in ``due``: a sweep moves polls, leaving stale entries.
    live = {order_id: seq for _, seq, order_id in due}

    def schedule(order_id: str, at: float) -> None:
        live[order_id] = seq = next(order)
        heapq.heappush(due, (at, seq, order_id))

    while live or in_flight:
        now = rt.clock.monotonic()
        if sweeper is not None and in_flight < max_in_flight \
                and sweeper.due(len(watches)) <= now:
            yield from Start(SWEEP_KEY, sweeper.begin(rt, now))
            in_flight += 1
        while due and due[0][0] <= now and in_flight < max_in_flight:
            _, seq, order_id = heapq.heappop(due)
            if live.get(order_id) != seq:
                continue
            watch = watches[order_id]
            if sweeper is not None:
                later = sweeper.defer(order_id, now, watch.deadline)
                if later is not None:
                    schedule(order_id, later)
                    continue
                sweeper.polling(order_id, now)
            del live[order_id]
            flow = with_heartbeat(_api.get_order(rt, order_id, deadline=watch.deadline,
                                                 priority=watch.priority), heartbeat)
            yield from Start(order_id, flow)
            in_flight += 1
        while due and live.get(due[0][2]) != due[0][1]:
            heapq.heappop(due)  # stale: wake for the live entries only
        wake = None
        if due and in_flight < max_in_flight:
            wake = max(0.0, due[0][0] - now)
            if sweeper is not None and (sweep_at := sweeper.due(len(watches))) < wake + now:
                wake = max(0.0, sweep_at - now)
        if heartbeat is not None:
            wake = heartbeat.due_in() if wake is None else min(wake, heartbeat.due_in())
        finished = yield from WaitAny(wake)
        if heartbeat is not None:
            yield from Notify(heartbeat.beat, ())
        now = rt.clock.monotonic()
        for order_id, outcome in finished:
            in_flight -= 1
            if sweeper is not None and order_id == SWEEP_KEY:
                for hinted, at in sweeper.listed(outcome, now, watches):
                    if hinted in live:  # not polling now
                        schedule(hinted, at)
                continue
            assert isinstance(outcome, (Order, Exception))  # a poll's order, or its error
            watch = watches[order_id]
            if sweeper is not None:
                sweeper.polled(order_id, outcome, now)
            decision = watch.record(outcome, now)
            yield from decision.notes
            if decision.finished:
                del watches[order_id]
                yield from Emit(WaitResult(order_id, decision.order, decision.error,
                                           watch.attempts, now - watch.started))
            else:
                schedule(order_id, now + decision.delay)
            if sweeper is not None:
                for restored, at in sweeper.released(len(watches), now):
                    if restored in live:
                        schedule(restored, at)
