"""Completion events on Redis Streams: a publisher and a consumer-group consumer.

The publisher ``XADD``s each event (``MAXLEN ~`` bounds the stream). Each downstream
service reads through its own consumer group, so one stream fans out to every group
("telegram", "email"...), and the consumers of one group share its entries. The consumer:

- acknowledges an entry only after its handler returned, so a crash leaves it pending;
- reclaims entries left pending longer than ``claim_idle`` seconds (their consumer died)
  with ``XAUTOCLAIM``;
- moves an entry that holds no event (no ``event`` field, or one that
  :meth:`OrderEvent.from_json` refuses) to a dead-letter stream
  (``{key_prefix}orders:dead``) on its first delivery, its fields copied byte for byte,
  and acknowledges it; an entry whose handler failed goes there once delivered more than
  ``max_deliveries`` times. So no entry can block the group;
- re-creates its group (reading from the start of the stream) when Redis has lost it,
  after a restart;
- reads entries as raw bytes, so that an entry's bytes cannot fail before it has been
  judged: it refuses a client that decodes responses.

Handlers see each event at least once: use ``event.event_id`` to drop repeats. A Redis
that cannot be reached, or does not answer within the client's timeouts, raises
:class:`~foxpoll.errors.StoreUnavailable` from ``consume``; ``run`` waits it out.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any, Protocol, TypeVar

try:
    import redis
    import redis.asyncio as aredis
    from redis.exceptions import RedisError, ResponseError
except ImportError as exc:  # pragma: no cover - only without the extra
    raise ImportError("Redis streams need redis: pip install 'foxpoll[redis]'") from exc

import attrs

from foxpoll._clock import Clock, SystemClock
from foxpoll._io import Flow, Op, arun, call, pause, run
from foxpoll._outages import OUTAGE_BACKOFF, STOP_LOOKS_EVERY, Outages
from foxpoll.backoff import BackoffPolicy
from foxpoll.dedup.redis import check_client
from foxpoll.errors import StoreUnavailable, is_redis_outage, unavailable_on

from .base import EventError, OrderEvent

__all__ = [
    "AsyncRedisStreamConsumer",
    "AsyncRedisStreamPublisher",
    "RedisStreamConsumer",
    "RedisStreamPublisher",
]

log = logging.getLogger("foxpoll.events")

DEFAULT_PREFIX = "foxpoll:"

#: The fields foxpoll adds to a dead letter, after the original entry's own: why it was
#: moved, its id in the stream, and the group that moved it. An original field of the
#: same name is overwritten, so these names are reserved.
DEAD_REASON = b"foxpoll:reason"
DEAD_ORIGINAL_ID = b"foxpoll:original_id"
DEAD_GROUP = b"foxpoll:group"

#: How the consumer judges an entry: its ``event`` field must hold an OrderEvent; other
#: fields are ignored (a later publisher may add some).
EVENT_FIELD = b"event"

T = TypeVar("T")


@attrs.frozen
class Command(Op[T]):
    """Call the redis client's ``method(*args, **kwargs)``; resume with its reply."""

    method: str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = attrs.field(factory=dict)


def _reaching_redis() -> AbstractContextManager[None]:
    """Redis not serving (unreached, too slow, demoted to a replica by a failover, out of
    memory...: :func:`~foxpoll.errors.is_redis_outage`), raised inside, as
    :class:`~foxpoll.errors.StoreUnavailable` (a handler's own errors never get here: the
    consumer's flow catches them)."""
    return unavailable_on("Redis", RedisError, when=is_redis_outage)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _xadd(stream: str, maxlen: int, fields: Mapping[Any, Any]) -> Command[Any]:
    bound = {"maxlen": maxlen, "approximate": True} if maxlen > 0 else {}
    return Command("xadd", (stream, fields), bound)


class Stop(Protocol):
    """What tells a ``run`` to end: a :class:`threading.Event` or an
    :class:`asyncio.Event`."""

    def is_set(self) -> bool: ...


