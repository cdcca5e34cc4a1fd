"""``ProcrastinateRecoveryQueue``: recovery on PostgreSQL with procrastinate, for many
workers on many machines.

Each stalled order is one procrastinate job, locked by its order id (``queueing_lock``), so
enqueueing it again while it waits changes nothing. The job runs
:meth:`RecoveryWorker.recheck`. While the order is pending it raises :class:`StillPending`,
and :class:`CappedRetry` schedules the next run after the policy's wait. procrastinate's
own exponential retry has no cap; this one never waits longer than the policy's ``cap``.
When the attempts run out, the order goes to a dead-letter table
(``foxpoll_dead_letters``) that operations list, requeue or close. A worker that dies
mid-job stops sending heartbeats; :meth:`retry_stalled_jobs` (run it periodically) gives
its jobs back.

::

    queue = ProcrastinateRecoveryQueue("postgresql://...")
    queue.create_schema()                       # once, idempotent
    worker = RecoveryWorker(client, queue, store, on_completed=send_codes)
    queue.run_worker(worker)                    # on every machine
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import attrs

try:
    import procrastinate
    import psycopg
    from procrastinate import RetryDecision
    from procrastinate.exceptions import AlreadyEnqueued, AppNotOpen
    from psycopg.rows import dict_row
except ImportError as exc:  # pragma: no cover - only without the extra
    raise ImportError(
        "ProcrastinateRecoveryQueue needs procrastinate: pip install 'foxpoll[procrastinate]'"
    ) from exc

from foxpoll.backoff import MeanRandom

from .base import JobState, RecoveryJob, RecoveryQueue, require_text
from .worker import RecoveryPolicy, RecoveryWorker

__all__ = ["CappedRetry", "ProcrastinateRecoveryQueue", "StillPending"]

log = logging.getLogger("foxpoll.recovery")

TASK_NAME = "foxpoll.recover_order"

_DEAD_SCHEMA = """
CREATE TABLE IF NOT EXISTS {table} (
    order_id     TEXT PRIMARY KEY,
    state        TEXT NOT NULL CHECK (state IN ('dead', 'closed', 'requeued')),
    attempts     INTEGER NOT NULL,
    reason       TEXT NOT NULL DEFAULT '',
    last_status  TEXT,
    last_error   TEXT,
    note         TEXT,
    created_at   DOUBLE PRECISION NOT NULL,
    updated_at   DOUBLE PRECISION NOT NULL
)"""
_NOW = "EXTRACT(EPOCH FROM statement_timestamp())::double precision"


class StillPending(Exception):  # a signal to the retry strategy, not an error
    """Raised by the recovery task to be run again after ``delay`` seconds."""

    def __init__(self, order_id: str, delay: float) -> None:
        super().__init__(f"order {order_id} is still pending")
        self.order_id = order_id
        self.delay = delay


class CappedRetry(procrastinate.BaseRetryStrategy):
    """Retry after the wait the task asks for (:class:`StillPending`), never longer than
    ``cap``; other errors get the policy's wait for that attempt, until attempts run out."""

    def __init__(self, policy: RecoveryPolicy, cap: float) -> None:
        self.policy = policy
        self.cap = cap

    def get_retry_decision(self, *, exception: BaseException, job: Any) -> RetryDecision | None:
        if isinstance(exception, StillPending):
            delay = exception.delay
        elif job.attempts + 1 >= self.policy.max_attempts:
            return None  # an unexpected error, every time: procrastinate marks it failed
        else:
            delay = self.policy.delay(job.attempts + 1, MeanRandom())
        return RetryDecision(retry_in={"seconds": int(min(max(1.0, delay), self.cap))})


