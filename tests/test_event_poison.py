"""No stream entry can block its consumer group, and consumers outlive Redis outages.

An entry that holds no event (bad bytes, bad JSON, deep nesting, wrong types, missing
fields, huge values) is moved to the dead-letter stream as raw bytes on its first
delivery; the good entries around it are handled exactly once. ``run()`` waits out a
Redis that goes away, on virtual time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import re
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from foxpoll import StoreUnavailable
from foxpoll.events import EventError, OrderEvent
from foxpoll.events.base import MAX_EVENT_DEPTH, MAX_EVENT_SIZE
from foxpoll.testing import FakeClock

from .services import REDIS_URL, delete_keys, free_port, require

PREFIX = f"foxpoll-test-poison-{uuid.uuid4().hex[:8]}:"
META = (b"foxpoll:reason", b"foxpoll:original_id", b"foxpoll:group")
#: Every reason a dead letter may give: short, and never quoting the entry.
REASON = re.compile(r"no event field|not an OrderEvent: [\w ]+|delivered \d+ times")
SECRET = "SECRET-CODE-42"


def event_json(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"eventId": str(uuid.uuid4()), "orderId": "o-1",
                            "status": "completed", "codes": [SECRET, {"code": SECRET}],
                            "occurredAt": "2027-01-15T08:00:00Z"}
    data.update(changes)
    return data


# -- OrderEvent.from_json: any malformed input is an EventError ---------------------------


def nested(depth: int) -> str:
    """An event whose arrays and objects nest ``depth`` deep (3 or more): the event, its
    codes, a code object, then lists in it."""
    lists = depth - 3
    return json.dumps(event_json(codes=[]), separators=(",", ":")).replace(
        '"codes":[]', '"codes":[{"pin":' + "[" * lists + "]" * lists + "}]")


@pytest.mark.parametrize("bad", [
    nested(MAX_EVENT_DEPTH + 1),
    nested(200_000),  # far past the decoder's own recursion limit
    "[" * 200_000,
    b'{"eventId": "\xff\xfe"}',
    json.dumps(event_json()).encode("utf-8").replace(b"o-1", b"o-\xc3("),
    " " * MAX_EVENT_SIZE + json.dumps(event_json()),
    json.dumps(event_json(codes=SECRET)),
    json.dumps(event_json(codes=[1])),
    json.dumps(event_json(eventId=7)),
    json.dumps(event_json(status="")),
    json.dumps({k: v for k, v in event_json().items() if k != "orderId"}),
    '"just a string"', "null", "1" * 5000, "NaN",
])
def test_from_json_turns_every_malformed_input_into_an_event_error(bad: str | bytes) -> None:
    with pytest.raises(EventError) as info:
        OrderEvent.from_json(bad)
    assert SECRET not in str(info.value)
    assert REASON.fullmatch(str(info.value))


def test_from_json_reads_events_nested_up_to_the_bound() -> None:
    event = OrderEvent.from_json(nested(MAX_EVENT_DEPTH))
    assert event.codes == ({"pin": _lists(MAX_EVENT_DEPTH - 3)},)
    with pytest.raises(EventError, match=f"nested deeper than {MAX_EVENT_DEPTH}"):
        OrderEvent.from_json(nested(MAX_EVENT_DEPTH + 1))


def _lists(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


# -- A consumer over a real stream -----------------------------------------------------


@pytest.fixture
def prefix() -> Iterator[str]:
    require("Redis", "127.0.0.1", 6379)
    key_prefix = f"{PREFIX}{uuid.uuid4().hex[:8]}:"
    yield key_prefix
    delete_keys(key_prefix)


def raw_client(url: str = REDIS_URL, **options: Any) -> Any:
    import redis

    return redis.Redis.from_url(url, **options)


def drain(consume: Callable[[], int], entries: int) -> None:
    """Consume until every entry was read: a round takes at least one while any is left."""
    for _ in range(entries + 1):
        consume()


def assert_settled(client: Any, stream: str, good: list[tuple[bytes, OrderEvent]],
                   bad: list[tuple[bytes, dict[bytes, bytes]]],
                   handled: list[OrderEvent]) -> None:
    """Every good entry handled once, in order; every bad one dead-lettered byte for byte,
    with a reason; nothing pending."""
    assert [(e.event_id, e.order_id, e.status, e.codes) for e in handled] == \
        [(e.event_id, e.order_id, e.status, e.codes) for _, e in good]
    dead = {fields[b"foxpoll:original_id"]: fields for _, fields in
            client.xrange(f"{stream}:dead")}
    assert set(dead) == {entry_id for entry_id, _ in bad}  # no good entry among them
    for entry_id, fields in bad:
        moved = dead[entry_id]
        assert {k: v for k, v in moved.items() if k not in META} == fields
        assert moved[b"foxpoll:group"] == b"g"
        assert REASON.fullmatch(moved[b"foxpoll:reason"].decode())
    assert client.xpending(stream, "g")["pending"] == 0
    last = client.xinfo_groups(stream)[0]["last-delivered-id"]
    assert last == max([i for i, _ in good] + [i for i, _ in bad],
                       key=lambda i: tuple(map(int, i.split(b"-"))))


def test_the_issues_entry_of_bad_bytes_no_longer_blocks_the_group(prefix: str) -> None:
    # Issue 22, finding 3: a non-UTF-8 field name made every consume() raise, forever.
    from foxpoll.events import RedisStreamConsumer, RedisStreamPublisher

    stream = f"{prefix}orders"
    handled: list[OrderEvent] = []
    with raw_client() as client, \
            RedisStreamConsumer(REDIS_URL, key_prefix=prefix, group="g", consumer="c",
                                handler=handled.append, block=None) as consumer, \
            RedisStreamPublisher(REDIS_URL, key_prefix=prefix) as publisher:
        consumer.ensure_group()
        poison = {b"\xff\xfename": b"\xc3(", b"event": b"\xff"}
        poison_id = client.xadd(stream, poison)
        deep = {b"event": nested(100_000).encode()}
        deep_id = client.xadd(stream, deep)
        event = OrderEvent.from_order(_order())
        good_id = publisher.publish(event).encode()
        assert consumer.consume() == 1
        assert consumer.consume() == 0
        assert_settled(client, stream, [(good_id, event)],
                       [(poison_id, poison), (deep_id, deep)], handled)


def _order() -> Any:
    from foxpoll import Order, OrderStatus
    from foxpoll.models import OrderItem

    return Order(id=str(uuid.uuid4()), status=OrderStatus.COMPLETED,
                 items=(OrderItem("p", 1, external_data=(SECRET,)),))


# Good entries: what the publisher writes, sometimes with fields of another producer.
NAMES = st.binary(max_size=12).filter(lambda name: name != b"event")
CODES = st.lists(st.one_of(st.text(max_size=12),
                           st.dictionaries(st.text(max_size=6), st.text(max_size=12),
                                           max_size=2)), max_size=3)
EVENTS = st.builds(
    lambda event_id, order_id, status, codes, at: OrderEvent(
        str(event_id), order_id, status, tuple(codes), at),
    st.uuids(), st.text(min_size=1, max_size=20),
    st.sampled_from(["completed", "failed", "cancelled"]), CODES,
    st.floats(min_value=0, max_value=4e9))
GOOD = st.tuples(EVENTS, st.dictionaries(NAMES, st.binary(max_size=20), max_size=2)).map(
    lambda pair: (pair[0], {**pair[1], b"event": pair[0].to_json().encode()}))

# Bad entries: each kind cannot hold an event, by construction.
REQUIRED = ["eventId", "orderId", "status", "occurredAt"]
WRONG = {
    "eventId": st.one_of(st.integers(), st.none(), st.just(""), st.lists(st.text(), max_size=2)),
    "orderId": st.one_of(st.integers(), st.booleans(), st.just("")),
    "status": st.one_of(st.floats(allow_nan=False), st.just(""), st.just({})),
    "codes": st.one_of(st.integers(min_value=1), st.text(min_size=1),
                       st.lists(st.integers(), min_size=1)),
    "occurredAt": st.sampled_from([None, True, [], "yesterday", 1.5]),
}


def _dumped(data: dict[str, Any]) -> bytes:
    return json.dumps(data).encode()


BAD_EVENTS = st.one_of(
    # not a JSON object at all: arbitrary bytes, often not UTF-8
    st.binary(max_size=60).filter(lambda b: not b.lstrip().startswith(b"{")),
    # an event with bytes that are not UTF-8 spliced in
    st.binary(min_size=1, max_size=4).map(
        lambda junk: _dumped(event_json()).replace(b"o-1", b"o-\xff" + junk)),
    # wrong types
    st.sampled_from(sorted(WRONG)).flatmap(
        lambda key: WRONG[key].map(lambda value: _dumped(event_json(**{key: value})))),
    # a required field missing
    st.sampled_from(REQUIRED).map(
        lambda key: _dumped({k: v for k, v in event_json().items() if k != key})),
    # nested too deep, up to far past the decoder's recursion limit
    st.one_of(st.integers(MAX_EVENT_DEPTH + 1, 80), st.just(100_000)).map(
        lambda depth: nested(depth).encode()),
    # a valid event, but too large
    st.just(b" " * MAX_EVENT_SIZE + _dumped(event_json())),
)
BAD = st.one_of(
    st.dictionaries(NAMES, st.binary(max_size=40), min_size=1, max_size=4),  # no event
    st.tuples(BAD_EVENTS, st.dictionaries(NAMES, st.binary(max_size=20), max_size=2)).map(
        lambda pair: {**pair[1], b"event": pair[0]}),
)
MIX = st.lists(st.one_of(GOOD, BAD.map(lambda fields: (None, fields))), min_size=1,
               max_size=10)


@pytest.mark.service
@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.large_base_example])
@given(entries=MIX)
def test_a_mix_of_good_and_malformed_entries_never_blocks_the_group(
        entries: list[tuple[OrderEvent | None, dict[bytes, bytes]]]) -> None:
    from foxpoll.events import RedisStreamConsumer

    require("Redis", "127.0.0.1", 6379)
    key_prefix = f"{PREFIX}{uuid.uuid4().hex[:8]}:"
    stream = f"{key_prefix}orders"
    handled: list[OrderEvent] = []
    try:
        with raw_client() as client, \
                RedisStreamConsumer(REDIS_URL, key_prefix=key_prefix, group="g",
                                    consumer="c", handler=handled.append,
                                    block=None) as consumer:
            consumer.ensure_group()
            good, bad = [], []
            for event, fields in entries:
                entry_id = client.xadd(stream, fields)
                if event is None:
                    bad.append((entry_id, fields))
                else:
                    good.append((entry_id, event))
            drain(lambda: consumer.consume(count=3), len(entries))
            assert_settled(client, stream, good, bad, handled)
    finally:
        delete_keys(key_prefix)


@pytest.mark.service
async def test_an_async_consumer_dead_letters_malformed_entries_and_handles_the_rest(
        prefix: str) -> None:
    from foxpoll.events import AsyncRedisStreamConsumer

    stream = f"{prefix}orders"
    handled: list[OrderEvent] = []

    async def handle(event: OrderEvent) -> None:
        handled.append(event)

    first, second = OrderEvent.from_order(_order()), OrderEvent.from_order(_order())
    entries: list[tuple[OrderEvent | None, dict[bytes, bytes]]] = [
        (None, {b"\xff": b"\xfe"}),
        (first, {b"event": first.to_json().encode(), b"trace\xff": b"\x00"}),
        (None, {b"event": nested(100_000).encode()}),
        (None, {b"event": _dumped(event_json(codes=SECRET))}),
        (None, {b"event": b" " * MAX_EVENT_SIZE + _dumped(event_json())}),
        (second, {b"event": second.to_json().encode()}),
        (None, {b"event": b"{not json"}),
    ]
    consumer = AsyncRedisStreamConsumer(REDIS_URL, key_prefix=prefix, group="g", consumer="a",
                                        handler=handle, block=None)
    try:
        await consumer.ensure_group()
        with raw_client() as client:
            good, bad = [], []
            for event, fields in entries:
                entry_id = client.xadd(stream, fields)
                (bad.append((entry_id, fields)) if event is None
                 else good.append((entry_id, event)))
            for _ in range(len(entries) + 1):
                await consumer.consume(count=2)
            assert_settled(client, stream, good, bad, handled)
            dead = client.xrange(f"{stream}:dead")
            assert all(SECRET.encode() not in f[b"foxpoll:reason"] for _, f in dead)
    finally:
        await consumer.aclose()


def test_a_client_that_decodes_responses_is_refused() -> None:
    # redis-py would decode an entry of bad bytes while reading it, before the consumer
    # could move it aside: every read of the group would fail.
    from foxpoll.events import AsyncRedisStreamConsumer, RedisStreamConsumer

    with raw_client(decode_responses=True, socket_timeout=5) as client, \
            pytest.raises(ValueError, match="decode_responses"):
        RedisStreamConsumer(client, group="g", consumer="c", handler=print)
    with pytest.raises(ValueError, match="decode_responses"):
        AsyncRedisStreamConsumer(f"{REDIS_URL}?decode_responses=True", group="g",
                                 consumer="c", handler=print)


# -- run(): through outages, until stopped ------------------------------------------------


class Restartable:
    """A redis-server of the test's own on a fixed port, to stop and start again."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
                pytest.fail("redis-server is not installed; CI must run every "
                            "service-backed test", pytrace=False)
            pytest.skip("redis-server is not installed")
        self.binary = binary
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(  # noqa: S603 - a fixed binary and options of our own
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None


class Recorder:
    """A metrics object: what ``run`` counted."""

    def __init__(self) -> None:
        self.errors: list[tuple[str, BaseException]] = []

    def on_worker_error(self, component: str, error: BaseException) -> None:
        self.errors.append((component, error))


class Scripted(FakeClock):
    """A virtual clock that lets the test act at every wait of ``run``."""

    def __init__(self, at_each_wait: Callable[[], None]) -> None:
        super().__init__()
        self.at_each_wait = at_each_wait

    def sleep(self, seconds: float) -> None:
        super().sleep(seconds)
        self.at_each_wait()


def no_retries(url: str) -> Any:
    """A client that reports a dead server at once: redis-py's own retries sleep for real."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return raw_client(url, retry=Retry(NoBackoff(), 0), socket_connect_timeout=2,
                      socket_timeout=2)


@pytest.mark.service
def test_run_waits_out_a_redis_that_goes_away_and_comes_back(
        caplog: pytest.LogCaptureFixture) -> None:
    from foxpoll.events import RedisStreamConsumer, RedisStreamPublisher

    server = Restartable()
    server.start()
    before, after = OrderEvent.from_order(_order()), OrderEvent.from_order(_order())
    handled: list[OrderEvent] = []
    stop = threading.Event()
    metrics = Recorder()
    phase = "up"
    down_since = 0.0

    def handle(event: OrderEvent) -> None:
        handled.append(event)
        if event == after:
            stop.set()

    def at_each_wait() -> None:
        nonlocal phase, down_since
        if phase == "up" and handled == [before]:  # the first idle wait: Redis goes away
            server.stop()
            phase, down_since = "down", clock.monotonic()
        elif phase == "down" and len(metrics.errors) == 5:  # five failed rounds: it is back
            server.start()  # empty: the stream and the group are gone
            with no_retries(server.url) as client:
                RedisStreamPublisher(client, key_prefix="").publish(after)
            phase = "back"

    clock = Scripted(at_each_wait)
    client = no_retries(server.url)
    consumer = RedisStreamConsumer(client, key_prefix="", group="g", consumer="c",
                                   handler=handle, block=None, clock=clock,
                                   rng=random.Random(7), metrics=metrics)
    try:
        consumer.ensure_group()
        RedisStreamPublisher(client, key_prefix="").publish(before)
        with caplog.at_level(logging.INFO, logger="foxpoll.events"):
            consumer.run(stop=stop, idle=1.0)
    finally:
        client.close()
        server.stop()
    assert handled == [before, after]
    assert [(component, type(error)) for component, error in metrics.errors] == \
        [("events", StoreUnavailable)] * 5
    messages = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert [m for m in messages if "retrying" in m[1]] == [
        ("WARNING", "stream consumer c of group g: round failed (StoreUnavailable: Redis is "
                    "unavailable: ConnectionError); retrying until it succeeds")]
    recovered = [m for m in messages if "recovered" in m[1]]
    assert len(recovered) == 1
    assert recovered[0][0] == "INFO"
    assert recovered[0][1].startswith(
        "stream consumer c of group g: recovered after 5 failed round(s) in ")
    # five jittered waits, each below its doubling ceiling (1, 2, 4, 8, 16 s)
    assert 0 < clock.monotonic() - down_since < 1 + 1 + 2 + 4 + 8 + 16


@pytest.mark.parametrize("kind", ["blocking", "async"])
async def test_run_ends_when_stopped_during_an_outage(
        kind: str, caplog: pytest.LogCaptureFixture) -> None:
    from foxpoll.events import AsyncRedisStreamConsumer, RedisStreamConsumer

    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    metrics = Recorder()
    stop: Any = threading.Event() if kind == "blocking" else asyncio.Event()

    def at_each_wait() -> None:
        if len(metrics.errors) == 3:
            stop.set()

    clock = Scripted(at_each_wait)
    options: dict[str, Any] = {"group": "g", "consumer": "c", "handler": print,
                               "block": None, "clock": clock, "metrics": metrics,
                               "rng": random.Random(1)}
    with caplog.at_level(logging.INFO, logger="foxpoll.events"):
        if kind == "blocking":
            with no_retries(url) as client:
                RedisStreamConsumer(client, **options).run(stop=stop)
        else:
            from redis.asyncio import Redis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            client = Redis.from_url(url, retry=Retry(NoBackoff(), 0), socket_timeout=2)
            try:
                await AsyncRedisStreamConsumer(client, **options).run(stop=stop)
            finally:
                await client.aclose()
    assert len(metrics.errors) == 3
    assert sum("retrying" in r.getMessage() for r in caplog.records) == 1
    assert clock.slept <= 1 + 2 + 4 + 0.1  # capped by the doubling ceilings, virtual time


async def test_cancelling_an_async_run_ends_it() -> None:
    from redis.asyncio import Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    from foxpoll.events import AsyncRedisStreamConsumer

    client = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", retry=Retry(NoBackoff(), 0),
                            socket_timeout=2)
    consumer = AsyncRedisStreamConsumer(client, group="g", consumer="c", handler=print,
                                        block=None, clock=FakeClock())
    task = asyncio.create_task(consumer.run())
    try:
        for _ in range(20):
            await asyncio.sleep(0)
        assert not task.done()  # still waiting the outage out
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        await client.aclose()


def test_a_programming_error_ends_run() -> None:
    from foxpoll.events import RedisStreamConsumer

    class WrongHook:
        def on_worker_error(self) -> None:  # takes no component, no error
            raise AssertionError("never called this way")

    with no_retries(f"redis://127.0.0.1:{free_port()}/0") as client:
        consumer = RedisStreamConsumer(client, group="g", consumer="c", handler=print,
                                       block=None, clock=FakeClock(), metrics=WrongHook())
        with pytest.raises(TypeError, match="on_worker_error"):
            consumer.run()


@pytest.mark.service
def test_redis_refusing_a_command_ends_run(prefix: str) -> None:
    import redis

    from foxpoll.events import RedisStreamConsumer

    with raw_client(socket_timeout=5) as client:
        client.set(f"{prefix}orders", "not a stream")
        consumer = RedisStreamConsumer(client, key_prefix=prefix, group="g", consumer="c",
                                       handler=print, block=None, clock=FakeClock())
        with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
            consumer.run()
