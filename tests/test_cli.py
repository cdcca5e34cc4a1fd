"""The foxpoll command: demo, orders, dlq, errors."""

from __future__ import annotations

import contextlib
import io
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from foxpoll import SystemClock, __version__
from foxpoll.cli import CommandError, main
from foxpoll.recovery import SQLiteRecoveryQueue
from foxpoll.testing import FakeFoxReload, Fault, FaultKind, OrderScript, SimulatorServer


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    return main(list(argv), out=out), out.getvalue()


@pytest.fixture(autouse=True)
def _no_foxpoll_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sets the FOXPOLL_* variables it means to: none leak in from the shell."""
    for name in list(os.environ):
        if name.startswith("FOXPOLL_") and not name.startswith("FOXPOLL_TEST_"):
            monkeypatch.delenv(name)


def tables(path: Path) -> set[str]:
    """The tables of a SQLite file, read without changing it."""
    with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as db:
        return {row[0] for row in db.execute("SELECT name FROM sqlite_master "
                                             "WHERE type = 'table'")}


def test_version() -> None:
    result = subprocess.run([sys.executable, "-m", "foxpoll", "--version"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0
    assert result.stdout.strip() == f"foxpoll {__version__}"


def test_demo_on_virtual_time(tmp_path: Path) -> None:
    code, output = run("demo", "--virtual", "--db", str(tmp_path / "demo.db"))
    assert code == 0
    assert "4 orders delivered exactly once" in output
    assert "delivering them all again sent 0 more" in output
    assert "stalled -> recovery queue" in output
    assert "recovered after" in output
    assert "failed: supplier out of stock" in output
    assert "0 dead letters" in output
    code, listing = run("dlq", "--queue", f"sqlite:///{tmp_path / 'demo.db'}", "list")
    assert (code, listing.strip()) == (0, "0 dead letter(s)")


def test_dlq_list_requeue_resolve(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    with SQLiteRecoveryQueue(path) as queue:
        for order_id in ("o-1", "o-2"):
            queue.enqueue(order_id)
            assert queue.take() is not None  # the one re-check, counted as it is taken
            queue.bury(order_id, last_status="processing", last_error="timeout")
    url = f"sqlite:///{path}"
    code, listing = run("dlq", "--queue", url, "list")
    assert code == 0
    assert "o-1  attempts=1  last_status=processing  last_error=timeout" in listing
    assert "2 dead letter(s)" in listing
    assert run("dlq", "--queue", url, "requeue", "o-1") == (0, "o-1: requeued\n")
    assert run("dlq", "--queue", url, "resolve", "o-2", "refunded") == (
        0, "o-2: resolved (refunded)\n")
    with SQLiteRecoveryQueue(path) as queue:
        assert queue.get("o-2").note == "refunded"  # type: ignore[union-attr]
    assert run("dlq", "--queue", url, "list")[1].strip() == "0 dead letter(s)"


def test_a_sqlite_queue_is_named_by_its_path_or_a_sqlite_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with SQLiteRecoveryQueue(f"sqlite:///{tmp_path / 'q.db'}") as queue:  # as the class takes
        queue.enqueue("o-1")
        queue.bury("o-1", last_status=None, last_error=None)
    monkeypatch.chdir(tmp_path)
    for location in (str(tmp_path / "q.db"), "q.db", "sqlite:///q.db",
                     f"sqlite:///{tmp_path / 'q.db'}"):
        assert run("dlq", "list", "--queue", location)[1].split()[0] == "o-1", location
        monkeypatch.setenv("FOXPOLL_QUEUE", location)
        assert run("dlq", "list")[1].split()[0] == "o-1", location
        monkeypatch.delenv("FOXPOLL_QUEUE")
    # A bare path is read as one only: never created, and never mistaken for the rest.
    assert run("dlq", "list", "--queue", "typo.db") == (1, "")
    assert "no queue at typo.db: the file does not exist" in capsys.readouterr().err
    for location in ("sqlite://q.db", "sqlite:q.db", "sqlite:///q.db?mode=ro"):
        assert run("dlq", "list", "--queue", location)[0] == 1
        assert "expected sqlite:///PATH" in capsys.readouterr().err
    assert run("dlq", "list", "--queue", "a=b.db")[0] == 1  # an '=': a libpq keyword string
    # (Reading a WAL file read-only leaves its -wal and -shm, which only a writer removes.)
    assert sorted(p.name for p in tmp_path.iterdir()
                  if not p.name.endswith(("-wal", "-shm"))) == ["q.db"]


def test_queue_goes_before_or_after_the_action(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'q.db'}"
    with SQLiteRecoveryQueue(tmp_path / "q.db") as queue:
        queue.enqueue("o-1")
        queue.bury("o-1", last_status=None, last_error=None)
    assert run("dlq", "list", "--queue", url)[1].splitlines()[-1] == "1 dead letter(s)"
    assert run("dlq", "--queue", url, "list")[1].splitlines()[-1] == "1 dead letter(s)"
    assert run("recovery", "list", "--state", "dead", "--queue", url)[0] == 0


def fill(queue: Any) -> None:
    """One job in each state: waiting, running, dead, done and resolved."""
    queue.enqueue("waiting", due_at=time.time() + 60)
    queue.watch("watched", due_at=time.time() + 600)
    queue.enqueue("running")
    assert queue.take(lease=300).order_id == "running"
    for order_id in ("dead", "resolved"):
        queue.enqueue(order_id)
        queue.bury(order_id, last_status="processing", last_error="timeout")
    queue.resolve("resolved", "refunded")
    queue.enqueue("done")
    queue.finish("done", final_status="completed")


FILLED = {"waiting", "watched", "running", "dead", "resolved", "done"}


def listed(output: str) -> dict[str, str]:
    """The jobs ``fill`` made, by state shown (a shared database may hold others too)."""
    return {line.split()[0]: line.split()[1] for line in output.splitlines()[:-1]
            if line.split()[0] in FILLED}


def check_recovery_list(url: str) -> None:
    code, active = run("recovery", "list", "--queue", url)
    assert code == 0
    assert listed(active) == {"waiting": "queued", "watched": "queued", "running": "running"}
    assert "reason=watch" in active
    assert "due_in=" in active
    assert active.splitlines()[-1].endswith(" job(s) active")
    for state, expected in (("queued", {"waiting": "queued", "watched": "queued"}),
                            ("running", {"running": "running"}), ("dead", {"dead": "dead"}),
                            ("done", {"done": "done"}), ("resolved", {"resolved": "resolved"})):
        assert listed(run("recovery", "list", "--state", state, "--queue", url)[1]) == expected


def test_recovery_list_shows_queued_and_running_jobs_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with SQLiteRecoveryQueue(tmp_path / "q.db") as queue:
        fill(queue)
    capsys.readouterr()
    url = f"sqlite:///{tmp_path / 'q.db'}"
    check_recovery_list(url)
    assert run("recovery", "list", "--queue", url)[1].splitlines()[-1] == "3 job(s) active"
    # What a watch is gets said, once per listing that shows one.
    assert "reason=watch: a paid order a process is waiting on" in capsys.readouterr().err


@pytest.mark.service
def test_recovery_list_on_postgresql() -> None:
    import psycopg

    from foxpoll.recovery import PostgresRecoveryQueue

    from .services import POSTGRES_URL, require

    require("PostgreSQL", "127.0.0.1", 5432)

    def forget_filled() -> None:  # the command reads the default table: leave only ours
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute("DELETE FROM foxpoll_recovery WHERE order_id = ANY(%s)",
                         [sorted(FILLED)])

    with PostgresRecoveryQueue(POSTGRES_URL) as queue:
        queue.create_schema()
        forget_filled()
        fill(queue)
        try:
            check_recovery_list(POSTGRES_URL)
        finally:
            forget_filled()


def test_errors_are_one_line_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    SQLiteRecoveryQueue(tmp_path / "q.db").close()
    code, _ = run("dlq", "--queue", f"sqlite:///{tmp_path / 'q.db'}", "requeue", "nope")
    assert code == 1
    err = capsys.readouterr().err
    assert err.strip() == "foxpoll: error: no order nope in the queue"
    assert "Traceback" not in err
    code, _ = run("dlq", "--queue", "mysql://x", "list")
    assert code == 1
    assert "use a SQLite file's PATH, sqlite:///PATH, postgresql://" in capsys.readouterr().err


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    SQLiteRecoveryQueue(tmp_path / "q.db").close()
    with pytest.raises(CommandError, match="no order nope"):
        main(["--debug", "dlq", "--queue", f"sqlite:///{tmp_path / 'q.db'}", "requeue", "nope"])


@pytest.mark.parametrize("argv", [["dlq", "list"], ["recovery", "list"],
                                  ["dlq", "requeue", "o-1"], ["dlq", "resolve", "o-1", "x"]])
def test_without_a_queue_the_command_stops_rather_than_guess(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    argv: list[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FOXPOLL_QUEUE", raising=False)
    assert run(*argv) == (2, "")
    err = capsys.readouterr().err
    assert "--queue" in err
    assert "FOXPOLL_QUEUE" in err
    assert list(tmp_path.iterdir()) == []  # no new, empty foxpoll.db


def test_a_missing_sqlite_file_is_an_error_not_a_new_queue(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "typo.db"
    assert run("dlq", "list", "--queue", f"sqlite:///{missing}") == (1, "")
    assert "does not exist" in capsys.readouterr().err
    assert not missing.exists()


def test_a_directory_or_a_file_that_is_no_database_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run("dlq", "list", "--queue", f"sqlite:///{tmp_path}") == (1, "")
    assert capsys.readouterr().err == (f"foxpoll: error: sqlite:///{tmp_path} is a directory, "
                                       "not a SQLite database\n")
    notes = tmp_path / "notes.txt"
    notes.write_text("dear diary, " * 100)
    assert run("recovery", "list", "--queue", f"sqlite:///{notes}") == (1, "")
    err = capsys.readouterr().err
    assert err == f"foxpoll: error: sqlite:///{notes} is not a SQLite database\n"
    assert "StoreUnavailable" not in err  # a configuration error, not an outage
    assert notes.read_text() == "dear diary, " * 100


@pytest.mark.parametrize("table", ["foxpoll_recovry", "billing.foxpoll_recovery",
                                   "main.foxpoll_recovry"])
def test_a_mistyped_table_is_an_error_not_a_new_table_on_sqlite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], table: str
) -> None:
    path = tmp_path / "q.db"
    SQLiteRecoveryQueue(path).close()
    before = tables(path)
    for argv in (["dlq", "list"], ["recovery", "list"], ["dlq", "requeue", "o-1"]):
        assert run(*argv, "--queue", f"sqlite:///{path}", "--table", table) == (1, "")
        assert capsys.readouterr().err.startswith(
            f"foxpoll: error: no table {table} in sqlite:///{path} (--table or "
            "FOXPOLL_QUEUE_TABLE names the queue's table")
    assert tables(path) == before


def test_a_table_that_is_not_a_queue_s_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "app.db"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    assert run("dlq", "list", "--queue", f"sqlite:///{path}", "--table", "customers")[0] == 1
    assert "table customers in sqlite:///" in capsys.readouterr().err
    with contextlib.closing(sqlite3.connect(path)) as db:  # nothing added to it
        assert [row[1] for row in db.execute("PRAGMA table_info(customers)")] == ["id", "name"]


def dead_and_queued(queue: Any) -> None:
    """o-dead is a dead letter, o-queued waits for its next re-check."""
    queue.enqueue("o-dead")
    queue.bury("o-dead", last_status="processing", last_error="timeout")
    queue.enqueue("o-queued", due_at=time.time() + 60)


def check_dlq_refusals(url: str, capsys: pytest.CaptureFixture[str], *table: str) -> None:
    for argv, said in (
        (["requeue", "no-such-order"], "no order no-such-order in the queue"),
        (["resolve", "no-such-order", "refunded"], "no order no-such-order in the queue"),
        (["resolve", "o-queued", "refunded"],
         "order o-queued is queued, not dead: only a dead letter is resolved"),
        (["requeue", "o-queued"],
         "order o-queued is queued, not dead: only a dead or resolved order is requeued"),
    ):
        assert run("dlq", *argv, "--queue", url, *table) == (1, "")
        assert capsys.readouterr().err == f"foxpoll: error: {said}\n"
    assert run("dlq", "resolve", "o-dead", "refunded", "--queue", url, *table) == (
        0, "o-dead: resolved (refunded)\n")
    code, _ = run("dlq", "resolve", "o-dead", "again", "--queue", url, *table)
    assert code == 1
    assert capsys.readouterr().err.endswith("order o-dead is resolved, not dead: only a dead "
                                            "letter is resolved\n")


def test_a_missing_or_live_order_is_a_one_line_refusal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with SQLiteRecoveryQueue(tmp_path / "q.db") as queue:
        dead_and_queued(queue)
    check_dlq_refusals(f"sqlite:///{tmp_path / 'q.db'}", capsys)
    with SQLiteRecoveryQueue(tmp_path / "q.db") as queue:
        assert queue.get("o-queued").state.value == "queued"  # type: ignore[union-attr]
        assert queue.get("no-such-order") is None


def spoil(queue: Any, execute: Any) -> None:
    """Three jobs, each in the active and dead listings; o7's lease time is no number."""
    for order_id in ("o1", "o7", "o9"):
        queue.enqueue(order_id, due_at=time.time() + 60)
    for order_id in ("d1", "d7", "d9"):
        queue.enqueue(order_id)
        queue.bury(order_id, last_status="processing", last_error="timeout")
    execute("o7")
    execute("d7")


