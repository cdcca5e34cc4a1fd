"""The recovery queue in SQL, shared by the SQLite and PostgreSQL engines.

One row per order is the whole state of its job, so every transition is one conditional
statement and enqueueing is idempotent by the primary key, in every state. Statements use
``:name`` parameters and ``{now}`` for the current time in epoch seconds: the process
clock on SQLite, the server's on PostgreSQL. Due times are written as ``{now} + :delay``
so a fleet's machines never compare their own clocks.

An engine supplies :meth:`SQLJobQueue._transaction`; everything else is here.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from typing import Any

import attrs

from foxpoll.dedup._sql import Dialect, TableName

from .base import JobQueue, JobState, RecoveryJob, UnreadableJobs, require_text

__all__ = ["COLUMNS", "Execute", "JobStatements", "SQLJobQueue", "job_from_row"]

COLUMNS = ("order_id", "state", "attempts", "due_at", "reason", "last_status", "last_error",
           "note", "created_at", "updated_at", "locked_until")

Execute = Callable[[str, Mapping[str, Any]], list[dict[str, Any]]]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS {table} (
    order_id     TEXT PRIMARY KEY,
    state        TEXT NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    due_at       DOUBLE PRECISION NOT NULL,
    locked_until DOUBLE PRECISION,
    token        TEXT,
    reason       TEXT NOT NULL DEFAULT '',
    last_status  TEXT,
    last_error   TEXT,
    note         TEXT,
    created_at   DOUBLE PRECISION NOT NULL,
    updated_at   DOUBLE PRECISION NOT NULL
)"""
_INDEX = "CREATE INDEX IF NOT EXISTS {index} ON {index_on} (state, due_at)"
# Retention's own: the done rows only, by their last change. Partial, so the writes of the
# live rows (a renewal of every watch each period) never touch it; led by state, so that
# SQLite's planner, without statistics, prefers it to the (state, due_at) index.
_DONE_INDEX = ("CREATE INDEX IF NOT EXISTS {index} ON {index_on} (state, updated_at) "
               "WHERE state = 'done'")

_INSERT = """
INSERT INTO {table} (order_id, state, due_at, reason, created_at, updated_at)
VALUES (:order_id, 'queued', {now} + :delay, :reason, {now}, {now})
ON CONFLICT (order_id) DO NOTHING RETURNING order_id"""

# Already known: a queued job keeps the earlier due time; a watch becomes a recovery job.
_HASTEN = """
UPDATE {table} SET due_at = CASE WHEN due_at > {now} + :delay THEN {now} + :delay
                                 ELSE due_at END,
                   reason = CASE WHEN reason = 'watch' THEN :reason ELSE reason END,
                   updated_at = {now}
WHERE order_id = :order_id AND state = 'queued'
  AND (due_at > {now} + :delay OR reason = 'watch')
RETURNING order_id"""

# The wait that starts last sets the watch's due time; a job under recovery is not a
# watch and is left alone.
_WATCH = """
INSERT INTO {table} (order_id, state, due_at, reason, created_at, updated_at)
VALUES (:order_id, 'queued', {now} + :delay, 'watch', {now}, {now})
ON CONFLICT (order_id) DO UPDATE SET
    due_at = excluded.due_at, updated_at = excluded.updated_at
WHERE {name}.state = 'queued' AND {name}.reason = 'watch'
RETURNING order_id"""

# A payment's watch is a guess at the wait to come: it never overrides a watch a wait set.
_WATCH_NEW = """
INSERT INTO {table} (order_id, state, due_at, reason, created_at, updated_at)
VALUES (:order_id, 'queued', {now} + :delay, 'watch', {now}, {now})
ON CONFLICT (order_id) DO NOTHING
RETURNING order_id"""

_SETTLE_DONE = """
UPDATE {table} SET state = 'done', note = :status, last_status = :status,
                   locked_until = NULL, token = NULL, updated_at = {now}
WHERE order_id = :order_id AND state = 'queued' AND reason = 'watch'
RETURNING order_id"""

_SETTLE_DELIVERY = """
UPDATE {table} SET reason = 'delivery', last_status = :status, due_at = {now} + :delay,
                   updated_at = {now}
WHERE order_id = :order_id AND state = 'queued' AND reason = 'watch'
RETURNING order_id"""

_UNWATCH = """
DELETE FROM {table}
WHERE order_id = :order_id AND state = 'queued' AND reason = 'watch' AND attempts = 0
  AND locked_until IS NULL
RETURNING order_id"""


