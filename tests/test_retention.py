"""Done jobs are deleted after ``keep_done``, in small batches; dead and resolved ones stay."""

from __future__ import annotations

import sqlite3
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from foxpoll import FoxReload
from foxpoll.dedup import MemoryDedupStore
from foxpoll.recovery import JobState, RecoveryWorker, SQLiteRecoveryQueue
from foxpoll.recovery.worker import KEEP_DONE, PURGE_BATCH, PURGE_BATCHES, PURGE_EVERY
from foxpoll.testing import FakeClock, FakeFoxReload

from .services import POSTGRES_URL, drop_table, require

DAY = 86400.0
COLUMNS = "order_id, state, attempts, due_at, reason, created_at, updated_at"


class CountingQueue(SQLiteRecoveryQueue):
    """A real SQLite queue that records the batches its retention statements deleted."""

    batches: list[int]

    def delete_done(self, *, older_than: float, limit: int = 500) -> int:
        deleted = super().delete_done(older_than=older_than, limit=limit)
        self.__dict__.setdefault("batches", []).append(deleted)
        return deleted


def rows(path: Path, state: str, count: int, *, at: float, prefix: str) -> None:
    """``count`` jobs in ``state``, last changed at ``at``, written straight to the table."""
    db = sqlite3.connect(path)
    try:
        with db:
            db.executemany(
                f"INSERT INTO foxpoll_recovery ({COLUMNS}) "  # noqa: S608 - fixed names
                "VALUES (?, ?, 1, ?, '', ?, ?)",
                [(f"{prefix}{n}", state, at, at, at) for n in range(count)])
    finally:
        db.close()


def states(queue: SQLiteRecoveryQueue) -> dict[str, int]:
    return {state.value: len(queue.jobs(state, limit=100_000)) for state in JobState}


@pytest.fixture
def client(sim: FakeFoxReload) -> Iterator[FoxReload]:
    with sim.client() as opened:
        yield opened


def test_done_jobs_older_than_keep_done_go_in_batches_the_rest_stay(
    tmp_path: Path, clock: FakeClock, client: FoxReload,
) -> None:
    path = tmp_path / "q.db"
    with CountingQueue(path, clock=clock) as queue:
        old = clock.time() - 31 * DAY
        rows(path, "done", 1200, at=old, prefix="old-")
        rows(path, "dead", 3, at=old, prefix="dead-")
        rows(path, "resolved", 2, at=old, prefix="resolved-")
        rows(path, "done", 7, at=clock.time() - 29 * DAY, prefix="recent-")
        queue.enqueue("queued")
        worker = RecoveryWorker(client, queue, MemoryDedupStore(), on_completed=print)
        assert worker.keep_done == KEEP_DONE == 30 * DAY
        assert worker.purge_done() == 1200
        assert queue.batches == [PURGE_BATCH, PURGE_BATCH, 200]  # short statements
        assert states(queue) == {"queued": 1, "done": 7, "dead": 3, "resolved": 2}
        assert worker.purge_done() == 0
        clock.advance(2 * DAY)  # the recent ones come of age
        assert worker.purge_done() == 7
        assert states(queue)["done"] == 0


def test_a_round_deletes_a_bounded_number_and_the_backlog_goes_over_rounds(
    tmp_path: Path, clock: FakeClock, client: FoxReload,
) -> None:
    path = tmp_path / "q.db"
    cap = PURGE_BATCH * PURGE_BATCHES
    with CountingQueue(path, clock=clock) as queue:
        rows(path, "done", cap + 10, at=clock.time() - 90 * DAY, prefix="o-")
        worker = RecoveryWorker(client, queue, MemoryDedupStore(), on_completed=print,
                                keep_done=7 * DAY)
        assert worker.purge_done() == cap
        assert worker.purge_done() == 10


