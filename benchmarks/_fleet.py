"""What the fleet benchmarks share: a metered API in front of the simulator, and a clock
that runs faster than the wall's, for every process of a run alike.

``rate_limit.py`` and ``capacity.py`` import it; it is not a benchmark of its own.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time

import httpx

from foxpoll import Clock
from foxpoll.testing import FakeFoxReload


class ScaledClock:
    """Virtual seconds that pass ``speed`` times faster than real ones, counted from
    ``origin`` (a ``time.monotonic()`` instant, the same in every process of a run: Linux's
    monotonic clock is system-wide). A sleep of ``s`` virtual seconds sleeps ``s / speed``.

    Everything of a run (the simulator, the metered API, the clients, a SQLite budget) reads
    this clock, so schedules, ``Retry-After`` and the key's rate are all in virtual seconds.
    """

    EPOCH = 1_800_000_000.0  # what time() reads at the origin: any fixed instant will do

    def __init__(self, origin: float, speed: float) -> None:
        self.origin = origin
        self.speed = speed

    def monotonic(self) -> float:
        return (time.monotonic() - self.origin) * self.speed

    def time(self) -> float:
        return self.EPOCH + self.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(max(0.0, seconds) / self.speed)

    async def asleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds) / self.speed)


class TokenBucketAPI:
    """The simulator behind a per-key token bucket, as a metered API would be.

    The bucket refills ``per_minute`` evenly and holds ``burst_seconds`` of it (at least
    one request); past it, 429 with the ``Retry-After`` until the next token.
    """

    def __init__(self, sim: FakeFoxReload, per_minute: float, *, burst_seconds: float = 1.0,
                 clock: Clock | None = None) -> None:
        self.sim = sim
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate * burst_seconds)
        self.tokens = self.capacity
        self._now = (clock.monotonic if clock is not None else time.monotonic)
        self.updated = self._now()
        self.lock = threading.Lock()
        self.log: list[tuple[float, str, int]] = []  # (when, "buy" or "read", status)

    def handle(self, request: httpx.Request) -> httpx.Response:
        kind = "buy" if request.method == "POST" else "read"
        with self.lock:
            now = self._now()
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
            self.updated = now
            if self.tokens < 1.0:
                wait = math.ceil((1.0 - self.tokens) / self.rate)
                self.log.append((now, kind, 429))
                return httpx.Response(429, json={"detail": "Too many requests"},
                                      headers={"Retry-After": str(wait)})
            self.tokens -= 1.0
        response = self.sim.handle(request)
        with self.lock:
            self.log.append((now, kind, response.status_code))
        return response


def completion_times(sim: FakeFoxReload) -> dict[str, float]:
    """When each paid order reached its terminal status, on the simulator's clock
    (infinite for a stall)."""
    orders = sim._orders  # the benchmark reads the simulator's truth, which no API shows
    return {order_id: order.paid_at + order.script.settles_after
            for order_id, order in list(orders.items()) if order.paid_at is not None}


def p95(values: list[float]) -> float:
    import statistics

    return statistics.quantiles(values, n=20)[-1] if len(values) >= 2 else math.nan