def _renew_param(n: int) -> str:
    """The n-th id parameter's name, in letters: the dialects' named parameters are
    ``[a-z_]`` only."""
    name = ""
    while True:
        n, digit = divmod(n, 26)
        name = chr(ord("a") + digit) + name
        if n == 0:
            return "id_" + name


#: Ids per renewal statement, under SQLite's oldest limit of 999 parameters; a short
#: chunk repeats its last id, so every statement has the one shape.
RENEW_CHUNK = 500
RENEW_PARAMS = tuple(_renew_param(n) for n in range(RENEW_CHUNK))

# A live process's heartbeat: only a queued watch moves; a job under recovery is the
# worker's, and an id that is not a watch any more is passed over.
_RENEW = f"""
UPDATE {{table}} SET due_at = {{now}} + :delay, updated_at = {{now}}
WHERE state = 'queued' AND reason = 'watch'
  AND order_id IN ({", ".join(":" + name for name in RENEW_PARAMS)})
RETURNING order_id"""  # noqa: S608 - only our own parameter names go in; the ids are bound

# Due and not held by anyone: a lease that ran out is a dead worker's. Taking a job
# begins a re-check, so it counts one here and nowhere else: a re-check that dies with
# its worker, or never records its end, has been counted all the same.
_TAKE = """
UPDATE {table} SET locked_until = {now} + :lease, token = NULL, attempts = attempts + 1
WHERE order_id = (
    SELECT order_id FROM {table}
    WHERE state = 'queued' AND due_at <= {now}
      AND (locked_until IS NULL OR locked_until <= {now})
    ORDER BY due_at LIMIT 1 {skip_locked})
RETURNING {columns}"""

# A dispatched wake-up takes its job only with the token it was dispatched with.
_TAKE_DISPATCHED = """
UPDATE {table} SET locked_until = {now} + :lease, token = NULL, attempts = attempts + 1
WHERE order_id = :order_id AND token = :token AND state = 'queued'
RETURNING {columns}"""

_DISPATCH = """
UPDATE {table} SET locked_until = {now} + :lease, token = :token
WHERE order_id IN (
    SELECT order_id FROM {table}
    WHERE state = 'queued' AND due_at <= {now}
      AND (locked_until IS NULL OR locked_until <= {now})
    ORDER BY due_at LIMIT :limit {skip_locked})
RETURNING order_id"""

_NEXT_DUE = """
SELECT MIN(CASE WHEN locked_until > due_at THEN locked_until ELSE due_at END) AS t
FROM {table} WHERE state = 'queued'"""

# A re-check that sent no request gives back the attempt its take counted.
_RETRY = """
UPDATE {table} SET due_at = {now} + :delay, attempts = attempts - :given_back,
                   last_status = :last_status, last_error = :last_error,
                   locked_until = NULL, token = NULL, updated_at = {now}
WHERE order_id = :order_id AND state = 'queued'
RETURNING {columns}"""

_FINISH = """
UPDATE {table} SET state = 'done', note = :status, last_status = :status,
                   locked_until = NULL, token = NULL, updated_at = {now}
WHERE order_id = :order_id
RETURNING {columns}"""

_BURY = """
UPDATE {table} SET state = 'dead', last_status = :last_status,
                   last_error = :last_error, locked_until = NULL, token = NULL,
                   updated_at = {now}
WHERE order_id = :order_id AND state = 'queued'
RETURNING {columns}"""

_REQUEUE = """
UPDATE {table} SET state = 'queued', attempts = 0, due_at = {now}, reason = 'requeued',
                   note = NULL, locked_until = NULL, token = NULL, updated_at = {now}
WHERE order_id = :order_id AND state IN ('dead', 'resolved')
RETURNING {columns}"""

_RESOLVE = """
UPDATE {table} SET state = 'resolved', note = :note, updated_at = {now}
WHERE order_id = :order_id AND state = 'dead'
RETURNING {columns}"""

_GET = "SELECT {columns} FROM {table} WHERE order_id = :order_id"

_JOBS = """
SELECT {columns} FROM {table} WHERE state = :state ORDER BY updated_at, order_id LIMIT :limit"""

# Retention: a bounded batch of the oldest done rows, read off the partial index of done
# rows by updated_at. It reads only the rows it deletes: a round with nothing old enough
# costs one index probe, however many recent done rows there are. Workers that delete at
# once skip each other's rows on PostgreSQL.
_DELETE_DONE = """
DELETE FROM {table} WHERE order_id IN (
    SELECT order_id FROM {table}
    WHERE state = 'done' AND updated_at < {now} - :older_than
    ORDER BY updated_at LIMIT :limit {skip_locked})
RETURNING order_id"""


