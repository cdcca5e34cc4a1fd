"""The recovery-queue contract: jobs keyed by order id, retried on a schedule, never dropped.

::

    watch ────> QUEUED (reason "watch", due one lease after its process last renewed it)
                  │  the wait ends: failed / cancelled ──> DONE
                  │                 completed ──> QUEUED (reason "delivery", due after
                  │                               the policy's delivery_grace)
    enqueue ──> QUEUED ──take (leased)──> re-check ──> DONE        (completed: delivered;
                  ^      attempts + 1        │                      failed / cancelled:
                  │                          ├──> QUEUED, later     handed over)
               requeue                       │    (still pending, or the re-check failed)
                  │                          └──> DEAD            (attempts used up)
                DEAD ──resolve(reason)──> RESOLVED

Taking a job counts an attempt, so a re-check that never ends (its worker killed, its
lease run out) is counted too, and a job taken with its attempts already used up is
dead-lettered instead of re-checked: no job, however it fails, is re-checked more than
``max_attempts`` times.

A job is leased while a worker handles it; a worker that dies leaves the lease to expire
and the job is taken again. There is one row per order, so enqueueing is idempotent in
every state: a queued order keeps the earlier of the two due times, a running one keeps
its lease, and a dead or resolved one comes back only through :meth:`RecoveryQueue.requeue`.

A *watch* is how a paid order outlives the process waiting for it: the client records it
before paying and when a wait starts, due one ``watch_lease`` later, and renews the
watches of all its live waits in one write per process every third of a lease. A wait
that ends settles its own watch (and only a watch: a job already under recovery is the
worker's); a wait that dies with its process stops renewing it, the watch fires within a
lease, and a :class:`~foxpoll.recovery.RecoveryWorker` finishes the order.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import itertools
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

import attrs

from foxpoll.backoff import BackoffPolicy, ExponentialJitter, _non_negative
from foxpoll.errors import StoreError
from foxpoll.models import OrderStatus
from foxpoll.polling import WaitResult

__all__ = ["JobQueue", "JobState", "RecoveryJob", "RecoveryPolicy", "RecoveryQueue",
           "UnreadableJobs"]

DEFAULT_RECOVERY_BACKOFF = ExponentialJitter(base=30.0, factor=2.0, cap=3600.0, jitter=0.3)
DELIVERY = "delivery"  # the reason of a watch whose wait saw the order completed


def _positive(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value > 0 or math.isinf(value):  # also rejects NaN
        raise ValueError(f"{attribute.name} must be a finite number > 0, not {value!r}")


def _non_negative_or_none(instance: object, attribute: attrs.Attribute[Any],
                          value: float | None) -> None:
    if value is not None:
        _non_negative(instance, attribute, value)


@attrs.frozen
class RecoveryPolicy:
    """How often to re-check a stalled order, and for how long. Give it to the queue; the
    workers read it from there.

    The default: 8 re-checks, waiting 30 s, 60 s, 120 s... (doubling, capped at an hour)
    plus up to 30 %, about two hours in all before the order is dead-lettered.

    Attributes:
        max_attempts: Re-checks a job may begin (each take counts one) before the order
            is dead-lettered.
        backoff: The waits between re-checks.
        watch_margin: Seconds past its wait's horizon (or, for a payment not yet waited
            on, the horizon of a wait on the client's ``wait_policy``) during which a live
            process still renews a watch: room for the wait's last HTTP request and its
            ``on_finish``. A wait that runs longer (retrying errors) lets its watch fire.
        watch_lease: Seconds a watch stays unfired after the last renewal by its process
            (60 by default): the bound on how soon a crashed process's orders are
            re-checked. A process renews its live watches every third of it, in one write.
        delivery_grace: Seconds after a wait saw the order completed before a worker
            checks that its codes were delivered (the dedup store says so, or it delivers
            them). None settles the watch at once, for callers who deliver before the wait
            returns.
    """

    max_attempts: int = 8
    backoff: BackoffPolicy = attrs.field(default=DEFAULT_RECOVERY_BACKOFF)
    watch_margin: float = attrs.field(default=120.0, validator=_non_negative)
    watch_lease: float = attrs.field(default=60.0, validator=_positive, kw_only=True)
    delivery_grace: float | None = attrs.field(default=300.0, validator=_non_negative_or_none)

    def __attrs_post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) \
                or self.max_attempts < 1:
            raise ValueError("max_attempts must be a whole number, at least 1")

    def delay(self, attempt: int, rng: random.Random) -> float:
        """The wait after re-check number ``attempt`` (from 1)."""
        return next(itertools.islice(self.backoff.delays(rng), attempt - 1, None))

Q = TypeVar("Q", bound="RecoveryQueue")


class JobState(str, enum.Enum):
    QUEUED = "queued"
    DONE = "done"
    DEAD = "dead"
    RESOLVED = "resolved"


@attrs.frozen
class RecoveryJob:
    """One order under recovery.

    Attributes:
        order_id: The order.
        state: See :class:`JobState`.
        attempts: Re-checks begun so far: one per take, finished or not.
        due_at: When it is next due (seconds since the epoch).
        reason: Why it was enqueued (``stalled``, ``sweep``, ``requeued``...).
        last_status: The order's status at the last re-check.
        last_error: The last re-check's error, if it failed.
        note: The final status (DONE) or the reason it was resolved (RESOLVED).
        locked_until: While a worker holds the job, when its lease ends.
    """

    order_id: str
    state: JobState
    attempts: int = 0
    due_at: float = 0.0
    reason: str = ""
    last_status: str | None = None
    last_error: str | None = None
    note: str | None = None
    created_at: float | None = None
    updated_at: float | None = None
    locked_until: float | None = None

    def running(self, now: float) -> bool:
        """A worker holds it (its lease has not run out)."""
        return self.state is JobState.QUEUED and (self.locked_until or 0.0) > now


class UnreadableJobs(StoreError):
    """Queue rows that cannot be read as jobs: a value of the wrong type, such as a
    ``locked_until`` that is not a number (a row written by hand or by another program).

    Attributes:
        unreadable: Each such row's order id, and which column is wrong and how, by its
            type, never its value (``{"o7": "locked_until is a str, not a number"}``).
        jobs: The rows of the same call that could be read: one bad row hides no other.
    """

    def __init__(self, unreadable: Mapping[str, str], *,
                 jobs: Sequence[RecoveryJob] = ()) -> None:
        self.unreadable = dict(unreadable)
        self.jobs = list(jobs)
        said = [f"order {order_id}: unreadable row ({what})"
                for order_id, what in list(self.unreadable.items())[:3]]
        if len(self.unreadable) > 3:
            said.append(f"and {len(self.unreadable) - 3} more")
        super().__init__("; ".join(said))


class RecoveryQueue(abc.ABC):
    """Where stalled orders wait for their next re-check: what every engine offers.

    ``policy`` is this queue object's :class:`RecoveryPolicy`. The processes sharing one
    table need not agree on it: a row carries what its job needs (its due time, written by
    whoever wrote the row, and its attempts), so a buyer's policy shapes only the due
    times it writes (``watch_lease``, ``watch_margin``, ``delivery_grace``), and a
    worker's only the re-checks it runs (``max_attempts``, ``backoff``).
    """

    policy: RecoveryPolicy = RecoveryPolicy()

    @abc.abstractmethod
    def enqueue(self, order_id: str, *, reason: str = "stalled", due_at: float | None = None
                ) -> bool:
        """Queue ``order_id`` (due now by default). False when it was already known."""

    @abc.abstractmethod
    def list_dead(self, *, limit: int = 100) -> list[RecoveryJob]:
        """The dead letters: orders whose re-checks ran out, for on-call to act on.

        Raises:
            UnreadableJobs: some rows could not be read; it carries the ones that could.
        """

    @abc.abstractmethod
    def requeue(self, order_id: str) -> RecoveryJob:
        """Give a dead (or resolved) order a fresh set of attempts, due now.

        Raises:
            KeyError: no such dead letter.
        """

    @abc.abstractmethod
    def resolve(self, order_id: str, reason: str) -> RecoveryJob:
        """Settle a dead order by hand (refunded, delivered another way...): RESOLVED, with
        ``reason`` on record.

        Raises:
            KeyError: no such job.
            ValueError: the job is not dead.
        """

    @abc.abstractmethod
    def watch(self, order_id: str, *, due_at: float, replace: bool = True) -> bool:
        """Record that a wait is on ``order_id`` and would give up before ``due_at``: if
        nothing settles it by then, the job fires as a recovery job. Re-watching sets the
        due time (the wait that started last knows best), unless ``replace`` is False (a
        payment's guess, which never overrides a wait's); a job already under recovery is
        left as it is. True when the watch was recorded or moved."""

    @abc.abstractmethod
    def settle(self, order_id: str, *, status: str) -> bool:
        """A wait saw the watched order finish with ``status``: failed or cancelled is
        DONE; completed waits ``policy.delivery_grace`` for its delivery to be confirmed.
        Only a watch is settled. True when it was."""

    @abc.abstractmethod
    def unwatch(self, order_id: str) -> bool:
        """Drop a watch that nothing has acted on (the payment it guarded was refused)."""

    def on_finish(self, result: WaitResult) -> None:
        """A wait's ``on_finish`` hook: enqueue an order that stalled; settle the watch of
        one that finished."""
        if result.stalled:
            self.enqueue(result.order_id, reason="stalled")
        elif result.order is not None and result.order.status.is_terminal:
            self.settle(result.order_id, status=result.order.status.value)

    def settled_status(self, status: str) -> tuple[str, float | None]:
        """Where :meth:`settle` moves a watch: ``("done", None)``, or ``("queued", grace)``
        for a completed order whose delivery is still to be confirmed."""
        if status == OrderStatus.COMPLETED.value and self.policy.delivery_grace is not None:
            return "queued", self.policy.delivery_grace
        return "done", None

    def sweep(self, pending: Iterable[tuple[str, float]], *, now: float,
              older_than: float = 600.0) -> int:
        """Enqueue the orders your records show as non-terminal for longer than
        ``older_than`` seconds; ``pending`` yields ``(order_id, since)`` pairs (epoch
        seconds). Returns how many were newly queued."""
        return sum(self.enqueue(order_id, reason="sweep")
                   for order_id, since in pending if now - since > older_than)

    @abc.abstractmethod
    def get(self, order_id: str) -> RecoveryJob | None:
        """The job, or None.

        Raises:
            UnreadableJobs: its row cannot be read.
        """

    @abc.abstractmethod
    def jobs(self, state: JobState, *, limit: int = 100) -> list[RecoveryJob]:
        """Jobs in ``state``, oldest change first.

        Raises:
            UnreadableJobs: some rows could not be read; it carries the ones that could.
        """

    def close(self) -> None:  # noqa: B027 - optional
        """Release what the queue holds open (a pool you passed in stays open)."""

    async def aclose(self) -> None:
        """:meth:`close`, in a worker thread so the event loop never waits on it."""
        await asyncio.to_thread(self.close)

    def __enter__(self: Q) -> Q:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self: Q) -> Q:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @abc.abstractmethod
    def renew(self, order_ids: Iterable[str], *, due_at: float) -> int:
        """Move the watches of ``order_ids`` to ``due_at``: a live process's heartbeat, one
        write for all its waits. Only a queued watch moves (a job under recovery is the
        worker's; an unknown id is skipped). Returns how many moved."""

    def delete_done(self, *, older_than: float, limit: int = 500) -> int:
        """Delete up to ``limit`` DONE jobs whose last change is more than ``older_than``
        seconds old; return how many. Queued, dead and resolved jobs are never deleted.

        The retention primitive, run by :meth:`RecoveryWorker.purge_done`. This default
        keeps everything (it deletes nothing and returns 0): an engine that stores its
        jobs overrides it, as the SQL engines do.
        """
        return 0


class JobQueue(RecoveryQueue):
    """A recovery queue that workers pull from (:meth:`RecoveryWorker.run_pending`)."""

    @abc.abstractmethod
    def take(self, *, lease: float = 300.0) -> RecoveryJob | None:
        """The next due job, leased to the caller for ``lease`` seconds, with its attempts
        counted (the returned job's ``attempts`` includes this re-check); None if none is
        due."""

    @abc.abstractmethod
    def retry(self, order_id: str, *, due_at: float, last_status: str | None,
              last_error: str | None, attempt_spent: bool = True) -> RecoveryJob:
        """Record a re-check's outcome and queue the job again for ``due_at``. Its take
        counted the attempt; ``attempt_spent=False`` gives it back, for a re-check that
        sent no request (the request budget was unavailable).

        Raises:
            KeyError: no such job.
            ValueError: the job is no longer queued (its wait settled it meanwhile).
        """

    @abc.abstractmethod
    def finish(self, order_id: str, *, final_status: str) -> RecoveryJob:
        """The order reached ``final_status`` and was handled: DONE."""

    @abc.abstractmethod
    def bury(self, order_id: str, *, last_status: str | None, last_error: str | None
             ) -> RecoveryJob:
        """Attempts used up: move to the dead letters, with the last status and error.

        Raises:
            KeyError: no such job.
            ValueError: the job is no longer queued.
        """

    def list_dead(self, *, limit: int = 100) -> list[RecoveryJob]:
        return self.jobs(JobState.DEAD, limit=limit)


def require_text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > 256:
        raise ValueError(f"{what} must be a non-empty string of at most 256 characters")
    return value