def _event_in(fields: Mapping[Any, Any]) -> OrderEvent | str:
    """The event an entry's raw fields hold, or why they hold none (a short text that
    never quotes them)."""
    value = fields.get(EVENT_FIELD)
    if value is None:
        return "no event field"
    try:
        return OrderEvent.from_json(value)
    except EventError as exc:
        return str(exc)


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
        """Reclaim and read up to ``count`` entries each, handle them; return how many
        were handled (dead letters not counted)."""
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
            handled += yield from self._handle(entry_id, fields, reclaimed=True)
        for _, entries in fresh or []:
            for entry_id, fields in entries:
                handled += yield from self._handle(entry_id, fields, reclaimed=False)
        return handled

    def serve(self, stop: Stop, count: int, idle: float, backoff: BackoffPolicy,
              rng: random.Random, metrics: Any, clock: Clock) -> Flow[None]:
        """Run :meth:`step` until ``stop`` is set, waiting out Redis outages.

        A round that finds Redis unreachable is logged (once per outage), counted by
        ``metrics.on_worker_error("events", error)``, and followed by the next of
        ``backoff``'s waits; the first round that succeeds is logged and starts the
        waits afresh for the next outage. Anything else a round raises ends the flow.
        """
        outages = Outages("events", f"stream consumer {self.consumer} of group {self.group}",
                          log=log, backoff=backoff, rng=rng, metrics=metrics,
                          clock=clock.monotonic)
        while not stop.is_set():
            try:
                handled = yield from self.step(count)
            except StoreUnavailable as exc:
                wait = outages.failed(exc)
                yield from outages.count(exc)
                yield from _pause_unless(stop, wait)
                continue
            outages.succeeded()
            if handled == 0 and self.block_ms is None:  # a blocking read paced the round
                yield from _pause_unless(stop, idle)

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

    def _handle(self, entry_id: Any, fields: Mapping[Any, Any], *, reclaimed: bool
                ) -> Flow[int]:
        event = _event_in(fields)
        if isinstance(event, str):  # it will not parse on any later delivery either
            yield from self._dead_letter(entry_id, fields, event)
            return 0
        if reclaimed:
            deliveries = yield from self._deliveries(entry_id)
            if deliveries > self.max_deliveries:
                yield from self._dead_letter(entry_id, fields, f"delivered {deliveries} times")
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
        # The entry's fields as read, raw bytes: nothing is decoded, so nothing can fail.
        moved = {**fields, DEAD_REASON: reason, DEAD_ORIGINAL_ID: entry_id,
                 DEAD_GROUP: self.group}
        yield from _xadd(self.dead_stream, self.maxlen, moved)
        yield from Command[int]("xack", (self.stream, self.group, entry_id))


def _pause_unless(stop: Stop, seconds: float) -> Flow[None]:
    """Pause ``seconds`` on the driver's clock, in slices of :data:`STOP_LOOKS_EVERY`,
    ending early once ``stop`` is set."""
    left = seconds
    while left > 0 and not stop.is_set():
        yield from pause(min(left, STOP_LOOKS_EVERY))
        left -= STOP_LOOKS_EVERY


class _RedisClientOwner:
    """Where a publisher's or consumer's client comes from, and who closes it.

    Args:
        where: A ``redis://`` URL, for which it makes its own client (closed by ``close()``,
            ``aclose()`` or ``with``); or your client, never closed by it, of the kind
            the class uses (``redis.Redis``, or ``redis.asyncio.Redis`` for the ``Async``
            classes), with a ``socket_timeout`` above ``block``: nothing else bounds a
            call.
        key_prefix: The stream's key is ``{key_prefix}orders``; its dead letters go to
            ``{key_prefix}orders:dead``.
        connect_timeout: Seconds to connect, for a client made from a URL.
        statement_timeout: Seconds a command may wait for Redis's reply (beyond a
            consumer's ``block``), for a client made from a URL; a client of yours is
            bounded by its own ``socket_timeout``.
        block: Seconds a consumer's read waits for new entries (0 for a publisher).

    Raises:
        TypeError: Your client is of the other kind, or no Redis client.
        ValueError: Your client has no ``socket_timeout``, or one of at most ``block``.
    """

    _client_class: Any
    _asynchronous: bool

    def __init__(self, where: Any, key_prefix: str, connect_timeout: float,
                 statement_timeout: float, block: float = 0.0) -> None:
        self.stream = f"{key_prefix}orders"
        self._owns = isinstance(where, str)
        if not self._owns:
            # Neither kind of client gets a deadline of foxpoll's here: its socket timeout
            # is what ends a call on a frozen network.
            check_client(where, type(self).__name__, asynchronous=self._asynchronous,
                         bounded=True, above=block, why="it is what ends a call on a "
                         "frozen network")
        self._client = (self._client_class.from_url(
            where, socket_connect_timeout=connect_timeout,
            socket_timeout=statement_timeout + block)
            if self._owns else where)


