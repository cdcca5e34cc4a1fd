"""``ProcrastinateRecoveryQueue``: the PostgreSQL recovery queue, with procrastinate running
the workers on many machines.

The job of an order is its row in foxpoll's table (:class:`PostgresRecoveryQueue`), never
a procrastinate job. procrastinate only carries *wake-ups*: "re-check order X, with token
T". A dispatcher, running beside every worker, reserves due rows with a fresh token and
defers one wake-up each; a wake-up takes its row only while the row still holds its
token. So:

- enqueueing is idempotent in every state (the row's primary key), and no
  procrastinate ``lock`` or ``queueing_lock`` is used: procrastinate's retries and its
  stalled-job rescue can never hit a uniqueness conflict (procrastinate issues #1050,
  #1446, #1543 describe what those locks do to a running job's retry);
- a duplicate or stale wake-up does nothing;
- a worker killed mid-job leaves its row's lease to run out; the dispatcher then wakes
  the row again: re-checked within one lease plus one dispatch period. procrastinate's
  own rescue (:meth:`retry_stalled_jobs`) runs in the same loop, so the dead worker's
  procrastinate job does not stay ``doing`` forever.

::

    queue = ProcrastinateRecoveryQueue("postgresql://...")
    queue.create_schema()                       # once, idempotent
    worker = RecoveryWorker(client, queue, store, on_completed=send_codes)
    queue.run_worker(worker)                    # on every machine (or run_worker_async)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from typing import Any

try:
    import procrastinate
    import psycopg_pool
    from procrastinate.exceptions import ConnectorException
except ImportError as exc:  # pragma: no cover - only without the extra
    raise ImportError(
        "ProcrastinateRecoveryQueue needs procrastinate: pip install 'foxpoll[procrastinate]'"
    ) from exc

from foxpoll._clock import Clock

from ._sql import job_from_row
from .base import RecoveryJob, RecoveryPolicy
from .postgres import DEFAULT_TABLE, PostgresRecoveryQueue
from .worker import RecoveryWorker

__all__ = ["ProcrastinateRecoveryQueue"]

log = logging.getLogger("foxpoll.recovery")

TASK_NAME = "foxpoll.recover_order"


class ProcrastinateRecoveryQueue(PostgresRecoveryQueue):
    """A recovery queue in PostgreSQL whose workers are procrastinate workers.

    Args:
        where: As for :class:`PostgresRecoveryQueue`.
        queue: The procrastinate queue the wake-ups go to.
        policy: The re-check policy, for this queue and its workers.
        table: foxpoll's job table, schema-qualified if need be (as for
            :class:`PostgresRecoveryQueue`).
        dispatch_every: Seconds between two rounds of the dispatcher (wake due jobs,
            rescue the jobs of dead procrastinate workers).
        stalled_after: Seconds without a heartbeat after which a procrastinate worker
            counts as dead and its jobs are retried.
        connect_timeout: As for :class:`PostgresRecoveryQueue`.
        max_connections: As for :class:`PostgresRecoveryQueue`.
        statement_timeout: As for :class:`PostgresRecoveryQueue`.
        clock: As for :class:`PostgresRecoveryQueue`.
    """

    def __init__(self, where: str | psycopg_pool.ConnectionPool[Any], *,
                 queue: str = "foxpoll-recovery", policy: RecoveryPolicy | None = None,
                 table: str = DEFAULT_TABLE, dispatch_every: float = 5.0,
                 stalled_after: float = 30.0, connect_timeout: float = 5.0,
                 max_connections: int = 4, statement_timeout: float = 5.0,
                 clock: Clock | None = None) -> None:
        super().__init__(where, policy=policy, table=table, connect_timeout=connect_timeout,
                         max_connections=max_connections,
                         statement_timeout=statement_timeout, clock=clock)
        if not dispatch_every > 0 or not stalled_after > 0:
            raise ValueError("dispatch_every and stalled_after must be positive")
        self.queue = queue
        self.dispatch_every = dispatch_every
        self.stalled_after = stalled_after
        if self.conninfo is None:
            raise TypeError("procrastinate needs the connection string: pass it, or a pool "
                            "whose conninfo is a string")
        self.app = procrastinate.App(
            connector=procrastinate.PsycopgConnector(conninfo=self.conninfo))
        self.task = self.app.task(name=TASK_NAME, queue=queue)(self._wake)
        self._worker: RecoveryWorker | None = None

    def create_schema(self) -> None:
        """Create procrastinate's schema (if missing) and foxpoll's job table."""
        with self._transaction() as execute:
            found = execute("SELECT to_regclass('procrastinate_jobs') AS t", {})
            if found[0]["t"] is None:
                execute(self.app.schema_manager.get_schema(), {})
        super().create_schema()

    # -- the work ------------------------------------------------------------------------

    def bind(self, worker: RecoveryWorker) -> None:
        """Have this queue's wake-ups run ``worker.process``."""
        if worker.queue is not self:
            raise ValueError("the worker works another queue")
        self._worker = worker

    def _wake(self, order_id: str, token: str) -> None:
        if self._worker is None:
            raise RuntimeError("no RecoveryWorker bound: call queue.bind(worker) first")
        job = self.take_dispatched(order_id, token, lease=self._worker.lease)
        if job is None:
            return  # stale: settled, taken by another wake-up, or dispatched anew
        self._worker.process(job)

    def take_dispatched(self, order_id: str, token: str, *, lease: float
                        ) -> RecoveryJob | None:
        """Lease the job a wake-up was dispatched for, if its row still holds ``token``."""
        row = self._one(self._sql.take_dispatched, order_id=order_id, token=token,
                        lease=lease)
        return job_from_row(row) if row else None

    def reserve_due(self, *, lease: float, limit: int = 500) -> tuple[str, list[str]]:
        """Reserve up to ``limit`` due jobs for ``lease`` seconds under one fresh token;
        return the token and the order ids."""
        token = uuid.uuid4().hex
        with self._transaction() as execute:
            rows = execute(self._sql.dispatch, {"token": token, "lease": lease,
                                                "limit": limit})
        return token, [row["order_id"] for row in rows]

    async def dispatch(self, *, lease: float, limit: int = 500) -> int:
        """Wake every due job: reserve them, then defer one wake-up each. Return how many.

        A wake-up lost between the two (a crash) leaves its row reserved until ``lease``
        runs out; a later round wakes it again.
        """
        token, order_ids = await asyncio.to_thread(self.reserve_due, lease=lease, limit=limit)
        if order_ids:
            wakeups: list[dict[str, Any]] = [{"order_id": order_id, "token": token}
                                             for order_id in order_ids]
            await self.task.batch_defer_async(*wakeups)
        return len(order_ids)

    async def retry_stalled_jobs(self, *, seconds_since_heartbeat: float | None = None) -> int:
        """procrastinate's rescue: retry the wake-ups of workers whose heartbeats stopped.
        Return how many. The app must be open (it is inside :meth:`run_worker_async`)."""
        stalled = await self.app.job_manager.get_stalled_jobs(
            queue=self.queue, task_name=TASK_NAME,
            seconds_since_heartbeat=seconds_since_heartbeat or self.stalled_after,
        )
        count = 0
        for job in stalled:
            try:
                await self.app.job_manager.retry_job(job)
                count += 1
            except ConnectorException:  # one bad job, not the batch
                log.exception("could not retry stalled wake-up %s", job.id)
        return count

    async def maintain(self, lease: float) -> None:
        """One dispatcher round: rescue dead workers' wake-ups, then wake due jobs."""
        rescued = await self.retry_stalled_jobs()
        woken = await self.dispatch(lease=lease)
        if rescued or woken:
            log.debug("recovery dispatcher: %d rescued, %d woken", rescued, woken)

    async def _maintain_forever(self, lease: float) -> None:
        # Real time, not the client's clock: the rounds keep pace with procrastinate's own
        # worker and with leases on the server's clock, which no fake clock moves.
        while True:
            await asyncio.sleep(self.dispatch_every)
            try:
                await self.maintain(lease)
            except Exception:  # the next round tries again; the worker keeps working
                log.exception("recovery dispatcher round failed")

    async def run_worker_async(self, worker: RecoveryWorker, **options: Any) -> None:
        """Run a procrastinate worker for this queue, with the dispatcher beside it.
        ``options`` go to ``App.run_worker_async`` (``concurrency``, ``wait``,
        ``update_heartbeat_interval``...); finished wake-ups are deleted unless
        ``delete_jobs`` says otherwise. With ``wait=False`` it returns once no job is due.
        """
        self.bind(worker)
        options.setdefault("delete_jobs", "successful")
        async with self.app.open_async():
            await self.maintain(worker.lease)
            dispatcher = asyncio.ensure_future(self._maintain_forever(worker.lease))
            try:
                await self.app.run_worker_async(queues=[self.queue], **options)
            finally:
                dispatcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await dispatcher

    def run_worker(self, worker: RecoveryWorker, **options: Any) -> None:
        """:meth:`run_worker_async`, blocking."""
        asyncio.run(self.run_worker_async(worker, **options))
