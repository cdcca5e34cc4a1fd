"""Completion events: the event, the in-memory publisher, Redis Streams and SQS."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from foxpoll import Order, OrderStatus, StoreUnavailable
from foxpoll.events import EventError, MemoryPublisher, OrderEvent, event_id_for
from foxpoll.models import OrderItem

from .services import REDIS_URL, free_port, require


def order(status: str = "completed", codes: tuple[Any, ...] = ("AAA-111", {"code": "B", "pin": "9"})
          ) -> Order:
    return Order(id=str(uuid.uuid4()), status=OrderStatus(status),
                 items=(OrderItem("p", 2, external_data=codes if status == "completed" else None),))


def test_event_from_a_completed_order_carries_its_codes() -> None:
    o = order()
    event = OrderEvent.from_order(o, now=1_800_000_000)
    assert (event.order_id, event.status, event.codes) == (o.id, "completed", o.codes)
    assert event.event_id == event_id_for(o.id, "completed")
    assert event.event_id == OrderEvent.from_order(o).event_id  # stable: repeats are visible
    assert event.event_id != event_id_for(o.id, "failed")


def test_failed_and_cancelled_events_have_no_codes() -> None:
    for status in ("failed", "cancelled"):
        assert OrderEvent.from_order(order(status)).codes == ()


def test_non_terminal_orders_have_no_event() -> None:
    with pytest.raises(ValueError, match="not terminal"):
        OrderEvent.from_order(order("processing"))


def test_event_repr_hides_codes() -> None:
    text = repr(OrderEvent.from_order(order()))
    assert "AAA-111" not in text
    assert "<2 redacted>" in text


def test_json_round_trip() -> None:
    event = OrderEvent.from_order(order(), now=1_800_000_000.25)
    data = json.loads(event.to_json())
    assert set(data) == {"eventId", "orderId", "status", "codes", "occurredAt"}
    assert data["occurredAt"] == "2027-01-15T08:00:00.250000Z"
    assert OrderEvent.from_json(event.to_json()) == event


@pytest.mark.parametrize("bad", ["{", "[]", '{"eventId": "e"}',
                                 '{"eventId": 1, "orderId": "o", "status": "s", "occurredAt": "x"}',
                                 '{"eventId":"e","orderId":"o","status":"s","occurredAt":'
                                 '"2027-01-01T00:00:00Z","codes":"SECRET-CODE"}'])
def test_bad_messages_are_event_errors_without_their_content(bad: str) -> None:
    with pytest.raises(EventError) as info:
        OrderEvent.from_json(bad)
    assert "SECRET-CODE" not in str(info.value)


def test_memory_publisher_keeps_order_and_drops_repeats_on_request() -> None:
    import foxpoll.events

    assert not hasattr(foxpoll.events, "InMemoryPublisher")  # renamed, not aliased
    publisher = MemoryPublisher()
    a, b = OrderEvent.from_order(order()), OrderEvent.from_order(order("failed"))
    for event in (a, b, a):
        publisher.publish(event)
    assert publisher.events == [a, b, a]
    assert publisher.unique == [a, b]


# -- Redis Streams -------------------------------------------------------------------


@pytest.fixture
def stream() -> Iterator[str]:
    require("Redis", "127.0.0.1", 6379)
    import redis

    name = f"foxpoll-test-events-{uuid.uuid4().hex[:8]}:orders"
    yield name
    client = redis.Redis.from_url(REDIS_URL)
    client.delete(name, f"{name}:dead")
    client.close()


def prefix(stream: str) -> str:
    """The ``key_prefix`` under which publishers and consumers use ``stream``."""
    return stream.removesuffix("orders")


def consumer(stream: str, group: str, name: str, handler: Any, **kwargs: Any) -> Any:
    from foxpoll.events import RedisStreamConsumer

    return RedisStreamConsumer(REDIS_URL, key_prefix=prefix(stream), group=group, consumer=name,
                               handler=handler, block=None, **kwargs)


@pytest.mark.service
def test_one_stream_fans_out_to_every_group(stream: str) -> None:
    from foxpoll.events import RedisStreamPublisher

    telegram: list[OrderEvent] = []
    email: list[OrderEvent] = []
    consumers = [consumer(stream, "telegram", "t1", telegram.append),
                 consumer(stream, "email", "e1", email.append)]
    for c in consumers:
        c.ensure_group()
    publisher = RedisStreamPublisher(REDIS_URL, key_prefix=prefix(stream), maxlen=1000)
    events = [OrderEvent.from_order(order()) for _ in range(3)]
    ids = [publisher.publish(e) for e in events]
    assert len(set(ids)) == 3
    assert [c.consume() for c in consumers] == [3, 3]
    assert telegram == events
    assert email == events
    assert [c.consume() for c in consumers] == [0, 0]  # acknowledged: not delivered again


@pytest.mark.service
def test_consumers_of_one_group_share_its_entries(stream: str) -> None:
    from foxpoll.events import RedisStreamPublisher

    seen: list[tuple[str, str]] = []
    first = consumer(stream, "email", "e1", lambda e: seen.append(("e1", e.event_id)))
    second = consumer(stream, "email", "e2", lambda e: seen.append(("e2", e.event_id)))
    first.ensure_group()
    publisher = RedisStreamPublisher(REDIS_URL, key_prefix=prefix(stream))
    for _ in range(4):
        publisher.publish(OrderEvent.from_order(order()))
    assert first.consume(count=2) + second.consume(count=2) == 4
    assert len({event_id for _, event_id in seen}) == 4
    assert {name for name, _ in seen} == {"e1", "e2"}


@pytest.mark.service
def test_a_failed_handler_leaves_the_entry_for_another_consumer(stream: str) -> None:
    from foxpoll.events import RedisStreamPublisher

    def crashes(event: OrderEvent) -> None:
        raise ConnectionError("telegram API down")

    done: list[OrderEvent] = []
    broken = consumer(stream, "telegram", "t1", crashes, claim_idle=0)
    healthy = consumer(stream, "telegram", "t2", done.append, claim_idle=0)
    broken.ensure_group()
    event = OrderEvent.from_order(order())
    RedisStreamPublisher(REDIS_URL, key_prefix=prefix(stream)).publish(event)
    assert broken.consume() == 0  # not acknowledged...
    assert healthy.consume() == 1  # ...so it is reclaimed and handled
    assert done == [event]
    assert healthy.consume() == 0


@pytest.mark.service
def test_a_blocking_consumer_never_acknowledges_for_an_async_handler(
        stream: str, caplog: pytest.LogCaptureFixture) -> None:
    # The handler's coroutine would never run: the entry stays pending, as for a failure.
    import redis

    from foxpoll.events import RedisStreamPublisher

    async def handle(event: OrderEvent) -> None:
        raise AssertionError("never awaited")

    c = consumer(stream, "email", "e1", handle)
    c.ensure_group()
    publisher = RedisStreamPublisher(REDIS_URL, key_prefix=prefix(stream))
    publisher.publish(OrderEvent.from_order(order()))
    assert c.consume() == 0
    assert "TypeError" in caplog.text
    with redis.Redis.from_url(REDIS_URL) as client:
        assert client.xpending(stream, "email")["pending"] == 1


@pytest.mark.service
def test_poison_entries_go_to_the_dead_letter_stream(stream: str) -> None:
    import redis

    from foxpoll.events import RedisStreamPublisher

    calls: list[str] = []

    def always_fails(event: OrderEvent) -> None:
        calls.append(event.event_id)
        raise ValueError("cannot render this order")

    c = consumer(stream, "email", "e1", always_fails, claim_idle=0, max_deliveries=3)
    c.ensure_group()
    event = OrderEvent.from_order(order())
    RedisStreamPublisher(REDIS_URL, key_prefix=prefix(stream)).publish(event)
    client = redis.Redis.from_url(REDIS_URL)
    client.xadd(stream, {"event": "not json"})  # and one that is not an event at all
    for _ in range(6):
        c.consume()
    assert len(calls) == 3  # handled max_deliveries times, then moved aside
    dead = client.xrange(f"{stream}:dead")
    reasons = sorted(fields[b"foxpoll:reason"].decode() for _, fields in dead)
    assert reasons == ["delivered 4 times", "not an OrderEvent: JSONDecodeError"]
    moved = next(f for _, f in dead if f[b"foxpoll:reason"] == b"delivered 4 times")
    assert OrderEvent.from_json(moved[b"event"]) == event
    assert client.xpending(stream, "email")["pending"] == 0  # nothing left blocking the group
    client.close()


@pytest.mark.slow
@pytest.mark.service
def test_the_group_is_recreated_after_a_redis_restart() -> None:
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed")
    import redis

    from foxpoll.events import RedisStreamConsumer, RedisStreamPublisher

    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"

    def start() -> subprocess.Popen[bytes]:
        process = subprocess.Popen([server, "--port", str(port), "--save", "", "--appendonly",  # noqa: S603
                                    "no", "--bind", "127.0.0.1"], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(url).ping()
                return process
            except redis.ConnectionError:
                assert time.monotonic() < deadline
                time.sleep(0.05)

    process = start()
    try:
        seen: list[OrderEvent] = []
        c = RedisStreamConsumer(url, key_prefix="", group="telegram", consumer="t1",
                                handler=seen.append, block=None)
        c.ensure_group()
        RedisStreamPublisher(url, key_prefix="").publish(OrderEvent.from_order(order()))
        assert c.consume() == 1
        process.send_signal(signal.SIGKILL)
        process.wait()
        process = start()  # a new, empty Redis: no stream, no group
        after = OrderEvent.from_order(order())
        RedisStreamPublisher(url, key_prefix="").publish(after)
        handled = 0
        for _ in range(5):  # the first call may meet the dead connection
            try:
                handled += c.consume()
            except StoreUnavailable:
                continue
            if handled:
                break
        assert handled == 1
        assert seen[-1] == after
    finally:
        process.kill()
        process.wait()


@pytest.mark.service
async def test_async_publisher_and_consumer_with_an_async_handler(stream: str) -> None:
    from foxpoll.events import AsyncRedisStreamConsumer, AsyncRedisStreamPublisher

    seen: list[OrderEvent] = []

    async def handle(event: OrderEvent) -> None:
        seen.append(event)

    c = AsyncRedisStreamConsumer(REDIS_URL, key_prefix=prefix(stream), group="email", consumer="a1",
                                 handler=handle, block=None)
    publisher = AsyncRedisStreamPublisher(REDIS_URL, key_prefix=prefix(stream))
    try:
        await c.ensure_group()
        event = OrderEvent.from_order(order())
        await publisher.publish(event)
        assert await c.consume() == 1
        assert seen == [event]
    finally:
        await c.aclose()
        await publisher.aclose()


# -- SQS ---------------------------------------------------------------------------------


def test_sqs_publisher_standard_and_fifo(moto_url: str) -> None:
    import boto3

    from foxpoll.events import SQSPublisher

    sqs = boto3.client("sqs", endpoint_url=moto_url)
    standard = sqs.create_queue(QueueName=f"events-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    fifo = sqs.create_queue(QueueName=f"events-{uuid.uuid4().hex[:8]}.fifo",
                            Attributes={"FifoQueue": "true"})["QueueUrl"]
    event = OrderEvent.from_order(order())
    SQSPublisher(standard, client=sqs).publish(event)
    received = sqs.receive_message(QueueUrl=standard, MessageAttributeNames=["All"],
                                   MaxNumberOfMessages=10)["Messages"]
    assert OrderEvent.from_json(received[0]["Body"]) == event
    assert received[0]["MessageAttributes"]["eventId"]["StringValue"] == event.event_id
    publisher = SQSPublisher(fifo, client=sqs)
    publisher.publish(event)
    publisher.publish(event)  # the same outcome again: SQS drops it by deduplication id
    messages = sqs.receive_message(QueueUrl=fifo, MaxNumberOfMessages=10,
                                   AttributeNames=["All"])["Messages"]
    assert len(messages) == 1
    assert messages[0]["Attributes"]["MessageGroupId"] == event.order_id


async def test_async_sqs_publisher(moto_url: str) -> None:
    import aioboto3

    from foxpoll.events import AsyncSQSPublisher

    async with aioboto3.Session().client("sqs", endpoint_url=moto_url) as sqs:
        queue = (await sqs.create_queue(QueueName=f"events-{uuid.uuid4().hex[:8]}"))["QueueUrl"]
        event = OrderEvent.from_order(order("cancelled"))
        await AsyncSQSPublisher(queue, client=sqs).publish(event)
        received = await sqs.receive_message(QueueUrl=queue)
        assert OrderEvent.from_json(received["Messages"][0]["Body"]) == event
