"""Completion events on Redis Streams: a publisher and a consumer-group consumer.

The publisher ``XADD``s each event (``MAXLEN ~`` bounds the stream). Each downstream
service reads through its own consumer group, so one stream fans out to every group
("telegram", "email"...), and the consumers of one group share its entries. The consumer:

- acknowledges an entry only after its handler returned, so a crash leaves it pending;
- reclaims entries left pending longer than ``claim_idle`` seconds (their consumer died)
  with ``XAUTOCLAIM``;
- moves an entry delivered more than ``max_deliveries`` times, or one that is not an
  event at all, to a dead-letter stream (``{key_prefix}orders:dead``) and acknowledges it, so one
  poison entry cannot block the group;
- re-creates its group (reading from the start of the stream) when Redis has lost it,
  after a restart.

Handlers see each event at least once: use ``event.event_id`` to drop repeats. A Redis
that cannot be reached, or does not answer within the client's timeouts, raises
:class:`~foxpoll.errors.StoreUnavailable`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any, TypeVar

try:
    import redis
    import redis.asyncio as aredis
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import ResponseError
    from redis.exceptions import TimeoutError as RedisTimeoutError
except ImportError as exc:  # pragma: no cover - only without the extra
    raise ImportError("Redis streams need redis: pip install 'foxpoll[redis]'") from exc

import attrs

from foxpoll._io import Flow, Op, arun, call, run
from foxpoll.errors import unavailable_on

from .base import EventError, OrderEvent

__all__ = [
    "AsyncRedisStreamConsumer",
    "AsyncRedisStreamPublisher",
    "RedisStreamConsumer",
    "RedisStreamPublisher",
]

log = logging.getLogger("foxpoll.events")

DEFAULT_PREFIX = "foxpoll:"

T = TypeVar("T")


@attrs.frozen
class Command(Op[T]):
    """Call the redis client's ``method(*args, **kwargs)``; resume with its reply."""

    method: str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = attrs.field(factory=dict)


def _reaching_redis() -> AbstractContextManager[None]:
    """Redis's connection and timeout errors, raised inside, as
    :class:`~foxpoll.errors.StoreUnavailable` (a handler's own errors never get here: the
    consumer's flow catches them)."""
    return unavailable_on("Redis", RedisConnectionError, RedisTimeoutError)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _xadd(stream: str, maxlen: int, fields: dict[str, str]) -> Command[Any]:
    bound = {"maxlen": maxlen, "approximate": True} if maxlen > 0 else {}
    return Command("xadd", (stream, fields), bound)


@attrs.frozen
class ConsumerFlows:
    """A consumer's steps as flows of :class:`Command` ops and calls of its handler."""

    handler: Callable[[OrderEvent], Any]
    stream: str
    group: str
    consumer: str
    claim_idle_ms: int
    max_deliveries: int
    block_ms: int | None
    dead_stream: str
    maxlen: int

    def step(self, count: int) -> Flow[int]:
        """Reclaim and read up to ``count`` entries each, handle them; return how many."""
        try:
            reclaimed = yield from Command[list[Any]](
                "xautoclaim", (self.stream, self.group, self.consumer, self.claim_idle_ms,
                               "0-0", count))
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            yield from self.ensure_group()
            reclaimed = [b"0-0", [], []]
        try:
            fresh = yield from Command[Any](
                "xreadgroup", (self.group, self.consumer, {self.stream: ">"}),
                {"count": count, "block": self.block_ms})
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            yield from self.ensure_group()
            fresh = []
        handled = 0
        for entry_id, fields in reclaimed[1] or []:
            if fields is None:  # trimmed away while pending
                continue
            deliveries = yield from self._deliveries(entry_id)
            if deliveries > self.max_deliveries:
                yield from self._dead_letter(entry_id, fields, f"delivered {deliveries} times")
                continue
            handled += yield from self._handle(entry_id, fields)
        for _, entries in fresh or []:
            for entry_id, fields in entries:
                handled += yield from self._handle(entry_id, fields)
        return handled

    def ensure_group(self) -> Flow[None]:
        """Create the group (from the start of the stream, so nothing is skipped)."""
        try:
            yield from Command[Any]("xgroup_create", (self.stream, self.group),
                                    {"id": "0", "mkstream": True})
            log.info("created consumer group %s on %s", self.group, self.stream)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _deliveries(self, entry_id: Any) -> Flow[int]:
        pending = yield from Command[list[Any]](
            "xpending_range", (self.stream, self.group, entry_id, entry_id, 1))
        return int(pending[0]["times_delivered"]) if pending else 0

    def _handle(self, entry_id: Any, fields: Mapping[Any, Any]) -> Flow[int]:
        data = {_text(k): v for k, v in fields.items()}
        try:
            event = OrderEvent.from_json(data["event"])
        except (KeyError, EventError):
            yield from self._dead_letter(entry_id, fields, "not an OrderEvent")
            return 0
        try:
            yield from call(self.handler, event)
        except Exception as exc:  # the handler failed: leave it pending, to be reclaimed
            log.warning("event %s for order %s: handler failed (%s); will retry",
                        event.event_id, event.order_id, type(exc).__name__)
            return 0
        yield from Command[int]("xack", (self.stream, self.group, entry_id))
        return 1

    def _dead_letter(self, entry_id: Any, fields: Mapping[Any, Any], reason: str) -> Flow[None]:
        log.error("entry %s of %s moved to %s: %s", _text(entry_id), self.stream,
                  self.dead_stream, reason)
        moved = {_text(k): _text(v) for k, v in fields.items()}
        moved.update({"original_id": _text(entry_id), "group": self.group, "reason": reason})
        yield from _xadd(self.dead_stream, self.maxlen, moved)
        yield from Command[int]("xack", (self.stream, self.group, entry_id))


