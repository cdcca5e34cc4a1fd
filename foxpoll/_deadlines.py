"""Deadlines for calls that block on a network: one watchdog thread for blocking I/O, and
one timeout scope for asyncio.

A blocking read on a frozen connection cannot be interrupted from its own thread, and
neither psycopg nor redis-py bounds a single call. The :data:`WATCHDOG` runs a given action
(shut the socket down) for any armed call still running at its deadline; the blocked read
then fails at once. Arming and disarming cost a heap push and a flag under one lock, so a
call that ends in time pays a few microseconds.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["WATCHDOG", "Alarm", "Watchdog", "shut_down_fd", "within"]

if sys.version_info >= (3, 11):
    from asyncio import timeout as within
else:  # pragma: no cover - anyio comes with httpx
    from collections.abc import AsyncIterator
    from contextlib import asynccontextmanager

    import anyio

    @asynccontextmanager
    async def within(delay: float) -> AsyncIterator[None]:
        """Cancel the block after ``delay`` seconds, raising :class:`TimeoutError`."""
        with anyio.fail_after(delay):
            yield


class Alarm:
    """An armed deadline; :meth:`Watchdog.disarm` it when the call ends."""

    __slots__ = ("action", "deadline", "done", "fired")

    def __init__(self, deadline: float, action: Callable[[], Any]) -> None:
        self.deadline, self.action = deadline, action
        self.done = self.fired = False


class Watchdog:
    """Runs the action of every alarm still armed at its deadline, from one daemon thread."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Alarm]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, seconds: float, action: Callable[[], Any]) -> Alarm:
        """Run ``action`` in ``seconds`` unless disarmed first."""
        alarm = Alarm(time.monotonic() + seconds, action)
        with self._cond:
            heapq.heappush(self._heap, (alarm.deadline, next(self._order), alarm))
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="foxpoll-watchdog",
                                                daemon=True)
                self._thread.start()
            elif self._heap[0][2] is alarm:
                self._cond.notify()
        return alarm

    def disarm(self, alarm: Alarm) -> bool:
        """Stop ``alarm``; whether its action ran (the call was cut short)."""
        with self._cond:  # never fires after this returns: the action runs under the lock
            alarm.done = True
            return alarm.fired

    def _watch(self) -> None:
        with self._cond:
            while True:
                while self._heap and self._heap[0][2].done:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait()
                    continue
                left = self._heap[0][0] - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                alarm = heapq.heappop(self._heap)[2]
                alarm.done = alarm.fired = True
                with contextlib.suppress(Exception):  # a socket gone is as good as shut
                    alarm.action()


WATCHDOG = Watchdog()


def shut_down_fd(fd: int) -> None:
    """Shut a connected socket down both ways, by file descriptor, leaving the descriptor
    to its owner: a read blocked on it returns at once, as if the peer had closed."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.detach()  # the descriptor stays its owner's to close
