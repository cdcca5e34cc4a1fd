"""Every numeric parameter refuses nan, infinities, negatives and other nonsense at once,
with a ValueError that names it: a bad number never reaches a sleep, a socket or a rate."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from foxpoll import AsyncFoxReload, FoxReload, WaitPolicy
from foxpoll.backoff import ExponentialJitter, Fixed
from foxpoll.dedup import (
    MemoryDedupStore,
    PostgresDedupStore,
    RedisDedupStore,
    SQLiteDedupStore,
)
from foxpoll.ratelimit import (
    MAX_PER_MINUTE,
    MIN_PER_MINUTE,
    RateLimit,
    RedisRateLimit,
    SQLiteRateLimit,
)
from foxpoll.recovery import RecoveryPolicy, RecoveryWorker, SQLiteRecoveryQueue

BAD_ANYWHERE = [math.nan, math.inf, -math.inf, -1, -0.5, True, False]

#: Each constructor, by the parameter under test: how to build it with that value, and
#: what else it refuses (zero, for what must be above zero; fractions, for counts).
Build = Callable[[Any, Path], object]
PARAMETERS: dict[str, tuple[Build, list[Any]]] = {
    "per_minute": (lambda v, _: RateLimit(v), [0, MIN_PER_MINUTE / 2, MAX_PER_MINUTE * 2]),
    "burst": (lambda v, _: RateLimit(100, burst=v), [0, 1.5, 10**9]),
    "busy_timeout": (lambda v, d: SQLiteRateLimit(d / "b.db", busy_timeout=v), [0]),
    "statement_timeout": (lambda v, _: RedisRateLimit("redis://127.0.0.1:1",
                                                      statement_timeout=v), [0]),
    "connect_timeout": (lambda v, _: RedisRateLimit("redis://127.0.0.1:1",
                                                    connect_timeout=v), [0]),
    "timeout": (lambda v, _: WaitPolicy(timeout=v), [0]),
    "stall_after": (lambda v, _: WaitPolicy(stall_after=v), [0]),
    "not_found_grace": (lambda v, _: WaitPolicy(not_found_grace=v), []),
    "max_attempts": (lambda v, _: WaitPolicy(max_attempts=v), [0, 2.5]),
    "max_errors": (lambda v, _: WaitPolicy(max_errors=v), [2.5]),
    "polls_for_codes": (lambda v, _: WaitPolicy(polls_for_codes=v), [2.5]),
    "max_attempts ": (lambda v, _: RecoveryPolicy(max_attempts=v), [0, 2.5]),
    "watch_margin": (lambda v, _: RecoveryPolicy(watch_margin=v), []),
    "delivery_grace": (lambda v, _: RecoveryPolicy(delivery_grace=v), []),
    "timeout ": (lambda v, _: FoxReload(api_key="k", timeout=v), [0]),
    "max_retry_after": (lambda v, _: FoxReload(api_key="k", max_retry_after=v), [0]),
    "max_retries": (lambda v, _: FoxReload(api_key="k", max_retries=v), [2.5]),
    "max_in_flight": (lambda v, _: FoxReload(api_key="k", max_in_flight=v), [0, 2.5]),
    "max_response_bytes": (lambda v, _: FoxReload(api_key="k", max_response_bytes=v),
                           [0, 2.5]),
    "busy_timeout ": (lambda v, d: SQLiteDedupStore(d / "d.db", busy_timeout=v), [0]),
    "statement_timeout ": (lambda v, _: RedisDedupStore("redis://127.0.0.1:1",
                                                        statement_timeout=v), [0]),
    "connect_timeout ": (lambda v, _: PostgresDedupStore("host=127.0.0.1 port=1",
                                                         connect_timeout=v), [0]),
    "retention": (lambda v, _: RedisDedupStore("redis://127.0.0.1:1", retention=v), [2.5]),
    "max_in_flight  ": (lambda v, _: AsyncFoxReload(api_key="k", max_in_flight=v), [0, 2.5]),
    "max_in_flight   ": (lambda v, _: first_result(v), [0, 2.5]),
    "max_in_flight    ": (lambda v, _: sync_wait_many(v), [0, 2, 2.5, 1.0]),
    "lease": (lambda v, d: worker(d, lease=v), [0, 1e7]),
    "keep_done": (lambda v, d: worker(d, keep_done=v), []),
    "idle": (lambda v, d: worker(d).run(idle=v), []),
    "sweep_every": (lambda v, d: worker(d).run(sweep_every=v), []),
    "limit": (lambda v, d: worker(d).run_pending(limit=v), [2.5]),
}


def first_result(max_in_flight: Any) -> object:
    """The first result of ``AsyncFoxReload.wait_many(max_in_flight=...)``: the flow
    checks its argument before any request. Run in a thread that is given up on after
    10 s, since an argument that gets past the check (``nan`` passes ``< 1``) spins the
    event loop, where no timeout of asyncio's can stop it."""
    async def first() -> object:
        async with AsyncFoxReload(api_key="k", max_retries=0) as client:
            async for result in client.wait_many(["o1"], max_in_flight=max_in_flight):
                return result
        return None

    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(asyncio.run(first()))
        except Exception as exc:  # raised again below, on the test's thread
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(10)
    assert outcome, f"wait_many(max_in_flight={max_in_flight!r}) is still running"
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    return outcome[0]


