"""Deadlines for calls that wait on a network: a watchdog for psycopg calls, and one timeout
scope for asyncio.

psycopg has no client-side deadline for a statement. The server's ``statement_timeout``
ends a statement that runs too long, and libpq's TCP settings end a connection whose peer
stops acknowledging; but when the network freezes with the TCP connection still
acknowledged (a stalled proxy, a hung middlebox), the server's answer never comes and the
read waits for good. A blocking read cannot be interrupted from its own thread, and on
asyncio psycopg answers a cancelled statement by sending a cancel request and waiting for
the server again (seconds at least, through a frozen network). So the :data:`WATCHDOG`
shuts the connection's socket down when a call is still running at its deadline: the read
then fails at once, whichever thread or event loop is waiting on it.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import math
import os
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
    """Runs the action of every alarm still armed at its deadline, from one daemon thread.

    The thread starts on the first alarm (in a forked child too: the parent's thread did
    not come along, and the parent's alarms are not the child's). A disarmed alarm stays
    in the heap until its deadline, or until the disarmed ones make up half of it, so the
    heap holds about the calls in flight.
    """

    #: Rebuild the heap once this many disarmed alarms (and half the heap) sit in it.
    COMPACT_AFTER = 64

    def __init__(self) -> None:
        self._forget()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        # Reentrant: an action may arm the next alarm, under the lock it runs under.
        self._cond = threading.Condition(threading.RLock())
        self._heap: list[tuple[float, int, Alarm]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None
        self._stale = 0  # disarmed alarms still in the heap

    def arm(self, seconds: float, action: Callable[[], Any]) -> Alarm:
        """Run ``action`` in ``seconds`` unless disarmed first."""
        alarm = Alarm(time.monotonic() + seconds, action)
        with self._cond:
            heapq.heappush(self._heap, (alarm.deadline, next(self._order), alarm))
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, daemon=True,
                                                name="foxpoll-watchdog")
                self._thread.start()
            elif self._heap[0][2] is alarm:  # due before what the thread waits for
                self._cond.notify()
        return alarm

    def disarm(self, alarm: Alarm) -> bool:
        """Stop ``alarm``; whether its action ran (the call was cut short). The action
        never starts after this returns: it runs under the same lock."""
        with self._cond:
            if not alarm.done:
                alarm.done = True
                self._stale += 1
                if self._stale > self.COMPACT_AFTER and 2 * self._stale > len(self._heap):
                    self._heap = [entry for entry in self._heap if not entry[2].done]
                    heapq.heapify(self._heap)
                    self._stale = 0
            return alarm.fired

    def pending(self) -> int:
        """Alarms in the heap, disarmed ones not yet dropped included."""
        with self._cond:
            return len(self._heap)

    def _watch(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                while self._heap and self._heap[0][0] <= now:
                    alarm = heapq.heappop(self._heap)[2]
                    if alarm.done:
                        self._stale -= 1
                        continue
                    alarm.done = alarm.fired = True
                    with contextlib.suppress(Exception):  # a socket gone is as good as shut
                        alarm.action()
                wake_at = self._heap[0][0] if self._heap else math.inf
                self._cond.wait(None if wake_at == math.inf else wake_at - time.monotonic())


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
