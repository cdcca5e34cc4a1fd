"""Where the SQLite stores, queue and budget keep their file, and how they open it.

Each takes its location in one of two forms: a path (``str`` or :class:`os.PathLike`), or
a ``sqlite:///PATH`` URL, read as SQLAlchemy reads one: ``sqlite:///app.db`` is
``app.db``, relative to the working directory, and ``sqlite:////var/lib/app.db`` the
absolute ``/var/lib/app.db``. ``foxpoll`` (the command) takes the same two forms.
"""

from __future__ import annotations

import os
import sqlite3

from foxpoll.errors import StoreError

__all__ = ["SCHEME", "closed", "connect", "sqlite_path"]

SCHEME = "sqlite:///"


def sqlite_path(where: str | os.PathLike[str]) -> str:
    """The file ``where`` names: a path as it is, or a ``sqlite:///PATH`` URL's path.

    Raises:
        ValueError: ``where`` starts with ``sqlite:`` but is not ``sqlite:///PATH``, or
            its path carries a query (``?``), which would become part of the file's name.
    """
    if not isinstance(where, str):
        return os.fspath(where)
    if not where.startswith("sqlite:"):
        return where
    path = where[len(SCHEME):] if where.startswith(SCHEME) else ""
    if not path or "?" in path:
        raise ValueError(f"SQLite location {where!r}: expected sqlite:///PATH (relative) or "
                         "sqlite:////PATH (absolute), without a query, or a plain path")
    return path


def connect(where: str | os.PathLike[str], *, busy_timeout: float) -> sqlite3.Connection:
    """A connection to the file ``where`` names (created if missing), in autocommit mode
    (the caller begins its own transactions), for any thread (the caller locks).

    Raises:
        ValueError: ``where`` is not a location (see :func:`sqlite_path`).
        StoreError: The path is a directory, or its directory does not exist: waiting
            would not cure either.
        sqlite3.Error: Any other failure to open it, for the caller to map.
    """
    path = sqlite_path(where)
    try:
        return sqlite3.connect(path, timeout=busy_timeout, isolation_level=None,
                               check_same_thread=False)
    except sqlite3.Error as exc:
        folder = os.path.dirname(path) or "."
        if os.path.isdir(path):
            raise StoreError(f"SQLite file {path!r} is a directory") from exc
        if path != ":memory:" and not os.path.isdir(folder):
            raise StoreError(f"SQLite file {path!r}: no directory {folder!r}") from exc
        raise


def closed(what: str) -> StoreError:
    """The error for a call on ``what`` after its ``close()``: a mistake in the program,
    not an outage, so a :class:`StoreError` and never a ``StoreUnavailable``."""
    return StoreError(f"{what} is closed: make a new one to use it again")
