"""Every SQLite class takes its file in the forms the ``foxpoll`` command takes: a path
(``str`` or ``os.PathLike``), or ``sqlite:///PATH`` (relative; ``sqlite:////PATH`` is
absolute), and refuses a ``sqlite:`` location of any other shape rather than make a file
of that name."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from foxpoll.dedup import AsyncSQLiteDedupStore, SQLiteDedupStore
from foxpoll.ratelimit import SQLiteRateLimit
from foxpoll.recovery import SQLiteRecoveryQueue

KINDS: dict[str, Callable[[Any], Any]] = {
    "SQLiteDedupStore": SQLiteDedupStore,
    "AsyncSQLiteDedupStore": AsyncSQLiteDedupStore,
    "SQLiteRecoveryQueue": SQLiteRecoveryQueue,
    "SQLiteRateLimit": lambda where: SQLiteRateLimit(where, per_minute=100),
}
TABLES = {"SQLiteDedupStore": "foxpoll_deliveries", "AsyncSQLiteDedupStore":
          "foxpoll_deliveries", "SQLiteRecoveryQueue": "foxpoll_recovery",
          "SQLiteRateLimit": "foxpoll_rate_limit"}


async def _close(made: Any) -> None:
    if isinstance(made, AsyncSQLiteDedupStore):
        await made.aclose()
    else:
        made.close()


def _tables(path: Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as db:
        return {row[0] for row in db.execute("SELECT name FROM sqlite_master "
                                             "WHERE type = 'table'")}


def _files(folder: Path, suffix: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix == suffix)


@pytest.mark.parametrize("kind", list(KINDS))
async def test_a_path_and_a_sqlite_url_name_the_same_file(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    absolute = tmp_path / "absolute.db"
    for where, made in ((Path("path.db"), "path.db"), ("text.db", "text.db"),
                        ("sqlite:///relative.db", "relative.db"),
                        (f"sqlite:///{absolute}", "absolute.db"),  # sqlite:////tmp/...
                        (str(absolute), "absolute.db")):
        await _close(KINDS[kind](where))
        assert TABLES[kind] in _tables(tmp_path / made), where
    assert _files(tmp_path, ".db") == ["absolute.db", "path.db", "relative.db", "text.db"]


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("where", ["sqlite://host/x.db", "sqlite:x.db", "sqlite:///",
                                   "sqlite:///x.db?mode=ro", "sqlite:"])
def test_a_sqlite_location_of_another_shape_is_refused_and_makes_no_file(
    kind: str, where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="expected sqlite:///PATH"):
        KINDS[kind](where)
    assert list(tmp_path.iterdir()) == []
