"""The recovery-queue contract: jobs keyed by order id, retried on a schedule, never dropped.

::

    enqueue ──> QUEUED ──take (leased)──> re-check ──> DONE        (completed: delivered;
                  ^                          │                      failed / cancelled:
                  │                          ├──> QUEUED, later     handed over)
               requeue                       │    (still pending: attempts + 1)
                  │                          └──> DEAD            (attempts used up)
                DEAD ──close(reason)──> CLOSED

A job is leased while a worker handles it; a worker that dies leaves the lease to expire
and the job is taken again. Re-enqueueing a queued order changes nothing (the earlier due
time wins); a dead or closed order comes back only through :meth:`RecoveryQueue.requeue`.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Iterable
from typing import Any, TypeVar

import attrs

from foxpoll.polling import WaitResult

__all__ = ["JobQueue", "JobState", "RecoveryJob", "RecoveryQueue"]

Q = TypeVar("Q", bound="RecoveryQueue")


class JobState(str, enum.Enum):
    QUEUED = "queued"
    DONE = "done"
    DEAD = "dead"
    CLOSED = "closed"


@attrs.frozen
class RecoveryJob:
    """One order under recovery.

    Attributes:
        order_id: The order.
        state: See :class:`JobState`.
        attempts: Re-checks made so far.
        due_at: When it is next due (seconds since the epoch).
        reason: Why it was enqueued (``stalled``, ``sweep``, ``requeued``...).
        last_status: The order's status at the last re-check.
        last_error: The last re-check's error, if it failed.
        note: The final status (DONE) or the reason it was closed (CLOSED).
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


class RecoveryQueue(abc.ABC):
    """Where stalled orders wait for their next re-check: what every engine offers."""

    @abc.abstractmethod
    def enqueue(self, order_id: str, *, reason: str = "stalled", due_at: float | None = None
                ) -> bool:
        """Queue ``order_id`` (due now by default). False when it was already known."""

    @abc.abstractmethod
    def list_dead(self, *, limit: int = 100) -> list[RecoveryJob]:
        """The dead letters: orders whose re-checks ran out, for on-call to act on."""

    @abc.abstractmethod
    def requeue(self, order_id: str) -> RecoveryJob:
        """Give a dead (or closed) order a fresh set of attempts, due now.

        Raises:
            KeyError: no such dead letter.
        """

    @abc.abstractmethod
    def close(self, order_id: str, reason: str) -> RecoveryJob:
        """Settle a dead order by hand (refunded, delivered another way...): CLOSED.

        Raises:
            KeyError: no such job.
            ValueError: the job is not dead.
        """

    def on_finish(self, result: WaitResult) -> None:
        """A ``wait_for_completion`` / ``wait_many`` hook: enqueue orders that stalled."""
        if result.stalled:
            self.enqueue(result.order_id, reason="stalled")

    def sweep(self, pending: Iterable[tuple[str, float]], *, now: float,
              older_than: float = 600.0) -> int:
        """Enqueue the orders your records show as non-terminal for longer than
        ``older_than`` seconds; ``pending`` yields ``(order_id, since)`` pairs (epoch
        seconds). Returns how many were newly queued."""
        return sum(self.enqueue(order_id, reason="sweep")
                   for order_id, since in pending if now - since > older_than)

    def close_connections(self) -> None:  # noqa: B027 - optional
        """Release what the queue holds open."""

    def __enter__(self: Q) -> Q:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close_connections()


class JobQueue(RecoveryQueue):
    """A recovery queue that workers pull from (:meth:`RecoveryWorker.run_pending`)."""

    @abc.abstractmethod
    def take(self, *, lease: float = 300.0) -> RecoveryJob | None:
        """The next due job, leased to the caller for ``lease`` seconds; None if none is due."""

    @abc.abstractmethod
    def retry(self, order_id: str, *, due_at: float, last_status: str | None,
              last_error: str | None) -> RecoveryJob:
        """Count a re-check and queue the job again for ``due_at``."""

    @abc.abstractmethod
    def finish(self, order_id: str, *, final_status: str) -> RecoveryJob:
        """The order reached ``final_status`` and was handled: DONE."""

    @abc.abstractmethod
    def bury(self, order_id: str, *, last_status: str | None, last_error: str | None
             ) -> RecoveryJob:
        """Attempts used up: move to the dead letters."""

    @abc.abstractmethod
    def get(self, order_id: str) -> RecoveryJob | None:
        """The job, or None."""

    @abc.abstractmethod
    def jobs(self, state: JobState, *, limit: int = 100) -> list[RecoveryJob]:
        """Jobs in ``state``, oldest change first."""

    def list_dead(self, *, limit: int = 100) -> list[RecoveryJob]:
        return self.jobs(JobState.DEAD, limit=limit)


def require_text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > 256:
        raise ValueError(f"{what} must be a non-empty string of at most 256 characters")
    return value
