"""A Redis that is up but not serving (a replica after a failover, out of memory) is an
outage to every Redis class, like one that cannot be reached: the stream consumers wait it
out, the dedup store raises StoreUnavailable, the budget BudgetUnavailable.

Each test runs redis-servers of its own: a failover and ``maxmemory`` must not touch the
shared one.
"""

from __future__ import annotations

import random
import threading
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import redis
from redis import exceptions as redis_errors

from foxpoll.errors import BudgetUnavailable, StoreUnavailable, is_redis_outage
from foxpoll.events import OrderEvent
from foxpoll.testing import FakeClock

from .services import own_redis_server


@pytest.mark.parametrize(("error", "outage"), [
    (redis_errors.ConnectionError("refused"), True),
    (redis_errors.BusyLoadingError("Redis is loading the dataset in memory"), True),
    (redis_errors.TimeoutError("Timeout reading from socket"), True),
    (redis_errors.ReadOnlyError("You can't write against a read only replica."), True),
    (redis_errors.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."),
     True),
    (redis_errors.TryAgainError("Multiple keys request during rehashing of slot"), True),
    (redis_errors.ClusterDownError("The cluster is down"), True),
    (redis_errors.MasterDownError("Link with MASTER is down"), True),
    (redis_errors.ResponseError("UNBLOCKED force unblock from blocking operation, instance "
                                "state changed (master -> replica?)"), True),
    (redis_errors.ResponseError("BUSY Redis is busy running a script."), True),
    (redis_errors.ResponseError("MISCONF Redis is configured to save RDB snapshots"), True),
    (redis_errors.ResponseError("NOREPLICAS Not enough good replicas to write."), True),
    (redis_errors.ResponseError("BUSYGROUP Consumer Group name already exists"), False),
    (redis_errors.ResponseError("WRONGTYPE Operation against a key holding the wrong kind"),
     False),
    (redis_errors.ResponseError("NOGROUP No such key or consumer group"), False),
    (redis_errors.NoPermissionError("this user has no permissions"), False),
    (redis_errors.DataError("Invalid input of type: 'dict'"), False),
    (ValueError("not Redis's"), False),
])
def test_which_redis_errors_are_outages(error: BaseException, outage: bool) -> None:
    assert is_redis_outage(error) is outage


def _order_event() -> OrderEvent:
    from foxpoll import Order, OrderStatus
    from foxpoll.models import OrderItem

    return OrderEvent.from_order(Order(id=str(uuid.uuid4()), status=OrderStatus.COMPLETED,
                                       items=(OrderItem("p", 1, external_data=("c",)),)))


class Recorder:
    """A metrics object: the errors ``run`` counted."""

    def __init__(self) -> None:
        self.errors: list[BaseException] = []

    def on_worker_error(self, component: str, error: BaseException) -> None:
        assert component == "events"
        self.errors.append(error)


class Scripted(FakeClock):
    """A virtual clock that lets the test act at every wait of ``run``."""

    def __init__(self, at_each_wait: Callable[[], None]) -> None:
        super().__init__()
        self.at_each_wait = at_each_wait

    def sleep(self, seconds: float) -> None:
        super().sleep(seconds)
        self.at_each_wait()


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


def _causes(errors: list[BaseException]) -> set[type[BaseException]]:
    assert all(isinstance(error, StoreUnavailable) for error in errors)
    return {type(error.__cause__) for error in errors if error.__cause__ is not None}