def sync_wait_many(max_in_flight: Any) -> object:
    with FoxReload(api_key="k") as client:
        return client.wait_many(["o1"], max_in_flight=max_in_flight)


def worker(directory: Path, **options: Any) -> RecoveryWorker:
    """A RecoveryWorker on a fresh SQLite queue, closed again: the constructor or the
    method called on it is what is tested."""
    with SQLiteRecoveryQueue(directory / "q.db") as queue, \
            FoxReload(api_key="k", base_url="http://127.0.0.1:1") as client:
        return RecoveryWorker(client, queue, MemoryDedupStore(), on_completed=print,
                              **options)


@pytest.mark.parametrize("value", [math.nan, math.inf, 0, 1.5, True])
def test_async_wait_many_refuses_a_max_in_flight_that_is_no_count(value: Any) -> None:
    with pytest.raises(ValueError, match="max_in_flight must be a whole number"):
        first_result(value)


def test_a_recovery_worker_refuses_an_outage_backoff_that_is_no_policy(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="outage_backoff must be a backoff policy"):
        worker(tmp_path, outage_backoff=5)

#: Durations checked by foxpoll.backoff's rule for seconds, which takes a bool as a number.
SECONDS_OR_MORE = ("not_found_grace", "watch_margin", "delivery_grace")
#: Counts zero of which is a fine value, refused elsewhere as a bool.
ZERO_OR_MORE = ("max_errors", "polls_for_codes", "max_retries", "retention")

cases = st.sampled_from(sorted(PARAMETERS)).flatmap(
    lambda name: st.tuples(st.just(name), st.sampled_from(BAD_ANYWHERE + PARAMETERS[name][1])
                           | st.floats(max_value=-1e-9) | st.integers(max_value=-1)))


@settings(max_examples=200, deadline=None)
@given(case=cases)
def test_every_numeric_parameter_refuses_nonsense_naming_itself(
    case: tuple[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> None:
    name, value = case
    build, _ = PARAMETERS[name]
    if value is False and name.strip() in ZERO_OR_MORE:
        return  # False == 0, a fine value of these, and refused elsewhere as a bool
    if isinstance(value, bool) and name.strip() in SECONDS_OR_MORE:
        return  # seconds, zero or more (foxpoll.backoff's rule): True counts as 1
    with pytest.raises(ValueError, match=name.strip()):
        build(value, tmp_path_factory.mktemp("v"))


@pytest.mark.parametrize("value", [MIN_PER_MINUTE, 1, 100, 1000, MAX_PER_MINUTE])
def test_every_sensible_rate_is_taken(value: float) -> None:
    assert RateLimit(value, burst=3).settings.per_minute == value


def test_a_huge_max_attempts_costs_nothing_before_the_first_poll() -> None:
    for policy in (WaitPolicy(max_attempts=10**7, timeout=5),
                   WaitPolicy(backoff=Fixed(0), max_attempts=10**7, timeout=5),
                   WaitPolicy(max_attempts=10**7)):
        started = time.process_time()
        horizon = policy.horizon()
        assert time.process_time() - started < 0.5
        assert 0 <= horizon <= (policy.timeout or math.inf)
    # Below the cut, the sum is exact: the vendor's 40 polls, at their latest.
    exact = WaitPolicy(max_attempts=40).horizon()
    assert exact == pytest.approx(sum(list(_upper(ExponentialJitter()))[:39]))


def _upper(policy: ExponentialJitter) -> list[float]:
    from itertools import islice

    from foxpoll.backoff import UpperRandom

    return list(islice(policy.delays(UpperRandom()), 39))