class _RedisClientOwner:
    """Where a publisher's or consumer's client comes from, and who closes it.

    Args:
        where: A ``redis://`` URL, for which it makes its own client (closed by ``close()``,
            ``aclose()`` or ``with``); or your client, never closed by it.
        key_prefix: The stream's key is ``{key_prefix}orders``; its dead letters go to
            ``{key_prefix}orders:dead``.
        connect_timeout: Seconds to connect, for a client made from a URL.
        statement_timeout: Seconds a command may wait for Redis's reply (beyond a
            consumer's ``block``), for a client made from a URL; a client of yours is
            bounded by its own ``socket_timeout``.
    """

    _client_class: Any

    def __init__(self, where: Any, key_prefix: str, connect_timeout: float,
                 statement_timeout: float) -> None:
        self.stream = f"{key_prefix}orders"
        self._owns = isinstance(where, str)
        self._client = (self._client_class.from_url(
            where, socket_connect_timeout=connect_timeout, socket_timeout=statement_timeout)
            if self._owns else where)


class _SyncOwner(_RedisClientOwner):
    _client_class = redis.Redis

    def close(self) -> None:
        """Close the client, if it was made from a URL (a client you passed in stays open)."""
        if self._owns:
            self._client.close()

    def __enter__(self: _S) -> _S:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _AsyncOwner(_RedisClientOwner):
    _client_class = aredis.Redis

    async def aclose(self) -> None:
        """Close the client, if it was made from a URL (a client you passed in stays open)."""
        if self._owns:
            await self._client.aclose()

    async def __aenter__(self: _A) -> _A:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


_S = TypeVar("_S", bound=_SyncOwner)
_A = TypeVar("_A", bound=_AsyncOwner)


class RedisStreamPublisher(_SyncOwner):
    """Publish events to a Redis stream.

    Args:
        where: A ``redis://`` URL, or your ``redis.Redis`` client (never closed by the
            publisher).
        key_prefix: The stream's key is ``{key_prefix}orders``.
        maxlen: Keep about this many entries (``MAXLEN ~``); 0 keeps everything.
        connect_timeout: Seconds to connect, for a client made from a URL.
        statement_timeout: Seconds a command may wait for Redis's reply, for a client made
            from a URL.
    """

    def __init__(self, where: Any, *, key_prefix: str = DEFAULT_PREFIX,
                 maxlen: int = 100_000, connect_timeout: float = 5.0,
                 statement_timeout: float = 5.0) -> None:
        super().__init__(where, key_prefix, connect_timeout, statement_timeout)
        self.maxlen = maxlen

    def publish(self, event: OrderEvent) -> str:
        command = _xadd(self.stream, self.maxlen, {"event": event.to_json()})
        with _reaching_redis():
            return _text(self._client.xadd(*command.args, **command.kwargs))