@pytest.mark.service
def test_a_stream_consumer_waits_out_a_failover_that_demotes_its_server() -> None:
    from foxpoll.events import RedisStreamConsumer, RedisStreamPublisher

    with own_redis_server() as url, own_redis_server() as other, \
            redis.Redis.from_url(url) as admin:
        before, after = _order_event(), _order_event()
        handled: list[OrderEvent] = []
        stop = threading.Event()
        metrics = Recorder()
        promoted = False

        def demote() -> None:  # as a Sentinel failover does: the server becomes a replica
            admin.replicaof("127.0.0.1", _port(other))

        def handle(event: OrderEvent) -> None:
            handled.append(event)
            if event == before:  # while the consumer's next read blocks, say
                threading.Timer(0.2, demote).start()
            if event == after:
                stop.set()

        def at_each_wait() -> None:
            nonlocal promoted
            if not promoted and len(metrics.errors) >= 3:  # it is a master again
                promoted = True
                admin.replicaof("no", "one")
                RedisStreamPublisher(url, key_prefix="").publish(after)

        consumer = RedisStreamConsumer(url, key_prefix="", group="g", consumer="c",
                                       handler=handle, block=0.5,
                                       clock=Scripted(at_each_wait), rng=random.Random(3),
                                       metrics=metrics)
        with consumer, RedisStreamPublisher(url, key_prefix="") as publisher:
            consumer.ensure_group()
            publisher.publish(before)
            runner = threading.Thread(target=consumer.run, kwargs={"stop": stop})
            runner.start()
            runner.join(30)
            stop.set()
            runner.join(5)
            assert not runner.is_alive()
    assert handled == [before, after]
    # READONLY replies (UNBLOCKED too, for a read that was blocked), or a connection the
    # server dropped on its change of role: every one an outage, waited out.
    assert redis_errors.ReadOnlyError in _causes(metrics.errors)


@pytest.mark.service
def test_a_stream_consumer_waits_out_redis_out_of_memory_to_dead_letter_an_entry() -> None:
    from foxpoll.events import RedisStreamConsumer, RedisStreamPublisher

    with own_redis_server() as url, redis.Redis.from_url(url) as admin:
        good = _order_event()
        handled: list[OrderEvent] = []
        stop = threading.Event()
        metrics = Recorder()

        def at_each_wait() -> None:
            if len(metrics.errors) == 3:  # an operator raises maxmemory
                admin.config_set("maxmemory", 0)
            if handled and admin.xlen("orders:dead") == 1:
                stop.set()

        consumer = RedisStreamConsumer(url, key_prefix="", group="g", consumer="c",
                                       handler=handled.append, block=None, claim_idle=0,
                                       clock=Scripted(at_each_wait), rng=random.Random(3),
                                       metrics=metrics)
        with consumer, RedisStreamPublisher(url, key_prefix="") as publisher:
            consumer.ensure_group()
            admin.xadd("orders", {b"x": b"no event"})
            publisher.publish(good)
            admin.config_set("maxmemory", 1)  # XADD to the dead-letter stream is refused
            consumer.run(stop=stop)
        assert handled == [good]
        assert admin.xrange("orders:dead")[0][1][b"x"] == b"no event"
        assert admin.xpending("orders", "g")["pending"] == 0
    assert _causes(metrics.errors) == {redis_errors.OutOfMemoryError}
    assert len(metrics.errors) == 3


@pytest.mark.service
@pytest.mark.parametrize("kind", ["blocking", "async"])
async def test_the_dedup_store_and_the_budget_call_out_of_memory_an_outage(kind: str) -> None:
    from foxpoll.dedup import AsyncRedisDedupStore, RedisDedupStore
    from foxpoll.ratelimit import RedisRateLimit

    def refused(error: BaseException) -> Any:
        assert isinstance(error.__cause__, redis_errors.OutOfMemoryError)

    with own_redis_server() as url, redis.Redis.from_url(url) as admin:
        admin.config_set("maxmemory", 1)
        budget = RedisRateLimit(url, per_minute=600)
        try:
            if kind == "blocking":
                with RedisDedupStore(url) as store, \
                        pytest.raises(StoreUnavailable, match="OutOfMemoryError") as caught:
                    store.claim("o-1", "t-1", 30)
                refused(caught.value)
                with pytest.raises(BudgetUnavailable, match="OutOfMemoryError") as caught:
                    budget.acquire()
                refused(caught.value)
            else:
                async with AsyncRedisDedupStore(url) as astore:
                    with pytest.raises(StoreUnavailable, match="OutOfMemoryError") as caught:
                        await astore.claim("o-1", "t-1", 30)
                refused(caught.value)
                with pytest.raises(BudgetUnavailable, match="OutOfMemoryError") as caught:
                    await budget.aacquire()
                refused(caught.value)
        finally:
            await budget.aclose()
            budget.close()
        admin.config_set("maxmemory", 0)
        with RedisDedupStore(url) as store:
            assert store.claim("o-1", "t-1", 30).acquired