def test_keep_done_none_keeps_everything(tmp_path: Path, clock: FakeClock,
                                         client: FoxReload) -> None:
    path = tmp_path / "q.db"
    with CountingQueue(path, clock=clock) as queue:
        rows(path, "done", 5, at=clock.time() - 900 * DAY, prefix="o-")
        worker = RecoveryWorker(client, queue, MemoryDedupStore(), on_completed=print,
                                keep_done=None)
        assert worker.purge_done() == 0
        assert states(queue)["done"] == 5
        assert "batches" not in queue.__dict__


def test_the_worker_s_loop_purges_every_few_minutes_on_its_clock(
    tmp_path: Path, clock: FakeClock, client: FoxReload,
) -> None:
    stop = threading.Event()
    real_sleep = clock.sleep

    def sleep(seconds: float) -> None:
        real_sleep(seconds)
        if clock.monotonic() >= 3600:
            stop.set()

    clock.sleep = sleep  # type: ignore[method-assign]
    path = tmp_path / "q.db"
    with CountingQueue(path, clock=clock) as queue:
        rows(path, "done", 3, at=clock.time() - 31 * DAY, prefix="o-")
        RecoveryWorker(client, queue, MemoryDedupStore(), on_completed=print).run(
            stop=stop, idle=5)
        assert queue.batches[0] == 3  # at once, at the first round
        assert len(queue.batches) == 3600 / PURGE_EVERY  # then every 5 minutes
        assert states(queue)["done"] == 0


def test_a_queue_without_retention_keeps_everything() -> None:
    from foxpoll.recovery.base import RecoveryQueue

    assert RecoveryQueue.delete_done(object(), older_than=0) == 0  # type: ignore[arg-type]


# -- PostgreSQL and procrastinate --------------------------------------------------------


@pytest.fixture
def pg_table() -> Iterator[str]:
    require("PostgreSQL", "127.0.0.1", 5432)
    table = f"h6b_retention_{uuid.uuid4().hex[:8]}"
    try:
        yield table
    finally:
        drop_table(table)


def pg_rows(table: str, state: str, count: int, *, days_ago: float, prefix: str) -> None:
    import psycopg

    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(
            f"INSERT INTO {table} ({COLUMNS}) SELECT %s || n, %s, 1, t, '', t, t "  # noqa: S608
            "FROM generate_series(1, %s) AS n, "
            "(SELECT extract(epoch FROM now()) - %s * 86400 AS t) AS at",
            (prefix, state, count, days_ago))


def pg_states(table: str) -> dict[str, int]:
    import psycopg

    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        found = conn.execute(f"SELECT state, count(*) FROM {table} GROUP BY 1").fetchall()  # noqa: S608
    return {state: int(count) for state, count in found}


@pytest.mark.service
def test_postgres_deletes_old_done_rows_by_the_server_s_clock(pg_table: str) -> None:
    from foxpoll.recovery import PostgresRecoveryQueue

    with PostgresRecoveryQueue(POSTGRES_URL, table=pg_table) as queue:
        queue.create_schema()
        pg_rows(pg_table, "done", 700, days_ago=31, prefix="old-")
        pg_rows(pg_table, "dead", 4, days_ago=400, prefix="dead-")
        pg_rows(pg_table, "resolved", 2, days_ago=400, prefix="resolved-")
        pg_rows(pg_table, "done", 6, days_ago=29, prefix="recent-")
        assert queue.delete_done(older_than=30 * DAY, limit=500) == 500
        assert queue.delete_done(older_than=30 * DAY, limit=500) == 200
        assert queue.delete_done(older_than=30 * DAY, limit=500) == 0
        assert pg_states(pg_table) == {"done": 6, "dead": 4, "resolved": 2}
        with pytest.raises(ValueError, match="older_than"):
            queue.delete_done(older_than=float("nan"))


