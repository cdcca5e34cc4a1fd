"""foxpoll's budgets beside the maintained rate-limit libraries, on one machine, one run.

Each limiter answers the same question, "may one request go now?", without waiting, for a
budget large enough that every call is granted (so nothing but the bookkeeping is timed).
The calls of all the limiters alternate, so a machine's drift hits them alike. Printed:
the median microseconds per call, its ratio to foxpoll's, and what each can express: lanes
(priorities inside one shared budget), a pause shared by every process after one 429,
a learned rate, and one object serving sync and async callers.

Needs Redis on localhost. Run: ``nox -s bench`` or
``python benchmarks/ratelimit_libraries.py [--calls 3000]``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis

from foxpoll.ratelimit import Priority, RateLimit, RedisRateLimit

REDIS_URL = "redis://127.0.0.1:6379/0"
CALLS = 3000
PER_MINUTE = 60_000_000  # every call granted: only the bookkeeping is timed


def limits_hit(strategy: str, uri: str) -> Callable[[], Any]:
    import limits
    from limits import storage, strategies

    store = storage.storage_from_string(uri)
    limiter = getattr(strategies, strategy)(store)
    item = limits.parse(f"{PER_MINUTE}/minute")
    key = uuid.uuid4().hex
    return lambda: limiter.hit(item, key)


def pyrate(bucket: str) -> Callable[[], Any]:
    from pyrate_limiter import Duration, InMemoryBucket, Limiter, Rate, RedisBucket

    rates = [Rate(PER_MINUTE, Duration.MINUTE)]
    if bucket == "redis":
        store = RedisBucket.init(rates, redis.Redis.from_url(REDIS_URL), uuid.uuid4().hex)
    else:
        store = InMemoryBucket(rates)
    limiter = Limiter(store)
    return lambda: limiter.try_acquire("foxpoll", blocking=False)


def aiolimiter_has_capacity() -> Callable[[], Any]:
    from aiolimiter import AsyncLimiter

    limiter = AsyncLimiter(PER_MINUTE, 60)
    loop = asyncio.new_event_loop()

    async def take() -> None:
        await limiter.acquire()

    return lambda: loop.run_until_complete(take())


CANDIDATES: dict[str, tuple[Callable[[], Callable[[], Any]], str]] = {
    # name: (factory, what it can express: lanes, shared pause, learned rate, sync+async)
    "foxpoll RedisRateLimit": (
        lambda: (lambda limit: lambda: limit.acquire(Priority.POLL))(
            RedisRateLimit(REDIS_URL, PER_MINUTE, key_prefix=f"bench:{uuid.uuid4().hex}:")),
        "yes yes yes yes"),
    "limits, Redis moving window": (
        lambda: limits_hit("MovingWindowRateLimiter", "redis://127.0.0.1:6379/0"),
        "no  no  no  split"),
    "limits, Redis sliding counter": (
        lambda: limits_hit("SlidingWindowCounterRateLimiter", "redis://127.0.0.1:6379/0"),
        "no  no  no  split"),
    "pyrate-limiter, RedisBucket": (lambda: pyrate("redis"), "no  no  no  yes"),
    "foxpoll RateLimit (memory)": (
        lambda: (lambda limit: lambda: limit.acquire(Priority.POLL))(RateLimit(PER_MINUTE)),
        "yes yes yes yes"),
    "limits, memory moving window": (
        lambda: limits_hit("MovingWindowRateLimiter", "memory://"), "no  no  no  split"),
    "pyrate-limiter, InMemoryBucket": (lambda: pyrate("memory"), "no  no  no  yes"),
    "aiolimiter (async only)": (aiolimiter_has_capacity, "no  no  no  async"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=CALLS)
    count = parser.parse_args().calls
    calls = {name: factory() for name, (factory, _) in CANDIDATES.items()}
    timings: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(count):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            timings[name].append(time.perf_counter() - start)
    base = {kind: statistics.median(timings[f"foxpoll {kind}"])
            for kind in ("RedisRateLimit", "RateLimit (memory)")}
    print(f"median of {count} non-blocking acquires each, interleaved\n")
    print(f"{'limiter':<32}{'us/call':>9}{'vs foxpoll':>12}   lanes pause learned sync+async")
    for name, samples in timings.items():
        median = statistics.median(samples)
        reference = base["RedisRateLimit"] if "Redis" in name else base["RateLimit (memory)"]
        print(f"{name:<32}{median * 1e6:>9.1f}{median / reference:>11.2f}x   "
              f"{CANDIDATES[name][1]}")


if __name__ == "__main__":
    main()
