"""Deadlines for calls that block on a network: one watchdog thread for blocking I/O, and
one timeout scope for asyncio.

A blocking read on a frozen connection cannot be interrupted from its own thread, and
neither psycopg nor redis-py bounds a single call. The :data:`WATCHDOG` runs a given action
(shut the socket down) for any armed call still running at its deadline; the blocked read
then fails at once. Arming and disarming cost a heap push and a flag under one lock, so a
call that ends in time pays a couple of microseconds. A connection that serves many calls
in a row takes a :class:`Guard` instead, which costs a clock read and a lock per call.
"""

from __future__ import annotations

import contextlib
import functools
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

__all__ = ["WATCHDOG", "Alarm", "Guard", "Watchdog", "shut_down_fd", "within"]

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


class Guard:
    """The deadline of the calls one connection serves, one at a time: :meth:`start` each,
    :meth:`stop` it when it ends; :meth:`close` when the connection goes.

    Where an alarm takes a heap entry per call, a guard is made once per connection and a
    call only writes its deadline: the watchdog looks at its guards every tenth of the
    shortest guard's ``seconds`` (at least every :attr:`Watchdog.GUARD_TICK_MIN`), so a
    call is cut between ``seconds`` and ``1.1 * seconds`` after it started.
    """

    __slots__ = ("_lock", "_watchdog", "action", "deadline", "fired", "seconds")

    def __init__(self, watchdog: Watchdog, seconds: float, action: Callable[[], Any]) -> None:
        self._watchdog, self.seconds, self.action = watchdog, seconds, action
        self._lock = threading.Lock()
        self.deadline = 0.0  # of the call running, 0 when none is
        self.fired = False

    def start(self) -> None:
        """A call begins: cut it ``seconds`` from now unless stopped first."""
        self.fired = False
        self.deadline = time.monotonic() + self.seconds

    def stop(self) -> bool:
        """The call ended; whether it was cut. The action never runs after this returns
        (it runs under the guard's lock)."""
        with self._lock:
            self.deadline = 0.0
            return self.fired

    def close(self) -> None:
        """The connection is gone: stop watching it."""
        self.stop()
        self._watchdog._unguard(self)

    def _check(self, now: float) -> None:
        with self._lock:
            if 0.0 < self.deadline <= now:
                self.deadline, self.fired = 0.0, True
                with contextlib.suppress(Exception):  # a socket gone is as good as shut
                    self.action()


class Watchdog:
    """Runs the action of every alarm still armed at its deadline, from one daemon thread.

    Nearly every alarm is disarmed long before its deadline. A disarmed alarm stays in the
    heap until its deadline, or until the disarmed ones make up half the heap, when the
    heap is rebuilt without them: memory follows the calls in flight, not the calls made
    in the last ``seconds``. The thread wakes at the earliest deadline in the heap, and is
    woken early only by an alarm due before that, so arming a call costs no thread switch.
    """

    #: Rebuild the heap once this many disarmed alarms (and half the heap) sit in it.
    COMPACT_AFTER = 64
    #: The shortest interval between two looks at the guards.
    GUARD_TICK_MIN = 0.01

    def __init__(self) -> None:
        self._forget()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        """Start empty; also in a forked child, which the thread did not come along to, and
        whose parent's calls are not the child's to cut."""
        # arm and disarm take the lock itself: a Condition's __enter__ is Python code. An
        # action may arm the next alarm (a store's flush of idle connections), under the lock.
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._heap: list[tuple[float, int, Alarm]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None
        self._wake_at = math.inf  # when the thread will next look at the heap
        self._stale = 0  # disarmed alarms still in the heap
        self._guards: set[Guard] = set()
        self._look_at = math.inf  # when the guards are looked at next, inf for never
        self._look = 0  # the live look's number: the looks it overtook do nothing

    def arm(self, seconds: float, action: Callable[[], Any]) -> Alarm:
        """Run ``action`` in ``seconds`` unless disarmed first."""
        alarm = Alarm(time.monotonic() + seconds, action)
        with self._lock:
            heapq.heappush(self._heap, (alarm.deadline, next(self._order), alarm))
            if alarm.deadline < self._wake_at:
                self._wake_at = alarm.deadline
                if self._thread is None:
                    self._thread = threading.Thread(target=self._watch, daemon=True,
                                                    name="foxpoll-watchdog")
                    self._thread.start()
                else:
                    self._cond.notify()
        return alarm

    def disarm(self, alarm: Alarm) -> bool:
        """Stop ``alarm``; whether its action ran (the call was cut short)."""
        with self._lock:  # never fires after this returns: the action runs under the lock
            if not alarm.done:
                alarm.done = True
                self._stale += 1
                if self._stale > self.COMPACT_AFTER and 2 * self._stale > len(self._heap):
                    self._heap = [entry for entry in self._heap if not entry[2].done]
                    heapq.heapify(self._heap)
                    self._stale = 0
            return alarm.fired

    def guard(self, seconds: float, action: Callable[[], Any]) -> Guard:
        """A :class:`Guard` running ``action`` on a call still running ``seconds`` after it
        started."""
        guard = Guard(self, seconds, action)
        tick = max(self.GUARD_TICK_MIN, seconds / 10)
        with self._lock:
            self._guards.add(guard)
            at = time.monotonic() + tick
            if at >= self._look_at:  # the next look comes soon enough for this one too
                return guard
            self._look_at, self._look = at, self._look + 1
            self.arm(tick, functools.partial(self._look_at_guards, self._look))
        return guard

    def _unguard(self, guard: Guard) -> None:
        with self._lock:
            self._guards.discard(guard)

    def _look_at_guards(self, number: int) -> None:
        """Cut the guarded calls past their deadline, and look again a tenth of the
        shortest guard's ``seconds`` later while any guard is left (the watchdog's lock,
        held here, lets this arm)."""
        now = time.monotonic()
        with self._lock:
            if number != self._look:  # an earlier look overtook this one, and re-arms
                return
            guards = list(self._guards)
            self._look_at = math.inf
            if guards:
                tick = max(self.GUARD_TICK_MIN, min(g.seconds for g in guards) / 10)
                self._look_at, self._look = now + tick, self._look + 1
                self.arm(tick, functools.partial(self._look_at_guards, self._look))
        for guard in guards:
            guard._check(now)

    def pending(self) -> int:
        """Alarms in the heap, disarmed ones not yet dropped included."""
        with self._lock:
            return len(self._heap)

    def _watch(self) -> None:
        with self._cond:
            while True:
                # Look only at what is due: popping disarmed alarms early would empty the
                # heap and leave the thread waiting for a notify from every next arm.
                now = time.monotonic()
                while self._heap and self._heap[0][0] <= now:
                    alarm = heapq.heappop(self._heap)[2]
                    if alarm.done:
                        self._stale -= 1
                        continue
                    alarm.done = alarm.fired = True
                    with contextlib.suppress(Exception):  # a socket gone is as good as shut
                        alarm.action()
                self._wake_at = self._heap[0][0] if self._heap else math.inf
                # Measured again: the actions just run (a pool taking connections back)
                # took time of their own.
                self._cond.wait(None if not self._heap else self._wake_at - time.monotonic())


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
