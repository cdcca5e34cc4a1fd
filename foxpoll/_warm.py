"""Connections a blocking store keeps out of its pool between calls: *warm* ones.

Taking a connection from a pool and giving it back runs a lock, bookkeeping and (in
redis-py) a health poll of the socket; right after a round trip that costs tens of
microseconds a call, and a delivery makes two calls. So a store keeps a connection that
served a call well for the next one, for up to ``reuse_for`` seconds after it left the
pool. It goes back to the pool when that time is up, when a call on it failed, when the
store falls idle (a watchdog alarm) or is closed, and never serves a forked child: the
pool's own checks still see every connection within ``reuse_for``, and a caller's pool
shared with other code lends it out again as soon.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import weakref
from typing import Any, Generic, Protocol, TypeVar

from ._deadlines import WATCHDOG

__all__ = ["Held", "WarmConnections"]


class Held(Protocol):
    """One connection out of its pool, as a store holds it."""

    #: When the connection left the pool (``time.monotonic()``).
    since: float

    def put_back(self) -> None:
        """Return the connection to its pool."""


H = TypeVar("H", bound=Held)


class WarmConnections(Generic[H]):
    """The warm connections of one store, each for at most ``reuse_for`` seconds (0: none
    is kept)."""

    def __init__(self, reuse_for: float) -> None:
        if not 0 <= reuse_for <= 60:
            raise ValueError("reuse_connection_for must be between 0 and 60 seconds")
        self.reuse_for = reuse_for
        self._forget()
        _ALL.add(self)

    def _forget(self) -> None:
        """Hold none; in a forked child too, where they are the parent's to use and return.
        The lock also guards whether a flush of the idle ones is armed."""
        self._lock = threading.Lock()
        self._held: list[H] = []
        self._flush_armed = False

    def take(self) -> H | None:
        """A warm connection for one call, or None: take one from the pool."""
        with self._lock:
            return self._held.pop() if self._held else None

    def keep(self, held: H) -> bool:
        """Keep ``held`` for the next call, unless it is past ``reuse_for``; whether it was
        kept (if not, the caller puts it back)."""
        left = held.since + self.reuse_for - time.monotonic()
        if left <= 0:
            return False
        with self._lock:
            self._held.append(held)
            if self._flush_armed:
                return True
            self._flush_armed = True
        WATCHDOG.arm(left, self.flush)
        return True

    def flush(self, everything: bool = False) -> None:
        """Put back the connections past ``reuse_for`` (``everything``: all of them), and
        arm the next flush while some stay warm."""
        now = time.monotonic()
        with self._lock:
            done: list[H] = []
            keep: list[H] = []
            for held in self._held:
                stale = everything or now - held.since >= self.reuse_for
                (done if stale else keep).append(held)
            self._held = keep
            self._flush_armed = bool(keep)
            if keep:  # when the first of them is due back
                WATCHDOG.arm(min(h.since for h in keep) + self.reuse_for - now, self.flush)
        for held in done:
            # One connection its pool will not take back must not strand the others.
            with contextlib.suppress(Exception):
                held.put_back()

    def __len__(self) -> int:
        return len(self._held)


def _forget_all() -> None:
    for warm in _ALL:
        warm._forget()


_ALL: weakref.WeakSet[WarmConnections[Any]] = weakref.WeakSet()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_all)
