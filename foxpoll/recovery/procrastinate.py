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
  procrastinate job does not stay ``doing`` forever;
- an outage does not end :meth:`run_worker_async`. procrastinate's worker exits when a
  query fails on a lost connection (``ConnectorException``), or stops itself when a side
  task (its heartbeat, its LISTEN connection) does: either way it is started again after
  the worker's outage backoff, until a stop signal or a programming error.

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
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
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
from foxpoll._io import arun
from foxpoll._outages import PROGRAMMING_ERRORS, Outages
from foxpoll.errors import StoreUnavailable

from ._sql import job_from_row
from .base import RecoveryJob, RecoveryPolicy
from .postgres import DEFAULT_TABLE, PostgresRecoveryQueue
from .worker import PURGE_EVERY, RecoveryWorker

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
        connect_timeout: As for :class:`PostgresRecoveryQueue`; procrastinate's own pool
            waits as long for a connection, then fails (and its worker is restarted).
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
        self.app = procrastinate.App(connector=procrastinate.PsycopgConnector(
            conninfo=self.conninfo, timeout=connect_timeout))
        self.task = self.app.task(name=TASK_NAME, queue=queue)(self._wake)
        self._worker: RecoveryWorker | None = None
        # While run_worker_async runs: its loop, and the future a wake-up fails with a
        # programming error, which ends the run (procrastinate would only log it).
        self._fatal: tuple[asyncio.AbstractEventLoop, asyncio.Future[None]] | None = None

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
        try:
            self._worker.process(job)
        except PROGRAMMING_ERRORS as exc:
            self._end_run(exc)
            raise

    def _end_run(self, error: BaseException) -> None:
        """End :meth:`run_worker_async` with ``error``, a programming error of a wake-up
        (a callback that cannot take an order, say). procrastinate catches a task's
        exceptions and goes on with the next wake-up, which would fail the same way, each
        costing its job an attempt. Called from procrastinate's thread of the task."""
        if self._fatal is None:
            return
        loop, fatal = self._fatal

        def fail() -> None:
            if not fatal.done():
                fatal.set_exception(error)

        loop.call_soon_threadsafe(fail)

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

    async def maintain(self, worker: RecoveryWorker, *, purge: bool = True) -> None:
        """One dispatcher round: wake due jobs, rescue dead workers' wake-ups, and (with
        ``purge``) delete done jobs older than the worker's ``keep_done``."""
        # foxpoll's own statement first: it runs under statement_timeout, so a frozen
        # network fails the round (logged, counted, backed off). procrastinate's queries
        # have no deadline, and would only hang until the network came back.
        woken = await self.dispatch(lease=worker.lease)
        rescued = await self.retry_stalled_jobs()
        if rescued or woken:
            log.debug("recovery dispatcher: %d rescued, %d woken", rescued, woken)
        if purge:
            await asyncio.to_thread(worker.purge_done)

    async def _maintain_forever(self, worker: RecoveryWorker, outages: Outages) -> None:
        # Real time, not the client's clock: the rounds keep pace with procrastinate's own
        # worker and with leases on the server's clock, which no fake clock moves.
        last_purge = time.monotonic()  # the round before this loop purged
        pause = self.dispatch_every
        while True:
            await asyncio.sleep(pause)
            purge = time.monotonic() - last_purge >= PURGE_EVERY
            if purge:
                last_purge = time.monotonic()  # failed, it waits for its next turn
            try:
                await self.maintain(worker, purge=purge)
            except PROGRAMMING_ERRORS:
                raise
            except Exception as exc:  # an outage: the worker keeps working meanwhile
                pause = max(self.dispatch_every, outages.failed(exc))
                await arun(outages.count(exc))
            else:
                outages.succeeded()
                pause = self.dispatch_every

    async def run_worker_async(self, worker: RecoveryWorker, **options: Any) -> None:
        """Run a procrastinate worker for this queue, with the dispatcher beside it, until
        SIGINT or SIGTERM (or until cancelled).

        ``options`` go to ``App.run_worker_async`` (``concurrency``, ``wait``,
        ``update_heartbeat_interval``...); finished wake-ups are deleted unless
        ``delete_jobs`` says otherwise. With ``wait=False`` it returns once no job is due.

        It outlives outages: when procrastinate's worker ends on a database error, or
        stops by itself (a side task lost its connection), it is started again after the
        worker's ``outage_backoff``; each restart is counted on
        ``on_worker_error("recovery", ...)`` and the outage logged once. A failed
        dispatcher round is counted as ``"dispatcher"`` and the next round waits
        ``dispatch_every`` or the backoff, whichever is longer.

        Signals are handled here, not by procrastinate (``install_signal_handlers``, True
        by default, says whether to; only in the main thread): the first SIGINT or
        SIGTERM stops the worker gracefully, letting running wake-ups finish, and a
        second one acts as usual.

        Raises:
            TypeError: and the other programming errors (see
                :data:`~foxpoll._outages.PROGRAMMING_ERRORS`), from procrastinate's
                worker, the dispatcher, or a wake-up (a callback that cannot be called
                with an order): the wake-ups running then are let finish, and no other
                is started.
        """
        self.bind(worker)
        options.setdefault("delete_jobs", "successful")
        wait = options.get("wait", True)
        handle_signals = options.pop("install_signal_handlers", True)
        options["install_signal_handlers"] = False  # so this loop tells a stop from a crash
        stop = asyncio.Event()
        restarts = worker._outages("recovery", "procrastinate worker", clock=time.monotonic)
        rounds = worker._outages("dispatcher", "recovery dispatcher", clock=time.monotonic)
        with _stop_on_signals(stop.set, enabled=handle_signals):
            while True:
                try:
                    await self._run_once(worker, options, stop, restarts, rounds)
                    if stop.is_set() or not wait:
                        return
                    error: Exception = StoreUnavailable(
                        "procrastinate's worker stopped by itself (a side task failed)")
                except PROGRAMMING_ERRORS:
                    raise
                except Exception as exc:
                    if stop.is_set():  # it failed while stopping: stopped all the same
                        return
                    error = exc
                wait = restarts.failed(error)
                await arun(restarts.count(error))
                with contextlib.suppress(asyncio.TimeoutError):  # waited: start again
                    await asyncio.wait_for(stop.wait(), wait)
                if stop.is_set():
                    return

    async def _run_once(self, worker: RecoveryWorker, options: dict[str, Any],
                        stop: asyncio.Event, restarts: Outages, rounds: Outages) -> None:
        """procrastinate's worker and the dispatcher, from opening the app until the worker
        ends, the dispatcher fails for good, or ``stop`` is set."""
        async with self.app.open_async():
            await self.maintain(worker)
            restarts.succeeded()  # the database answers again
            rounds.succeeded()
            loop = asyncio.get_running_loop()
            fatal: asyncio.Future[None] = loop.create_future()
            self._fatal = (loop, fatal)
            tasks: list[asyncio.Future[Any]] = [
                fatal,
                asyncio.ensure_future(self.app.run_worker_async(queues=[self.queue],
                                                                **options)),
                asyncio.ensure_future(self._maintain_forever(worker, rounds)),
                asyncio.ensure_future(stop.wait())]
            try:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                self._fatal = None
                for task in tasks:  # procrastinate's worker stops gracefully when cancelled
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            for task in tasks[:3]:
                error = None if task.cancelled() else task.exception()
                if error is not None:
                    raise error

    def run_worker(self, worker: RecoveryWorker, **options: Any) -> None:
        """:meth:`run_worker_async`, blocking."""
        asyncio.run(self.run_worker_async(worker, **options))


@contextlib.contextmanager
def _stop_on_signals(stop: Callable[[], None], *, enabled: bool) -> Iterator[None]:
    """Call ``stop`` on the first SIGINT or SIGTERM; the handlers that were there before
    are back from then on (and on exit). Only in the main thread, and not on Windows, where
    the event loop cannot take signals."""
    if not enabled or os.name == "nt" or threading.current_thread() is not threading.main_thread():
        yield
        return
    loop = asyncio.get_running_loop()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for sig, handler in previous.items():
            if loop.remove_signal_handler(sig) and handler is not None:
                signal.signal(sig, handler)

    def on_signal() -> None:
        restore()
        stop()

    for sig in previous:
        loop.add_signal_handler(sig, on_signal)
    try:
        yield
    finally:
        restore()