class _SyncOwner(_RedisClientOwner):
    _client_class = redis.Redis
    _asynchronous = False

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
    _asynchronous = True

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
            publisher), which needs a ``socket_timeout``: nothing else would end a
            publish on a frozen network.
        key_prefix: The stream's key is ``{key_prefix}orders``.
        maxlen: Keep about this many entries (``MAXLEN ~``); 0 keeps everything.
        connect_timeout: Seconds to connect, for a client made from a URL.
        statement_timeout: Seconds a command may wait for Redis's reply, for a client made
            from a URL.

    Raises:
        TypeError: Your client is a ``redis.asyncio`` one (that is
            :class:`AsyncRedisStreamPublisher`'s), or no Redis client.
        ValueError: Your client has no ``socket_timeout``.
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
    """:class:`RedisStreamPublisher` on ``redis.asyncio``: a client of yours is a
    ``redis.asyncio.Redis``, and it too needs a ``socket_timeout``."""

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
                 connect_timeout: float = 5.0, statement_timeout: float = 5.0,
                 metrics: Any = None, clock: Clock | None = None,
                 rng: random.Random | None = None) -> None:
        if max_deliveries < 1:
            raise ValueError("max_deliveries must be at least 1")
        # A read may wait ``block`` for new entries before Redis answers.
        super().__init__(where, key_prefix, connect_timeout, statement_timeout, block or 0.0)
        get_encoder = getattr(self._client, "get_encoder", None)
        if get_encoder is not None and get_encoder().decode_responses:
            # redis-py would decode an entry while reading it, before the consumer could
            # judge it: one entry of bad bytes would fail every read of the group.
            raise ValueError("a stream consumer reads entries as raw bytes: give it a "
                             "client (or URL) without decode_responses")
        self.flows = ConsumerFlows(
            handler, self.stream, group, consumer, int(claim_idle * 1000), max_deliveries,
            None if block is None else int(block * 1000), f"{self.stream}:dead", maxlen,
        )
        self.metrics = metrics
        self.clock: Clock = clock or SystemClock()
        self.rng = rng or random.Random()

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
            consumer), which needs a ``socket_timeout`` above ``block``: a read waits up
            to ``block`` for new entries, and the socket timeout is what ends one on a
            frozen network. Either must not decode responses: entries are read as raw
            bytes.
        group: The consumer group: one per downstream service.
        consumer: This consumer's name, unique within the group (host and pid, say).
        handler: Called with each :class:`OrderEvent`; return to acknowledge it, raise to
            have it delivered again later.
        key_prefix: The stream's key is ``{key_prefix}orders``, its dead letters'
            ``{key_prefix}orders:dead``.
        claim_idle: Seconds an entry may stay pending before another consumer reclaims it.
        max_deliveries: Deliveries of an entry whose handler keeps failing before it goes
            to the dead-letter stream (an entry that holds no event goes there at once).
        block: Seconds to wait for new entries in each :meth:`consume` (None: don't wait).
        maxlen: ``MAXLEN ~`` of the dead-letter stream.
        connect_timeout: Seconds to connect, for a client made from a URL.
        statement_timeout: Seconds a command may wait for Redis's reply beyond ``block``,
            for a client made from a URL.
        metrics: Told of every round of :meth:`run` that found Redis unreachable, as
            ``metrics.on_worker_error("events", error)``; without that method, nothing
            is counted. A blocking consumer cannot await an async one
            (:class:`TypeError`); :class:`AsyncRedisStreamConsumer` awaits it.
        clock: What :meth:`run` waits on (``foxpoll.testing.FakeClock`` in tests).
        rng: Random source for :meth:`run`'s jittered waits.

    Raises:
        TypeError: Your client is a ``redis.asyncio`` one (that is
            :class:`AsyncRedisStreamConsumer`'s), or no Redis client.
        ValueError: The client decodes responses (``decode_responses=True``), or has no
            ``socket_timeout``, or one of at most ``block`` seconds.
    """

    def ensure_group(self) -> None:
        """Create the group if it does not exist yet (consuming does this too)."""
        self._run(self.flows.ensure_group())

    def consume(self, count: int = 10) -> int:
        """Handle up to ``count`` reclaimed and ``count`` new entries; return how many were
        handled and acknowledged (entries moved to the dead-letter stream are not
        counted).

        Raises:
            StoreUnavailable: Redis could not be reached, or did not answer in time.
        """
        return self._run(self.flows.step(count))

    def run(self, *, stop: threading.Event | None = None, count: int = 10,
            idle: float = 1.0, backoff: BackoffPolicy = OUTAGE_BACKOFF) -> None:
        """Consume until ``stop`` is set, through Redis outages.

        Each round is a :meth:`consume` of up to ``count`` entries. A consumer that does
        not ``block`` waits ``idle`` seconds after a round that handled nothing. A round
        that finds Redis unreachable (:class:`~foxpoll.errors.StoreUnavailable`) is
        followed by ``backoff``'s next wait, drawn with ``rng``, and counted in
        ``metrics``; the outage is logged once at WARNING when it begins and once at INFO
        when Redis answers again. Every wait is on ``clock``, and ends within
        :data:`STOP_LOOKS_EVERY` seconds of ``stop`` being set; a round in progress ends
        first (up to ``block`` plus the command's timeout).

        Anything else ends ``run`` by raising: Redis refusing a command (a key of the
        wrong type, a missing permission) or an error of the program (an
        ``on_worker_error`` that cannot take the call, or is async: :class:`TypeError`).
        A handler's exceptions never do: its entry is left pending.
        """
        self._run(self.flows.serve(stop or threading.Event(), count, idle, backoff,
                                   self.rng, self.metrics, self.clock))

    def _perform(self, op: Op[Any]) -> Any:
        # Only Redis's own replies are mapped: a handler's errors (it may use Redis too)
        # are its own, thrown into the flow as they are.
        with _reaching_redis():
            return self._send(op)

    def _run(self, flow: Flow[T]) -> T:
        return run(flow, self._perform, clock=self.clock, async_twin="AsyncRedisStreamConsumer")


class AsyncRedisStreamConsumer(_ConsumerBase, _AsyncOwner):
    """:class:`RedisStreamConsumer` on ``redis.asyncio``; the handler (and ``metrics``'
    hook) may be async. A client of yours is a ``redis.asyncio.Redis``, and it too needs
    a ``socket_timeout`` above ``block``."""

    async def ensure_group(self) -> None:
        """See :meth:`RedisStreamConsumer.ensure_group`."""
        await self._run(self.flows.ensure_group())

    async def consume(self, count: int = 10) -> int:
        """See :meth:`RedisStreamConsumer.consume`."""
        return await self._run(self.flows.step(count))

    async def run(self, *, stop: asyncio.Event | None = None, count: int = 10,
                  idle: float = 1.0, backoff: BackoffPolicy = OUTAGE_BACKOFF) -> None:
        """See :meth:`RedisStreamConsumer.run`; cancelling it ends it too."""
        await self._run(self.flows.serve(stop or asyncio.Event(), count, idle, backoff,
                                         self.rng, self.metrics, self.clock))

    async def _perform(self, op: Op[Any]) -> Any:
        with _reaching_redis():
            return await self._send(op)

    async def _run(self, flow: Flow[T]) -> T:
        return await arun(flow, self._perform, clock=self.clock)