def check_bad_rows(url: str, capsys: pytest.CaptureFixture[str], value: str,
                   *table: str) -> None:
    code, listing = run("recovery", "list", "--queue", url, *table)
    assert code == 1
    assert [line.split()[0] for line in listing.splitlines()[:-1]] == ["o1", "o9"]
    assert listing.splitlines()[-1] == "2 job(s) active, 1 unreadable"
    err = capsys.readouterr().err
    assert f"foxpoll: error: order o7: unreadable row ({value})\n" in err
    assert "Traceback" not in err
    code, listing = run("dlq", "list", "--queue", url, *table)
    assert code == 1
    assert [line.split()[0] for line in listing.splitlines()[:-1]] == ["d1", "d9"]
    assert listing.splitlines()[-1] == "2 dead letter(s), 1 unreadable"
    assert capsys.readouterr().err == f"foxpoll: error: order d7: unreadable row ({value})\n"
    assert run("dlq", "requeue", "d7", "--queue", url, *table)[0] == 1
    assert "order d7: unreadable row" in capsys.readouterr().err
    assert run("dlq", "requeue", "d9", "--queue", url, *table) == (0, "d9: requeued\n")


def test_a_bad_row_hides_no_other_on_sqlite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "q.db"

    def bad(order_id: str) -> None:  # SQLite keeps a text that is no number as text
        with contextlib.closing(sqlite3.connect(path)) as db, db:
            db.execute("UPDATE foxpoll_recovery SET locked_until = 'soon' "
                       "WHERE order_id = ?", (order_id,))

    with SQLiteRecoveryQueue(path) as queue:
        spoil(queue, bad)
    check_bad_rows(f"sqlite:///{path}", capsys, "locked_until is a str, not a number")