@attrs.frozen
class JobStatements:
    """The statements of one job table, rendered for one database."""

    schema: str
    index: str
    done_index: str
    insert: str
    hasten: str
    watch: str
    watch_new: str
    settle_done: str
    settle_delivery: str
    unwatch: str
    renew: str
    take: str
    take_dispatched: str
    dispatch: str
    next_due: str
    retry: str
    finish: str
    bury: str
    requeue: str
    resolve: str
    get: str
    jobs: str
    delete_done: str

    @classmethod
    def render(cls, dialect: Dialect, table: str | TableName) -> JobStatements:
        templates = {
            "schema": _SCHEMA, "index": _INDEX, "insert": _INSERT, "hasten": _HASTEN,
            "watch": _WATCH, "watch_new": _WATCH_NEW, "settle_done": _SETTLE_DONE,
            "settle_delivery": _SETTLE_DELIVERY,
            "renew": _RENEW,
            "unwatch": _UNWATCH, "take": _TAKE, "take_dispatched": _TAKE_DISPATCHED,
            "dispatch": _DISPATCH, "next_due": _NEXT_DUE, "retry": _RETRY, "finish": _FINISH,
            "bury": _BURY, "requeue": _REQUEUE, "resolve": _RESOLVE, "get": _GET, "jobs": _JOBS,
            "delete_done": _DELETE_DONE,
        }
        return cls(done_index=dialect.render(_DONE_INDEX, table, COLUMNS, index_suffix="done"),
                   **{name: dialect.render(sql, table, COLUMNS, index_suffix="due")
                      for name, sql in templates.items()})


class SQLJobQueue(JobQueue):
    """A :class:`JobQueue` in one SQL table. Subclasses give the statements, a clock and
    :meth:`_transaction`; every method is one or two statements."""

    _sql: JobStatements
    _clock: Callable[[], float]

    @abc.abstractmethod
    def _transaction(self) -> AbstractContextManager[Execute]:
        """A unit of work: statements run through the yielded function commit together."""

    def _one(self, sql: str, **params: Any) -> dict[str, Any] | None:
        with self._transaction() as execute:
            rows = execute(sql, params)
        return rows[0] if rows else None

    def _delay(self, due_at: float | None) -> float:
        """``due_at`` (this process's clock) as seconds from now, for ``{now} + :delay``."""
        if due_at is None:
            return 0.0
        if not math.isfinite(due_at):
            raise ValueError("due_at must be a finite time")
        return due_at - self._clock()

    # -- the contract ---------------------------------------------------------------------

    def enqueue(self, order_id: str, *, reason: str = "stalled", due_at: float | None = None
                ) -> bool:
        require_text(order_id, "order id")
        params = {"order_id": order_id, "reason": reason, "delay": self._delay(due_at)}
        with self._transaction() as execute:
            if execute(self._sql.insert, params):
                return True
            execute(self._sql.hasten, params)
        return False

    def watch(self, order_id: str, *, due_at: float, replace: bool = True) -> bool:
        require_text(order_id, "order id")
        sql = self._sql.watch if replace else self._sql.watch_new
        return self._one(sql, order_id=order_id, delay=self._delay(due_at)) is not None

    def settle(self, order_id: str, *, status: str) -> bool:
        state, grace = self.settled_status(status)
        sql = self._sql.settle_done if state == "done" else self._sql.settle_delivery
        return self._one(sql, order_id=order_id, status=status, delay=grace or 0.0) is not None

    def unwatch(self, order_id: str) -> bool:
        return self._one(self._sql.unwatch, order_id=order_id) is not None

    def take(self, *, lease: float = 300.0) -> RecoveryJob | None:
        row = self._one(self._sql.take, lease=lease)
        return job_from_row(row) if row else None

    def next_due(self) -> float | None:
        """When the earliest queued job is due (or its lease ends), or None when none is
        queued."""
        row = self._one(self._sql.next_due)
        return None if row is None or row["t"] is None else float(row["t"])

    def _update(self, sql: str, order_id: str, **params: Any) -> RecoveryJob:
        with self._transaction() as execute:
            rows = execute(sql, {"order_id": order_id, **params})
            current = rows or execute(self._sql.get, {"order_id": order_id})
        if not current:
            raise KeyError(order_id)
        job = job_from_row(current[0])
        if not rows:
            raise ValueError(f"order {order_id} is {job.state.value}: not changed")
        return job

    def retry(self, order_id: str, *, due_at: float, last_status: str | None,
              last_error: str | None, attempt_spent: bool = True) -> RecoveryJob:
        return self._update(self._sql.retry, order_id, delay=self._delay(due_at),
                            last_status=last_status, last_error=last_error,
                            given_back=0 if attempt_spent else 1)

    def finish(self, order_id: str, *, final_status: str) -> RecoveryJob:
        return self._update(self._sql.finish, order_id, status=final_status)

    def bury(self, order_id: str, *, last_status: str | None, last_error: str | None
             ) -> RecoveryJob:
        return self._update(self._sql.bury, order_id, last_status=last_status,
                            last_error=last_error)

    def requeue(self, order_id: str) -> RecoveryJob:
        return self._update(self._sql.requeue, order_id)

    def resolve(self, order_id: str, reason: str) -> RecoveryJob:
        require_text(reason, "reason")
        return self._update(self._sql.resolve, order_id, note=reason)

    def get(self, order_id: str) -> RecoveryJob | None:
        row = self._one(self._sql.get, order_id=order_id)
        return job_from_row(row) if row else None

    def jobs(self, state: JobState, *, limit: int = 100) -> list[RecoveryJob]:
        with self._transaction() as execute:
            rows = execute(self._sql.jobs, {"state": JobState(state).value, "limit": limit})
        jobs: list[RecoveryJob] = []
        unreadable: dict[str, str] = {}
        for row in rows:
            try:
                jobs.append(job_from_row(row))
            except UnreadableJobs as exc:
                unreadable.update(exc.unreadable)
        if unreadable:
            raise UnreadableJobs(unreadable, jobs=jobs)
        return jobs

    def delete_done(self, *, older_than: float, limit: int = 500) -> int:
        if not (older_than >= 0 and math.isfinite(older_than)):
            raise ValueError(f"older_than must be a finite number >= 0, not {older_than!r}")
        with self._transaction() as execute:
            rows = execute(self._sql.delete_done, {"older_than": older_than, "limit": limit})
        return len(rows)

    def renew(self, order_ids: Iterable[str], *, due_at: float) -> int:
        ids = [require_text(order_id, "order id") for order_id in dict.fromkeys(order_ids)]
        if not ids:
            return 0
        delay = self._delay(due_at)
        renewed = 0
        with self._transaction() as execute:
            for start in range(0, len(ids), RENEW_CHUNK):
                chunk = ids[start:start + RENEW_CHUNK]
                chunk += chunk[-1:] * (RENEW_CHUNK - len(chunk))
                params: dict[str, Any] = dict(zip(RENEW_PARAMS, chunk, strict=True))
                renewed += len(execute(self._sql.renew, {**params, "delay": delay}))
        return renewed