class AsyncRedisStreamPublisher(_AsyncOwner):
    """:class:`RedisStreamPublisher` on ``redis.asyncio``."""

    def __init__(self, where: Any, *, key_prefix: str = DEFAULT_PREFIX,
                 maxlen: int = 100_000, connect_timeout: float = 5.0,
                 statement_timeout: float = 5.0) -> None:
        super().__init__(where, key_prefix, connect_timeout, statement_timeout)
        self.maxlen = maxlen

    async def publish(self, event: OrderEvent) -> str:
        command = _xadd(self.stream, self.maxlen, {"event": event.to_json()})
        with _reaching_redis():
            return _text(await self._client.xadd(*command.args, **command.kwargs))


class _ConsumerBase(_RedisClientOwner):
    """Configuration shared by both consumers; each names its Redis client class."""

    def __init__(self, where: Any, *, group: str, consumer: str,
                 handler: Callable[[OrderEvent], Any], key_prefix: str = DEFAULT_PREFIX,
                 claim_idle: float = 60.0, max_deliveries: int = 5,
                 block: float | None = 1.0, maxlen: int = 100_000,
                 connect_timeout: float = 5.0, statement_timeout: float = 5.0) -> None:
        if max_deliveries < 1:
            raise ValueError("max_deliveries must be at least 1")
        # A read may wait ``block`` for new entries before Redis answers.
        super().__init__(where, key_prefix, connect_timeout, statement_timeout + (block or 0))
        self.flows = ConsumerFlows(
            handler, self.stream, group, consumer, int(claim_idle * 1000), max_deliveries,
            None if block is None else int(block * 1000), f"{self.stream}:dead", maxlen,
        )

    @property
    def handler(self) -> Callable[[OrderEvent], Any]:
        """The function each event is handed to."""
        return self.flows.handler

    def _send(self, op: Op[Any]) -> Any:
        """Send a :class:`Command` through the client: its reply, or on ``redis.asyncio``
        an awaitable of it."""
        if not isinstance(op, Command):
            raise TypeError(f"a stream consumer cannot perform {type(op).__name__}")
        return getattr(self._client, op.method)(*op.args, **op.kwargs)


class RedisStreamConsumer(_ConsumerBase, _SyncOwner):
    """Consume events through a consumer group, blocking.

    Args:
        where: A ``redis://`` URL, or your ``redis.Redis`` client (never closed by the
            consumer).
        group: The consumer group: one per downstream service.
        consumer: This consumer's name, unique within the group (host and pid, say).
        handler: Called with each :class:`OrderEvent`; return to acknowledge it, raise to
            have it delivered again later.
        key_prefix: The stream's key is ``{key_prefix}orders``, its dead letters'
            ``{key_prefix}orders:dead``.
        claim_idle: Seconds an entry may stay pending before another consumer reclaims it.
        max_deliveries: Deliveries before an entry goes to the dead-letter stream.
        block: Seconds to wait for new entries in each :meth:`consume` (None: don't wait).
        maxlen: ``MAXLEN ~`` of the dead-letter stream.
        connect_timeout: Seconds to connect, for a client made from a URL.
        statement_timeout: Seconds a command may wait for Redis's reply beyond ``block``,
            for a client made from a URL.
    """

    def ensure_group(self) -> None:
        """Create the group if it does not exist yet (consuming does this too)."""
        self._run(self.flows.ensure_group())

    def consume(self, count: int = 10) -> int:
        """Handle up to ``count`` reclaimed and ``count`` new entries; return how many were
        acknowledged."""
        return self._run(self.flows.step(count))

    def _run(self, flow: Flow[T]) -> T:
        # A failed command or handler is thrown into the flow, which decides: a failed
        # handler leaves its entry pending there.
        with _reaching_redis():
            return run(flow, self._send, async_twin="AsyncRedisStreamConsumer")


class AsyncRedisStreamConsumer(_ConsumerBase, _AsyncOwner):
    """:class:`RedisStreamConsumer` on ``redis.asyncio``; the handler may be async."""

    async def ensure_group(self) -> None:
        """See :meth:`RedisStreamConsumer.ensure_group`."""
        await self._run(self.flows.ensure_group())

    async def consume(self, count: int = 10) -> int:
        """See :meth:`RedisStreamConsumer.consume`."""
        return await self._run(self.flows.step(count))

    async def _perform(self, op: Op[Any]) -> Any:
        return await self._send(op)

    async def _run(self, flow: Flow[T]) -> T:
        with _reaching_redis():
            return await arun(flow, self._perform)