def test_list_commands_never_write_and_the_others_never_change_the_schema(
    tmp_path: Path,
) -> None:
    import hashlib

    path = tmp_path / "q.db"
    with SQLiteRecoveryQueue(path) as queue:
        queue.enqueue("o-dead")
        queue.take()
        queue.bury("o-dead", last_status=None, last_error="ValueError: x")
        queue.enqueue("o-live")
    with contextlib.closing(sqlite3.connect(path)) as db:  # as an older foxpoll left it
        db.execute("DROP INDEX IF EXISTS foxpoll_recovery_done")
        db.execute("DROP INDEX foxpoll_recovery_due")
        db.execute("PRAGMA journal_mode=DELETE")

    def schema() -> tuple[Any, ...]:
        with contextlib.closing(sqlite3.connect(path)) as db:
            return (sorted(db.execute("SELECT type, name, sql FROM sqlite_master")),
                    db.execute("PRAGMA journal_mode").fetchone())

    before, content = schema(), hashlib.sha256(path.read_bytes()).hexdigest()
    url = f"sqlite:///{path}"
    for argv in (("dlq", "list"), ("recovery", "list"), ("recovery", "list", "--state", "dead")):
        assert run(*argv, "--queue", url)[0] == 0, argv
    # Before, opening the queue switched the file to WAL and created the missing indexes.
    assert hashlib.sha256(path.read_bytes()).hexdigest() == content  # not a byte written
    assert run("dlq", "requeue", "o-dead", "--queue", url)[0] == 0
    assert run("dlq", "list", "--queue", url)[1].splitlines() == ["0 dead letter(s)"]
    assert schema() == before  # rows changed; no table, index or journal mode did