@pytest.mark.service
async def test_the_procrastinate_dispatcher_round_purges(
    sim: FakeFoxReload, client: FoxReload,
) -> None:
    require("PostgreSQL", "127.0.0.1", 5432)
    import psycopg

    from foxpoll.recovery import ProcrastinateRecoveryQueue

    name = f"h6b_retention_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    url = POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        queue: Any = ProcrastinateRecoveryQueue(url)
        queue.create_schema()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                f"INSERT INTO foxpoll_recovery ({COLUMNS}) SELECT 'o' || n, "  # noqa: S608
                "CASE WHEN n <= 3 THEN 'dead' ELSE 'done' END, 1, t, '', t, t "
                "FROM generate_series(1, 10) AS n, "
                "(SELECT extract(epoch FROM now()) - 40 * 86400 AS t) AS at")
        worker = RecoveryWorker(client, queue, MemoryDedupStore(), on_completed=print)
        async with queue:
            queue.bind(worker)
            async with queue.app.open_async():
                await queue.maintain(worker, purge=False)
                assert len(queue.jobs(JobState.DONE)) == 7
                await queue.maintain(worker)
            assert queue.jobs(JobState.DONE) == []
            assert len(queue.jobs(JobState.DEAD)) == 3
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


# -- the cost of a round: the done rows' own index --------------------------------------

OLD_SCHEMA = (  # the table as foxpoll made it before retention had an index of its own
    "CREATE TABLE foxpoll_recovery (order_id TEXT PRIMARY KEY, state TEXT NOT NULL, "
    "attempts INTEGER NOT NULL DEFAULT 0, due_at DOUBLE PRECISION NOT NULL, "
    "locked_until DOUBLE PRECISION, token TEXT, reason TEXT NOT NULL DEFAULT '', "
    "last_status TEXT, last_error TEXT, note TEXT, created_at DOUBLE PRECISION NOT NULL, "
    "updated_at DOUBLE PRECISION NOT NULL)")


def test_a_sqlite_round_reads_the_done_index_which_an_old_table_gets_on_opening(
    tmp_path: Path, clock: FakeClock,
) -> None:
    from foxpoll.dedup._sql import SQLITE
    from foxpoll.recovery._sql import JobStatements

    path = tmp_path / "q.db"
    db = sqlite3.connect(path)
    with db:
        db.execute(OLD_SCHEMA)
    db.close()
    SQLiteRecoveryQueue(path, clock=clock).close()  # adds the index, idempotently
    SQLiteRecoveryQueue(path, clock=clock).close()
    db = sqlite3.connect(path)
    try:
        indexes = {row[0] for row in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert "foxpoll_recovery_done" in indexes
        plan = " ".join(str(row[3]) for row in db.execute(
            "EXPLAIN QUERY PLAN " + JobStatements.render(SQLITE, "foxpoll_recovery").delete_done,
            {"now": 0.0, "older_than": 30 * DAY, "limit": 500}))
    finally:
        db.close()
    # Before: SEARCH ... USING INDEX foxpoll_recovery_due (state=?) and a sort of every done
    # row, 0.24 s at a million of them, none old enough.
    assert "USING INDEX foxpoll_recovery_done (state=? AND updated_at<?)" in plan
    assert "TEMP B-TREE" not in plan


@pytest.mark.service
def test_a_postgres_round_with_nothing_old_enough_reads_no_done_row(pg_table: str) -> None:
    import psycopg

    from foxpoll.recovery import PostgresRecoveryQueue

    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(OLD_SCHEMA.replace("foxpoll_recovery", pg_table))
    with PostgresRecoveryQueue(POSTGRES_URL, table=pg_table) as queue:
        queue.create_schema()  # adds the index to the table made before it
        queue.create_schema()
        pg_rows(pg_table, "done", 50_000, days_ago=10, prefix="recent-")
        statement = queue._sql.delete_done.replace("%(older_than)s", str(30 * DAY)).replace(
            "%(limit)s", "500")
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(f"ANALYZE {pg_table}")
            plan = "\n".join(row[0] for row in conn.execute(
                f"EXPLAIN (ANALYZE, BUFFERS) {statement}").fetchall())
        # Before: a Seq Scan of every done row (0.34 s at a million).
        assert f"Index Scan using {pg_table}_done" in plan
        assert "Seq Scan" not in plan
        assert queue.delete_done(older_than=30 * DAY) == 0