# Text columns, and those that must not be NULL; the others hold numbers. Checked here
# because the database's types do not say: SQLite stores any value in any column, and
# PostgreSQL's double precision holds NaN.
_TEXTS = ("order_id", "reason", "last_status", "last_error", "note")
_REQUIRED = ("order_id", "attempts", "due_at", "reason")


def _wrong(name: str, value: Any) -> bool:
    if value is None:
        return name in _REQUIRED
    if name in _TEXTS:
        return not isinstance(value, str)
    number = int if name == "attempts" else (int, float)
    return isinstance(value, bool) or not isinstance(value, number) or value != value  # NaN


def _fault(name: str, value: Any) -> str:
    """What is wrong with column ``name``, by the type of its value."""
    if value is None:
        return f"{name} is missing"
    if name == "state" and isinstance(value, str):
        return "state is no job state"
    kind = "NaN" if isinstance(value, float) and value != value else (
        f"a {type(value).__name__}")
    expected = {"state": "a job state", "attempts": "a whole number"}.get(
        name, "text" if name in _TEXTS else "a number")
    return f"{name} is {kind}, not {expected}"


def _row_id(order_id: Any) -> str:
    """A row's order id for a message: bounded and printable, as an id is."""
    text = order_id if isinstance(order_id, str) else f"<{type(order_id).__name__}>"
    return text if len(text) <= 80 and text.isprintable() else repr(text[:77]) + "..."


def job_from_row(row: Mapping[str, Any]) -> RecoveryJob:
    """The job a row holds.

    Raises:
        UnreadableJobs: a value of the wrong type, named with the row's order id.
    """
    data = {name: row[name] for name in COLUMNS}
    states = {state.value for state in JobState}
    wrong = [name for name in COLUMNS if name != "state" and _wrong(name, data[name])]
    if data["state"] not in states:
        wrong.insert(0, "state")
    if wrong:
        # The column and what is wrong with it, never its value: a row written by another
        # program may hold anything, a code or a secret.
        what = ", ".join(_fault(name, data[name]) for name in wrong)
        raise UnreadableJobs({_row_id(data["order_id"]): what})
    data["state"] = JobState(data["state"])
    return RecoveryJob(**data)