def test_the_queue_comes_from_the_flag_else_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("env", "flag"):
        with SQLiteRecoveryQueue(tmp_path / f"{name}.db") as queue:
            queue.enqueue(f"{name}-order")
            queue.bury(f"{name}-order", last_status=None, last_error=None)
    monkeypatch.setenv("FOXPOLL_QUEUE", f"sqlite:///{tmp_path / 'env.db'}")
    assert run("dlq", "list")[1].split()[0] == "env-order"
    assert run("dlq", "list", "--queue", f"sqlite:///{tmp_path / 'flag.db'}"
               )[1].split()[0] == "flag-order"  # the flag wins


def test_table_names_the_queue_s_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with SQLiteRecoveryQueue(tmp_path / "q.db", table="partner_recovery") as queue:
        queue.enqueue("o-1")
        queue.bury("o-1", last_status=None, last_error=None)
    monkeypatch.setenv("FOXPOLL_QUEUE", f"sqlite:///{tmp_path / 'q.db'}")
    assert run("dlq", "list", "--table", "partner_recovery")[1].split()[0] == "o-1"
    assert run("dlq", "--table", "partner_recovery", "requeue", "o-1") == (0,
                                                                        "o-1: requeued\n")
    assert run("recovery", "list", "--table", "partner_recovery")[1].split()[:2] == [
        "o-1", "queued"]
    monkeypatch.setenv("FOXPOLL_QUEUE_TABLE", "partner_recovery")  # or from the variable
    assert run("recovery", "list")[1].split()[:2] == ["o-1", "queued"]
    assert run("recovery", "list", "--table", "foxpoll_recovery")[0] == 1  # the flag wins


@pytest.mark.service
def test_a_schema_qualified_table_and_a_keyword_string_on_postgresql() -> None:
    import psycopg
    from psycopg import sql

    from foxpoll.recovery import PostgresRecoveryQueue

    from .services import POSTGRES_URL, require

    require("PostgreSQL", "127.0.0.1", 5432)
    schema = f"billing_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    try:
        table = f"{schema}.foxpoll_recovery"
        with PostgresRecoveryQueue(POSTGRES_URL, table=table) as queue:
            queue.create_schema()
            queue.enqueue("o-1")
            queue.bury("o-1", last_status="processing", last_error="timeout")
        keywords = psycopg.conninfo.make_conninfo(  # host=... dbname=...
            "", **psycopg.conninfo.conninfo_to_dict(POSTGRES_URL))
        assert "://" not in keywords
        code, listing = run("dlq", "list", "--queue", keywords, "--table", table)
        assert (code, listing.splitlines()[-1]) == (0, "1 dead letter(s)")
        assert listing.split()[0] == "o-1"
        assert run("dlq", "resolve", "o-1", "refunded", "--queue", POSTGRES_URL,
                   "--table", table) == (0, "o-1: resolved (refunded)\n")
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture
def pg_table() -> Iterator[str]:
    """A queue table of this test's own on PostgreSQL, dropped after it."""
    from foxpoll.recovery import PostgresRecoveryQueue

    from .services import POSTGRES_URL, drop_table, require

    require("PostgreSQL", "127.0.0.1", 5432)
    table = f"cli_{uuid.uuid4().hex[:10]}"
    with PostgresRecoveryQueue(POSTGRES_URL, table=table) as queue:
        queue.create_schema()
    try:
        yield table
    finally:
        drop_table(table)


def pg_relation(name: str) -> str | None:
    import psycopg

    from .services import POSTGRES_URL

    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        row = conn.execute("SELECT to_regclass(%s)::text", [name]).fetchone()
    return row[0] if row else None