class ProcrastinateRecoveryQueue(RecoveryQueue):
    """A recovery queue of procrastinate jobs in PostgreSQL.

    Args:
        conninfo: A libpq connection string.
        queue: The procrastinate queue the jobs go to.
        policy: Attempts and waits (as for :class:`RecoveryWorker`).
        dead_table: The dead-letter table.
    """

    def __init__(self, conninfo: str, *, queue: str = "foxpoll-recovery",
                 policy: RecoveryPolicy | None = None,
                 dead_table: str = "foxpoll_dead_letters") -> None:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", dead_table):
            raise ValueError("dead_table must be a plain SQL identifier")
        self.conninfo = conninfo
        self.queue = queue
        self.policy = policy or RecoveryPolicy()
        self.dead_table = dead_table
        self.app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=conninfo))
        cap = float(getattr(self.policy.backoff, "cap", 3600.0))
        self.task = self.app.task(name=TASK_NAME, queue=queue, pass_context=True,
                                  retry=CappedRetry(self.policy, cap))(self._recover)
        self._worker: RecoveryWorker | None = None

    # -- set-up ------------------------------------------------------------------------

    def create_schema(self) -> None:
        """Create procrastinate's schema (if missing) and the dead-letter table."""
        with self._sql() as conn:
            exists = conn.execute("SELECT to_regclass('procrastinate_jobs') AS t").fetchone()
            if exists is None or exists["t"] is None:
                conn.execute(self.app.schema_manager.get_schema())
            conn.execute(_DEAD_SCHEMA.format(table=self.dead_table))

    def close_connections(self) -> None:
        """Nothing stays open between calls: each defer and each worker opens its own."""

    @contextmanager
    def _sql(self) -> Iterator[psycopg.Connection[Any]]:
        with psycopg.connect(self.conninfo, autocommit=True, row_factory=dict_row) as conn:
            yield conn

    # -- the queue -----------------------------------------------------------------------

    def enqueue(self, order_id: str, *, reason: str = "stalled", due_at: float | None = None
                ) -> bool:
        require_text(order_id, "order id")
        with self._sql() as conn:
            dead = conn.execute(f"SELECT state FROM {self.dead_table} WHERE order_id = %s"  # noqa: S608
                                " AND state IN ('dead', 'closed')", (order_id,)).fetchone()
        if dead is not None:
            return False  # dead letters come back only through requeue()
        return self._defer(order_id, reason, due_at)

    def _defer(self, order_id: str, reason: str, due_at: float | None) -> bool:
        options: dict[str, Any] = {"queueing_lock": order_id, "lock": order_id}
        if due_at is not None:
            options["schedule_in"] = {"seconds": max(0, int(due_at - time.time()))}
        job = self.task.configure(**options)
        try:
            try:
                job.defer(order_id=order_id, reason=reason)
            except AppNotOpen:
                with self.app.open():
                    job.defer(order_id=order_id, reason=reason)
        except AlreadyEnqueued:
            return False
        return True

    def list_dead(self, *, limit: int = 100) -> list[RecoveryJob]:
        with self._sql() as conn:
            rows = conn.execute(
                f"SELECT * FROM {self.dead_table} WHERE state = 'dead' "  # noqa: S608
                "ORDER BY updated_at, order_id LIMIT %s", (limit,)).fetchall()
        return [_job(row) for row in rows]

    def requeue(self, order_id: str) -> RecoveryJob:
        with self._sql() as conn:
            row = conn.execute(
                f"UPDATE {self.dead_table} SET state = 'requeued', updated_at = {_NOW} "  # noqa: S608
                "WHERE order_id = %s AND state IN ('dead', 'closed') RETURNING *",
                (order_id,)).fetchone()
        if row is None:
            raise KeyError(order_id)
        self._defer(order_id, "requeued", None)
        return attrs.evolve(_job(row), state=JobState.QUEUED, attempts=0, reason="requeued")

    def close(self, order_id: str, reason: str) -> RecoveryJob:
        require_text(reason, "reason")
        with self._sql() as conn:
            row = conn.execute(
                f"UPDATE {self.dead_table} SET state = 'closed', note = %s, "  # noqa: S608
                f"updated_at = {_NOW} WHERE order_id = %s AND state = 'dead' RETURNING *",
                (reason, order_id)).fetchone()
            if row is None:
                exists = conn.execute(f"SELECT state FROM {self.dead_table} "  # noqa: S608
                                      "WHERE order_id = %s", (order_id,)).fetchone()
        if row is None:
            if exists is None:
                raise KeyError(order_id)
            raise ValueError(f"order {order_id} is {exists['state']}, not dead")
        return _job(row)

    def _bury(self, order_id: str, attempts: int, status: str | None, error: str | None,
              reason: str) -> None:
        with self._sql() as conn:
            conn.execute(
                f"INSERT INTO {self.dead_table} (order_id, state, attempts, reason, "  # noqa: S608
                f"last_status, last_error, created_at, updated_at) VALUES (%s, 'dead', %s, %s,"
                f" %s, %s, {_NOW}, {_NOW}) ON CONFLICT (order_id) DO UPDATE SET state = 'dead',"
                " attempts = EXCLUDED.attempts, last_status = EXCLUDED.last_status, "
                "last_error = EXCLUDED.last_error, note = NULL, updated_at = EXCLUDED.updated_at",
                (order_id, attempts, reason, status, error))

    # -- the work ------------------------------------------------------------------------

    def bind(self, worker: RecoveryWorker) -> None:
        """Have this queue's jobs run ``worker.recheck``."""
        self._worker = worker

    def _recover(self, context: Any, order_id: str, reason: str = "stalled") -> None:
        if self._worker is None:
            raise RuntimeError("no RecoveryWorker bound: call queue.bind(worker) first")
        attempts = int(context.job.attempts)
        checked = self._worker.recheck(order_id, attempts)
        kind = checked.action.kind
        if kind == "dead":
            self._bury(order_id, attempts + 1, checked.status, checked.error, reason)
        elif kind == "retry":
            raise StillPending(order_id, checked.action.delay)

    def run_worker(self, worker: RecoveryWorker, **options: Any) -> None:
        """Run a procrastinate worker for this queue (blocking). ``options`` go to
        ``App.run_worker`` (``concurrency``, ``wait``, ``update_heartbeat_interval``...)."""
        self.bind(worker)
        self.app.run_worker(queues=[self.queue], **options)

    async def retry_stalled_jobs(self, *, seconds_since_heartbeat: float = 30.0) -> int:
        """Give back the jobs of workers that stopped sending heartbeats; return how many."""
        async with self.app.open_async() as app:
            stalled = await app.job_manager.get_stalled_jobs(
                queue=self.queue, task_name=TASK_NAME,
                seconds_since_heartbeat=seconds_since_heartbeat,
            )
            count = 0
            for job in stalled:
                await app.job_manager.retry_job(job)
                count += 1
        return count


def _job(row: dict[str, Any]) -> RecoveryJob:
    state = {"dead": JobState.DEAD, "closed": JobState.CLOSED}.get(row["state"], JobState.QUEUED)
    return RecoveryJob(order_id=row["order_id"], state=state, attempts=row["attempts"],
                       reason=row["reason"], last_status=row["last_status"],
                       last_error=row["last_error"], note=row["note"],
                       created_at=row["created_at"], updated_at=row["updated_at"])
