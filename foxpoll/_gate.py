"""At most N requests in flight per client; the others queue here, by priority.

A thousand tasks sharing one ``httpx.AsyncClient`` would otherwise queue inside httpcore's
connection pool, first come first served, until its pool timeout raises ``PoolTimeout``.
Queued in foxpoll instead, they wait without a timeout of their own (the call's deadline
still holds) and a buy goes before a poll. The sync client's threads queue the same way.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import threading

__all__ = ["AsyncGate", "Gate", "GateType", "check_in_flight"]


def check_in_flight(size: int) -> int:
    """``size``, if it is a whole number of requests in flight, at least 1 (a float, nan
    among them, would pass a comparison and spin a loop)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError("max_in_flight must be a whole number, at least 1")
    return size


class AsyncGate:
    """An asyncio semaphore that wakes its waiters lowest priority first, then in order.

    A client's gate also holds ``reads``, a gate of one for the large bodies the client
    reads in worker threads (:class:`foxpoll._effects.Parse`): decoding holds the GIL, so
    eight at once would hold the event loop for most of their time (measured: ticks up to
    0.9 s late, against 0.06 s for one at a time).
    """

    def __init__(self, size: int, *, reads: bool = True) -> None:
        self.size = check_in_flight(size)
        self.busy = 0
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()
        self.reads = AsyncGate(1, reads=False) if reads else None

    async def acquire(self, priority: int) -> None:
        if self.busy < self.size and not self._waiting:
            self.busy += 1
            return
        slot = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (priority, next(self._order), slot))
        try:
            await slot
        except BaseException:
            if slot.done() and not slot.cancelled():
                self.release()  # handed the slot just as it was cancelled: pass it on
            raise

    def release(self) -> None:
        while self._waiting:
            _, _, slot = heapq.heappop(self._waiting)
            if not slot.done():  # a cancelled waiter is skipped here, lazily
                slot.set_result(None)  # the slot goes straight to it: busy is unchanged
                return
        self.busy -= 1


class Gate:
    """:class:`AsyncGate` for threads."""

    def __init__(self, size: int) -> None:
        self.size = check_in_flight(size)
        self.busy = 0
        self._waiting: list[tuple[int, int]] = []
        self._order = itertools.count()
        self._changed = threading.Condition()

    @property
    def waiting(self) -> int:
        """Threads queued for a slot."""
        with self._changed:
            return len(self._waiting)

    def acquire(self, priority: int) -> None:
        with self._changed:
            ticket = (priority, next(self._order))
            heapq.heappush(self._waiting, ticket)
            while self.busy >= self.size or self._waiting[0] != ticket:
                self._changed.wait()
            heapq.heappop(self._waiting)
            self.busy += 1
            self._changed.notify_all()  # the next ticket may go too

    def release(self) -> None:
        with self._changed:
            self.busy -= 1
            self._changed.notify_all()


GateType = Gate | AsyncGate
