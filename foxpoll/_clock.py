"""Where foxpoll gets the time and sleeps: one injectable object, so tests run on virtual time."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol, runtime_checkable

__all__ = ["Clock", "SystemClock"]


@runtime_checkable
class Clock(Protocol):
    """Time and sleep, for sync and async code alike.

    ``monotonic`` measures durations and deadlines within a process. ``time`` is wall-clock
    seconds since the epoch, for the instants that other processes, machines or servers
    read too: HTTP dates (``Retry-After``); the times stores and queues keep (a delivery's
    lease, a watch's or a recovery job's ``due_at``); the state a
    :class:`foxpoll.ratelimit.SQLiteRateLimit` shares through its file; a wait's
    ``started_at`` (:class:`foxpoll.WaitStart`); an event's time.
    """

    def monotonic(self) -> float: ...

    def time(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...

    async def asleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clock: :func:`time.monotonic`, :func:`time.sleep`, :func:`asyncio.sleep`."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    async def asleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def __repr__(self) -> str:
        return "SystemClock()"
