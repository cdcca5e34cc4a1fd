"""``on_worker_error``, the hook that counts a loop's failed rounds: an async one is
awaited by the async loops (the async stream consumer, the procrastinate worker and its
dispatcher), refused by the blocking ones; a metrics object without it counts nothing."""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from foxpoll import FoxReload, SystemClock
from foxpoll.backoff import Fixed
from foxpoll.dedup import MemoryDedupStore
from foxpoll.errors import StoreUnavailable
from foxpoll.recovery import RecoveryWorker, SQLiteRecoveryQueue
from foxpoll.testing import FakeClock, FakeFoxReload, OrderScript, SimulatorServer

from .services import free_port, own_database


class AsyncMetrics:
    def __init__(self) -> None:
        self.counted: list[tuple[str, BaseException]] = []

    async def on_worker_error(self, component: str, error: BaseException) -> None:
        await asyncio.sleep(0)  # a real await: an async metrics client's call
        self.counted.append((component, error))


class Scripted(FakeClock):
    """A virtual clock that lets the test act at every wait."""

    def __init__(self, at_each_wait: Callable[[], None]) -> None:
        super().__init__()
        self.at_each_wait = at_each_wait

    def sleep(self, seconds: float) -> None:
        super().sleep(seconds)
        self.at_each_wait()

    async def asleep(self, seconds: float) -> None:
        await super().asleep(seconds)
        self.at_each_wait()


def unreachable_redis(*, asynchronous: bool) -> Any:
    """A client of a port nothing listens on, without redis-py's own (real-time) retries."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    if asynchronous:
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        return Redis.from_url(url, retry=Retry(NoBackoff(), 0), socket_timeout=2)
    from redis import Redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return Redis.from_url(url, retry=Retry(NoBackoff(), 0), socket_timeout=2)


async def test_the_async_stream_consumer_awaits_an_async_hook() -> None:
    from foxpoll.events import AsyncRedisStreamConsumer

    metrics = AsyncMetrics()
    stop = asyncio.Event()
    clock = Scripted(lambda: stop.set() if len(metrics.counted) == 3 else None)
    client = unreachable_redis(asynchronous=True)
    try:
        consumer = AsyncRedisStreamConsumer(client, group="g", consumer="c", handler=print,
                                            block=None, clock=clock, metrics=metrics,
                                            rng=random.Random(1))
        await asyncio.wait_for(consumer.run(stop=stop), 30)
    finally:
        await client.aclose()
    assert [component for component, _ in metrics.counted] == ["events"] * 3
    assert all(isinstance(error, StoreUnavailable) for _, error in metrics.counted)


def test_the_blocking_stream_consumer_refuses_an_async_hook() -> None:
    from foxpoll.events import RedisStreamConsumer

    with unreachable_redis(asynchronous=False) as client:
        consumer = RedisStreamConsumer(client, group="g", consumer="c", handler=print,
                                       block=None, clock=FakeClock(), metrics=AsyncMetrics())
        # never awaited, and never reported so: the coroutine is closed (warnings are errors)
        with pytest.raises(TypeError, match=r"on_worker_error.* is async; use "
                                            "AsyncRedisStreamConsumer"):
            consumer.run()


def test_a_stream_consumer_with_metrics_without_the_hook_counts_nothing_and_serves() -> None:
    from foxpoll.events import RedisStreamConsumer

    stop = threading.Event()
    clock = Scripted(lambda: stop.set() if clock.monotonic() > 300 else None)
    with unreachable_redis(asynchronous=False) as client:
        consumer = RedisStreamConsumer(client, group="g", consumer="c", handler=print,
                                       block=None, clock=clock, metrics=object())
        consumer.run(stop=stop)  # returns at the stop
    assert clock.monotonic() > 300


@pytest.fixture
def served(sim: FakeFoxReload) -> Iterator[FoxReload]:
    sim.default_script = OrderScript.complete(after=0)
    with sim.client() as client:
        yield client


def test_the_blocking_recovery_worker_refuses_an_async_hook(
    tmp_path: Path, clock: FakeClock, served: FoxReload,
) -> None:
    stop = threading.Event()
    real_sleep = clock.sleep

    def sleep(seconds: float) -> None:  # a bound, should the outage be waited out
        real_sleep(seconds)
        if clock.monotonic() > 300:
            stop.set()

    clock.sleep = sleep  # type: ignore[method-assign]
    with SQLiteRecoveryQueue(tmp_path / "q.db", clock=clock) as queue:
        worker = RecoveryWorker(served, queue, MemoryDedupStore(clock=clock),
                                on_completed=print, metrics=AsyncMetrics())  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"on_worker_error.* is async; use a blocking "
                                            "on_worker_error"):
            worker.run(stop=stop, pending_orders=lambda: 1 / 0)  # type: ignore[arg-type,return-value]


@pytest.fixture
def database() -> Iterator[str]:
    with own_database("f22_hooks") as url:
        yield url


@pytest.mark.service
async def test_the_procrastinate_worker_and_its_dispatcher_await_an_async_hook(
    database: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from procrastinate.exceptions import ConnectorException

    from foxpoll.recovery import ProcrastinateRecoveryQueue

    metrics = AsyncMetrics()
    runs = 0

    async def run_worker_async(**options: Any) -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise ConnectorException("a query lost its connection")
        await asyncio.Event().wait()  # procrastinate's worker runs until cancelled

    real = FakeFoxReload(clock=SystemClock(), default_script=OrderScript.complete(after=0))
    with SimulatorServer(real) as server, FoxReload(real.api_key, base_url=server.url) as client, \
            ProcrastinateRecoveryQueue(database, dispatch_every=0.05) as queue:
        queue.create_schema()
        monkeypatch.setattr(queue.app, "run_worker_async", run_worker_async)
        worker = RecoveryWorker(client, queue, MemoryDedupStore(), on_completed=print,
                                metrics=metrics, outage_backoff=Fixed(0.05))  # type: ignore[arg-type]
        rounds = 0
        real_maintain = queue.maintain

        async def maintain(*args: Any, **kwargs: Any) -> None:
            nonlocal rounds
            rounds += 1
            if rounds == 3:  # the dispatcher's second round of the second run
                raise StoreUnavailable("PostgreSQL is unavailable: OperationalError")
            await real_maintain(*args, **kwargs)

        monkeypatch.setattr(queue, "maintain", maintain)
        task = asyncio.ensure_future(queue.run_worker_async(worker,
                                                            install_signal_handlers=False))
        try:
            for _ in range(300):
                if len(metrics.counted) == 2:
                    break
                await asyncio.sleep(0.02)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    assert sorted(component for component, _ in metrics.counted) == [
        "dispatcher", "recovery"]