@pytest.mark.service
def test_a_mistyped_table_is_an_error_not_a_new_table_on_postgresql(
    pg_table: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from .services import POSTGRES_URL

    schema = f"nobilling_{uuid.uuid4().hex[:8]}"
    for table in (pg_table + "x", f"{schema}.{pg_table}"):
        for argv in (["dlq", "list"], ["recovery", "list"], ["dlq", "resolve", "o-1", "x"]):
            assert run(*argv, "--queue", POSTGRES_URL, "--table", table) == (1, "")
            err = capsys.readouterr().err
            assert err.startswith(f"foxpoll: error: no table {table} in database test on "
                                  "PostgreSQL at 127.0.0.1:5432 (--table")
            assert "StoreUnavailable" not in err
        assert pg_relation(table) is None
    assert pg_relation(f"{schema}.x") is None  # nor a new schema


@pytest.mark.service
def test_a_missing_or_live_order_is_a_one_line_refusal_on_postgresql(
    pg_table: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from foxpoll.recovery import PostgresRecoveryQueue

    from .services import POSTGRES_URL

    with PostgresRecoveryQueue(POSTGRES_URL, table=pg_table) as queue:
        dead_and_queued(queue)
    check_dlq_refusals(POSTGRES_URL, capsys, "--table", pg_table)


@pytest.mark.service
def test_a_bad_row_hides_no_other_on_postgresql(
    pg_table: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import psycopg
    from psycopg import sql

    from foxpoll.recovery import PostgresRecoveryQueue

    from .services import POSTGRES_URL

    def bad(order_id: str) -> None:  # double precision holds one value that is no number
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(sql.SQL("UPDATE {} SET locked_until = 'NaN' WHERE order_id = %s")
                         .format(sql.Identifier(pg_table)), [order_id])

    with PostgresRecoveryQueue(POSTGRES_URL, table=pg_table) as queue:
        spoil(queue, bad)
    check_bad_rows(POSTGRES_URL, capsys, "locked_until is NaN, not a number", "--table",
                   pg_table)


def test_an_unreachable_postgresql_says_unreachable(
    capsys: pytest.CaptureFixture[str]
) -> None:
    from .services import free_port

    port = free_port()  # nothing listens there
    for where in (f"postgresql://postgres:hunter2@127.0.0.1:{port}/test",
                  f"host=127.0.0.1 port={port} dbname=test user=postgres password=hunter2"):
        assert run("dlq", "list", "--queue", where) == (1, "")
        err = capsys.readouterr().err
        assert err.startswith(f"foxpoll: error: PostgreSQL at 127.0.0.1:{port} is "
                              "unreachable")
        assert len(err.splitlines()) == 1
        assert "hunter2" not in err
    assert run("dlq", "list", "--queue", "host=127.0.0.1 password=hunter2 oops") == (1, "")
    err = capsys.readouterr().err
    assert "not a valid PostgreSQL connection string" in err
    assert "hunter2" not in err


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeFoxReload]:
    sim = FakeFoxReload(clock=SystemClock(), default_script=OrderScript.complete(after=0.3))
    with SimulatorServer(sim) as server:
        monkeypatch.setenv("FOXRELOAD_API_KEY", sim.api_key)
        monkeypatch.setenv("FOXRELOAD_BASE_URL", server.url)
        yield sim


def test_catalog_lists_categories_then_product_ids_to_order(
    api: FakeFoxReload, capsys: pytest.CaptureFixture[str]
) -> None:
    code, categories = run("catalog")
    assert code == 0
    assert categories.splitlines()[0] == "esim  Esim"
    assert "steam  Steam" in categories
    code, products = run("catalog", "--category", "steam")
    assert code == 0
    first = products.splitlines()[0]
    assert first == "product_steam_10  Steam Gift Card $10  10.50 usd  stock=1000000"
    assert run("orders", "create", "--item", first.split()[0])[0] == 0  # the id orders
    assert len(api.order_ids()) == 1
    assert run("catalog", "--category", "stean") == (0, "")  # a typo: said, not silent
    assert "no products in category 'stean'" in capsys.readouterr().err


@pytest.mark.slow
def test_orders_create_pay_wait_get(api: FakeFoxReload) -> None:
    code, created = run("orders", "create", "--item", "product_pubg_660:2",
                        "--note", "player_id=77", "--mock")
    assert code == 0
    order_id = created.split()[1].rstrip(":")
    assert "2 x product_pubg_660" in created
    assert api.requests[-1].json == {"items": [{"itemId": "product_pubg_660", "quantity": 2,
                                                "note": {"player_id": "77"}}], "isMock": True}
    code, paid = run("orders", "pay", order_id)
    assert (code, paid.splitlines()[0]) == (0, f"order {order_id}: paid")
    code, waited = run("orders", "wait", order_id, "--timeout", "30")
    assert code == 0
    assert waited.splitlines()[0] == f"order {order_id}: completed"
    assert waited.count("<redacted: --show-codes>") == 2  # codes hidden by default
    code, shown = run("orders", "get", order_id, "--show-codes")
    codes = [line.split("code: ")[1] for line in shown.splitlines() if "code: " in line]
    assert len(codes) == 2
    assert all('"code"' in c and '"pin"' in c for c in codes)
    code, as_json = run("orders", "get", order_id, "--json")
    assert '"externalData": "<redacted: --show-codes>"' in as_json


def test_orders_with_a_bad_key_fail_in_one_line(
    api: FakeFoxReload, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FOXRELOAD_API_KEY", "wrong-key-123")
    code, _ = run("orders", "get", "some-order")
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("foxpoll: error: AuthenticationError: HTTP 401")
    assert "wrong-key-123" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_failed_order_exits_3_not_argparse_s_2(api: FakeFoxReload) -> None:
    api.script_next(OrderScript.fail(after=0.2))
    _, created = run("orders", "create", "--item", "product_steam_10")
    order_id = created.split()[1].rstrip(":")
    run("orders", "pay", order_id)
    code, waited = run("orders", "wait", order_id)
    assert code == 3
    assert "failed" in waited


@pytest.mark.slow
def test_waiting_on_an_unpaid_order_says_so_and_a_stall_exits_4(
    api: FakeFoxReload, capsys: pytest.CaptureFixture[str]
) -> None:
    _, created = run("orders", "create", "--item", "product_steam_10")
    order_id = created.split()[1].rstrip(":")
    code, _ = run("orders", "wait", order_id, "--timeout", "1")
    assert code == 4
    err = capsys.readouterr().err
    assert f"is not paid yet: it will stay active (foxpoll orders pay {order_id})" in err
    assert "stalled" in err


def test_help_names_the_environment_the_item_format_and_the_exit_codes(
    capsys: pytest.CaptureFixture[str]
) -> None:
    for argv in (["orders", "--help"], ["orders", "create", "--help"], ["--help"]):
        with pytest.raises(SystemExit):
            main(argv)
    shown = capsys.readouterr().out
    assert "FOXRELOAD_API_KEY" in shown
    assert "FOXRELOAD_BASE_URL" in shown
    assert "foxpoll catalog --category ID" in shown  # where --item's ids come from
    assert "3    the order failed or was cancelled" in shown
    assert "2    a usage error" in shown
    assert "FOXPOLL_RATE_LIMIT_STORE" in shown


def test_queue_help_names_the_flag_the_variable_and_the_table(
    capsys: pytest.CaptureFixture[str]
) -> None:
    for argv in (["dlq", "list", "--help"], ["recovery", "list", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        shown = capsys.readouterr().out
        assert "FOXPOLL_QUEUE" in shown
        assert "--table" in shown
    with pytest.raises(SystemExit):
        main(["dlq", "--help"])
    assert "resolve" in capsys.readouterr().out


def test_bad_item_spec_is_a_clear_error(api: FakeFoxReload,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert run("orders", "create", "--item", "p:many")[0] == 1
    assert "quantity must be a whole number" in capsys.readouterr().err


def test_missing_key_is_a_clear_error(monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("FOXRELOAD_API_KEY", raising=False)
    assert run("orders", "get", "x")[0] == 1
    assert "FOXRELOAD_API_KEY" in capsys.readouterr().err
    assert os.environ.get("FOXRELOAD_API_KEY") is None


@pytest.mark.slow
def test_simulate_serves_over_http() -> None:
    import time

    import httpx

    from .services import free_port

    port = free_port()
    with subprocess.Popen(  # noqa: S603 - our own command
        [sys.executable, "-m", "foxpoll", "simulate", "--port", str(port), "--api-key", "k1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as server:
        try:
            deadline = time.monotonic() + 15
            while True:
                try:
                    answer = httpx.get(f"http://127.0.0.1:{port}/api/products/product_steam_10/",
                                       headers={"X-API-Key": "k1"})
                    break
                except httpx.ConnectError:
                    assert time.monotonic() < deadline
                    time.sleep(0.1)
            assert answer.status_code == 200
            assert answer.json()["id"] == "product_steam_10"
            assert httpx.get(f"http://127.0.0.1:{port}/api/products/product_steam_10/",
                             headers={"X-API-Key": "wrong"}).status_code == 401
        finally:
            server.terminate()
            server.wait(timeout=10)


@pytest.mark.slow
@pytest.mark.parametrize("store", [None, "sqlite"])
def test_orders_take_permits_from_the_rate_limit_given(
    api: FakeFoxReload, tmp_path: Path, store: str | None
) -> None:
    api.inject(Fault(FaultKind.RATE_LIMIT, method="POST", path="/api/orders/", retry_after=1))
    where = [] if store is None else ["--rate-limit-store", f"sqlite:///{tmp_path / 'b.db'}"]
    code, _ = run("orders", "create", "--rate-limit", "100", *where,
                       "--item", "product_steam_10")
    assert code == 0  # the 429 on the buy was waited out and the buy retried
    assert api.count("POST", "/api/orders/") == 2
    assert len(api.order_ids()) == 1
    if store is not None:
        import contextlib
        import sqlite3

        with contextlib.closing(sqlite3.connect(tmp_path / "b.db")) as db:
            paused = db.execute("SELECT paused_until FROM foxpoll_rate_limit").fetchone()[0]
        assert paused > 0  # the shared budget recorded the 429


def test_bad_rate_limits_are_one_line_errors(
    api: FakeFoxReload, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run("orders", "get", "x", "--rate-limit", "lots")[0] == 1
    assert "requests a minute, or auto" in capsys.readouterr().err
    assert run("orders", "get", "x", "--rate-limit", "0")[0] == 1
    assert "per_minute" in capsys.readouterr().err
    assert run("orders", "get", "x", "--rate-limit-store", "redis://x")[0] == 2
    assert "needs --rate-limit" in capsys.readouterr().err


def test_a_sqlite_budget_is_named_by_its_path_or_a_sqlite_url(
    api: FakeFoxReload, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    buy = ("orders", "create", "--item", "product_steam_10", "--rate-limit", "100")
    for location, made in (("bare.db", "bare.db"), (str(tmp_path / "abs.db"), "abs.db"),
                           ("sqlite:///url.db", "url.db")):
        assert run(*buy, "--rate-limit-store", location)[0] == 0
        assert tables(tmp_path / made) == {"foxpoll_rate_limit"}
    assert run(*buy, "--rate-limit-store", "sqlite://url.db")[0] == 1
    assert "expected sqlite:///PATH" in capsys.readouterr().err
    assert run(*buy, "--rate-limit-store", "mysql://x")[0] == 1
    assert "use a file's PATH, sqlite:///PATH or redis://" in capsys.readouterr().err


def test_the_budget_store_comes_from_the_flag_else_the_environment(
    api: FakeFoxReload, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from_env, from_flag = tmp_path / "env.db", tmp_path / "flag.db"
    monkeypatch.setenv("FOXPOLL_RATE_LIMIT_STORE", f"sqlite:///{from_env}")
    buy = ("orders", "create", "--item", "product_steam_10")
    assert run(*buy)[0] == 0
    assert not from_env.exists()  # no budget asked for: the variable alone starts none
    assert run(*buy, "--rate-limit", "100")[0] == 0
    assert from_env.exists()
    from_env.unlink()
    assert run(*buy, "--rate-limit", "100", "--rate-limit-store", f"sqlite:///{from_flag}"
               )[0] == 0
    assert from_flag.exists()
    assert not from_env.exists()  # the flag wins


BUY = ("orders", "create", "--item", "product_steam_10", "--rate-limit", "100")


def test_the_cli_shares_a_sqlite_budget_in_the_table_it_names(
    api: FakeFoxReload, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "b.db"
    store = f"sqlite:///{path}"
    assert run(*BUY, "--rate-limit-store", store, "--rate-limit-table", "partner_budget"
               )[0] == 0
    assert tables(path) == {"partner_budget"}  # the named table, not the default one
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT key FROM partner_budget").fetchall() == [("default",)]
    monkeypatch.setenv("FOXPOLL_RATE_LIMIT_STORE", store)
    monkeypatch.setenv("FOXPOLL_RATE_LIMIT_TABLE", "main.env_budget")
    assert run(*BUY)[0] == 0
    assert tables(path) == {"partner_budget", "env_budget"}
    assert run(*BUY, "--rate-limit-table", "flag_budget")[0] == 0  # the flag wins
    assert tables(path) == {"partner_budget", "env_budget", "flag_budget"}


def test_the_cli_shares_a_sqlite_budget_in_the_row_it_names(
    api: FakeFoxReload, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLiteRateLimit(key=) keeps one budget per API key in one table: the CLI's
    requests must count against the row of the key they are sent with."""
    path = tmp_path / "b.db"
    store = f"sqlite:///{path}"
    assert run(*BUY, "--rate-limit-store", store, "--rate-limit-key", "key-one")[0] == 0
    monkeypatch.setenv("FOXPOLL_RATE_LIMIT_STORE", store)
    monkeypatch.setenv("FOXPOLL_RATE_LIMIT_KEY", "key-two")
    assert run(*BUY)[0] == 0
    with contextlib.closing(sqlite3.connect(path)) as db:
        rows = db.execute("SELECT key FROM foxpoll_rate_limit ORDER BY key").fetchall()
    assert rows == [("key-one",), ("key-two",)]


@pytest.mark.service
def test_the_cli_shares_a_redis_budget_under_the_key_prefix_it_names(
    api: FakeFoxReload, monkeypatch: pytest.MonkeyPatch
) -> None:
    import redis

    from .services import REDIS_URL, delete_keys, require

    require("Redis", "127.0.0.1", 6379)
    prefix = f"cli-{uuid.uuid4().hex[:8]}:"
    try:
        with redis.Redis.from_url(REDIS_URL) as client:
            assert run(*BUY, "--rate-limit-store", REDIS_URL,
                       "--rate-limit-key-prefix", f"{prefix}flag:")[0] == 0
            assert client.exists(f"{prefix}flag:rate-limit")
            monkeypatch.setenv("FOXPOLL_RATE_LIMIT_STORE", REDIS_URL)
            monkeypatch.setenv("FOXPOLL_RATE_LIMIT_KEY_PREFIX", f"{prefix}env:")
            assert run(*BUY)[0] == 0
            assert client.exists(f"{prefix}env:rate-limit")
    finally:
        delete_keys(prefix)


@pytest.mark.parametrize(("argv", "env", "said"), [
    (["--rate-limit-store", "sqlite:///b.db", "--rate-limit-key-prefix", "acme:"], {},
     "--rate-limit-key-prefix names a Redis budget's key prefix, but the budget is SQLite "
     "(a SQLite budget takes --rate-limit-table)"),
    (["--rate-limit-store", "redis://127.0.0.1:1", "--rate-limit-table", "acme"], {},
     "--rate-limit-table names a SQLite budget's table, but the budget is Redis (a Redis "
     "budget takes --rate-limit-key-prefix)"),
    (["--rate-limit-table", "acme"], {},
     "--rate-limit-table names a SQLite budget's table, but the budget is in-process: "
     "give --rate-limit-store sqlite:///PATH"),
    (["--rate-limit-store", "redis://127.0.0.1:1"], {"FOXPOLL_RATE_LIMIT_TABLE": "acme"},
     "$FOXPOLL_RATE_LIMIT_TABLE names a SQLite budget's table, but the budget is Redis"),
    ([], {"FOXPOLL_RATE_LIMIT_KEY_PREFIX": "acme:"},
     "$FOXPOLL_RATE_LIMIT_KEY_PREFIX names a Redis budget's key prefix, but the budget is "
     "in-process: give --rate-limit-store redis://..."),
    (["--rate-limit-table", "bad name"], {"FOXPOLL_RATE_LIMIT_STORE": "sqlite:///b.db"},
     "--rate-limit-table: table name 'bad name'"),
    (["--rate-limit-store", "redis://127.0.0.1:1", "--rate-limit-key", "key-one"], {},
     "--rate-limit-key names a SQLite budget's row, but the budget is Redis (a Redis budget "
     "takes --rate-limit-key-prefix)"),
    ([], {"FOXPOLL_RATE_LIMIT_KEY": "key-one"},
     "$FOXPOLL_RATE_LIMIT_KEY names a SQLite budget's row, but the budget is in-process: "
     "give --rate-limit-store sqlite:///PATH"),
])
def test_a_budget_name_that_does_not_fit_the_store_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    argv: list[str], env: dict[str, str], said: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FOXRELOAD_API_KEY", raising=False)  # refused before any request
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert run("orders", "get", "o-1", "--rate-limit", "100", *argv) == (2, "")
    err = capsys.readouterr().err
    assert err.startswith(f"foxpoll: error: {said}")
    assert len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # no budget file made


@pytest.mark.parametrize("flag", ["--rate-limit-table", "--rate-limit-key",
                                  "--rate-limit-key-prefix"])
def test_a_budget_name_needs_a_budget(capsys: pytest.CaptureFixture[str], flag: str) -> None:
    assert run("orders", "get", "o-1", flag, "x") == (2, "")
    assert capsys.readouterr().err == f"foxpoll: error: {flag} needs --rate-limit\n"


def _first_order_id(*argv: str) -> str:
    """The first order id of the simulator ``foxpoll simulate ARGV`` would serve."""
    import argparse

    from foxpoll.testing.__main__ import add_arguments, simulator

    parser = argparse.ArgumentParser()
    add_arguments(parser)  # the options of ``foxpoll simulate``
    sim = simulator(parser.parse_args(list(argv)))
    with sim.client() as client:
        return client.orders.create(items=[{"itemId": "product_steam_10", "quantity": 1}]).id


def test_a_restarted_simulator_never_repeats_order_ids() -> None:
    # A dedup store kept from the last run would skip a repeated id as already delivered.
    assert _first_order_id() != _first_order_id()
    assert _first_order_id("--seed", "7") == _first_order_id("--seed", "7")


# Issue 23, finding 7: nothing from the server reaches the terminal as a control character.

#: What a terminal acts on: C0 but the line break and the tab, DEL, C1 (ESC among them).
CONTROLS = {chr(c) for c in [*range(0x20), *range(0x7f, 0xa0)]} - {"\n", "\t"}


@pytest.mark.slow
def test_no_escape_sequence_from_the_server_reaches_the_terminal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from foxpoll.testing import HostileServer, Hostility

    printed: dict[str, str] = {}
    with HostileServer(Hostility.ESCAPES) as server:
        monkeypatch.setenv("FOXRELOAD_API_KEY", "sk-live-escapes")
        monkeypatch.setenv("FOXRELOAD_BASE_URL", server.url)
        for argv in (["orders", "get", "o1"], ["orders", "get", "o1", "--show-codes"],
                     ["orders", "get", "o1", "--json", "--show-codes"],
                     ["orders", "wait", "o1", "--timeout", "0.5"],  # unknown status: stalls
                     ["catalog"], ["catalog", "--category", "c1"],
                     ["orders", "pay", "o1"], ["orders", "create", "--item", "p1"]):
            _, out = run(*argv)
            printed[" ".join(argv)] = out + capsys.readouterr().err
    path = tmp_path / "q.db"
    with SQLiteRecoveryQueue(path) as queue:  # what a worker kept of the server's words
        queue.enqueue("o-1")
        queue.bury("o-1", last_status="\x1b[2Jprocessing", last_error="HTTP 500: \x1b]0;x\x07")
    for argv in (["dlq", "list"], ["recovery", "list", "--state", "dead"]):
        _, out = run(*argv, "--queue", f"sqlite:///{path}")
        printed[" ".join(argv)] = out + capsys.readouterr().err
    for command, text in printed.items():
        assert not CONTROLS & set(text), (command, text)
    assert printed["orders get o1"].startswith("order o1: completed\n  cancelled: xy\n")
    assert "1 x xy (error: xy)" in printed["orders get o1"]
    assert '"externalData": [\n' in printed["orders get o1 --json --show-codes"]
    assert "\\u001b]0;owned\\u0007" in printed["orders get o1 --json --show-codes"]
    assert "  poll 1: completed (0s)" in printed["orders wait o1 --timeout 0.5"]
    assert "foxpoll: the wait stalled: order o1 still completed" in printed[
        "orders wait o1 --timeout 0.5"]
    assert printed["catalog --category c1"] == "xy  xy  1.00 xy  stock=1\n"
    assert printed["orders pay o1"] == ("foxpoll: error: BadRequestError: HTTP 400 for POST "
                                        "/api/orders/o1/pay [xy]: xy\n")
    assert "last_status=processing  last_error=HTTP 500: " in printed["dlq list"]


#: What reorders or breaks a line on screen: bidirectional marks, embeddings, overrides
#: and isolates, and the line and paragraph separators.
BIDI = {"\u200e", "\u200f", *map(chr, range(0x202a, 0x202f)), *map(chr, range(0x2066, 0x206a)),
        "\u2028", "\u2029"}


def test_no_bidirectional_override_or_line_separator_from_the_server_is_printed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from foxpoll.testing import HostileServer

    text = "".join(f"{c}x" for c in sorted(BIDI))
    body = {"id": "o1", "status": "completed", "cancelReason": f"a{text}b",
            "items": [{"itemId": f"p{text}1", "externalData": ["C"]}]}
    with HostileServer(body=body) as server:
        monkeypatch.setenv("FOXRELOAD_API_KEY", "sk-live-bidi")
        monkeypatch.setenv("FOXRELOAD_BASE_URL", server.url)
        code, out = run("orders", "get", "o1")
    out += capsys.readouterr().err
    assert code == 0
    assert not BIDI & set(out), out
    assert "x x" in out  # a separator is a space, as a line break is


# Finding 8: a password in a URL is never printed.

@pytest.mark.parametrize("argv", [
    ["orders", "get", "o1", "--rate-limit", "100", "--rate-limit-store",
     "rediss//:hunter2@127.0.0.1:1"],  # mistyped
    ["orders", "get", "o1", "--rate-limit", "100", "--rate-limit-store",
     "postgresql://u:hunter2@127.0.0.1:1/db"],  # not a budget's store
    ["dlq", "list", "--queue", "postgresql:/u:hunter2@127.0.0.1/db"],  # mistyped
    ["dlq", "list", "--queue", "mysql://hunter2@127.0.0.1/db"],  # a token for a user name
    ["dlq", "list", "--queue", "mysql://127.0.0.1/db?password=hunter2"],
    ["dlq", "list", "--queue", "postgresql://u:hunter2 x@127.0.0.1:1/db"],  # a space
    # redis-py's own message quotes what precedes a / as the port: never printed.
    ["orders", "get", "o1", "--rate-limit", "100", "--rate-limit-store",
     "redis://default:hunter2/x@127.0.0.1:1/0"],
    ["orders", "get", "o1", "--rate-limit", "100", "--rate-limit-store",
     "redis://u:hunter2@127.0.0.1:notaport/0"],
    ["orders", "get", "o1", "--rate-limit", "100", "--rate-limit-store",
     "redis://:hunter2@127.0.0.1:1/0?db=x"],
    ["orders", "get", "o1", "--rate-limit", "100", "--rate-limit-store",
     "redis://u:a@b:hunter2@127.0.0.1:1/0?db=x"],  # an @ in the password
])
def test_a_password_in_a_url_given_to_the_cli_is_never_printed(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = run(*argv)
    err = capsys.readouterr().err
    assert code == 1
    assert "hunter2" not in out + err  # masked (***), or not quoted at all


def test_a_base_url_with_a_password_is_refused_without_printing_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FOXRELOAD_API_KEY", "sk-live-cli")
    monkeypatch.setenv("FOXRELOAD_BASE_URL", "https://gw:hunter2@api.example.com")
    assert run("orders", "get", "o1") == (1, "")
    err = capsys.readouterr().err
    assert err.startswith("foxpoll: error: ValueError: base_url holds a user name or password")
    assert "hunter2" not in err
