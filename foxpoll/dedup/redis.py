"""``RedisDedupStore``: one Lua script per transition, Redis ``TIME`` as the clock.

A record is a hash at ``{prefix}delivery:{order_id}``; a sorted set per state
(``{prefix}deliveries:{state}``, scored by the last change) serves listing. Each script
reads and writes atomically, so no two claims interleave. DELIVERED records expire after
``retention`` seconds (30 days by default; 0 keeps them forever), released ones too, and a
claim nobody finished after its lease plus the retention; every completion and release
prunes the indexes of entries older than the retention, so they never outgrow the records.

Both stores run one set of flows, through the client's public API only: the scripts as
``register_script`` gives them (``EVALSHA``, loaded again when the server answers
``NOSCRIPT``), the other commands through ``execute_command``, each on a connection the
client's pool lends for that command.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

try:
    import redis
    import redis.asyncio as aredis
    import redis.asyncio.retry
    import redis.retry
    from redis.backoff import NoBackoff
    from redis.exceptions import RedisError
    from redis.exceptions import ResponseError as RedisResponseError
    from redis.exceptions import TimeoutError as RedisTimeoutError
except ImportError as exc:  # pragma: no cover - only without the extra
    raise ImportError("RedisDedupStore needs redis: pip install 'foxpoll[redis]'") from exc

import attrs

from foxpoll._core import check_timeout
from foxpoll._deadlines import within
from foxpoll._io import Flow, Op, arun, run
from foxpoll.errors import DedupError, StoreUnavailable, is_redis_outage

from ._flows import FlowStore
from .base import (
    AsyncDedupStore,
    ClaimResult,
    DedupStore,
    DeliveryRecord,
    DeliveryState,
    check_retention,
    claimed_record,
    delivered_record,
    lease_lost,
    record_from_fields,
    unavailable,
)

__all__ = ["AsyncRedisDedupStore", "RedisDedupStore", "check_client"]

T = TypeVar("T")

THIRTY_DAYS = 30 * 24 * 3600

# Each script turns the clock into text once: the fields it writes and its reply carry
# the same value.
_NOW = ("local t = redis.call('TIME') local now = t[1] + t[2] / 1000000 "
        "local now_text = tostring(now)\n")


def _prune(*indexes: int) -> str:
    """Drop the entries of these index keys older than the script's ``retention``: their
    records have expired, and no index may outgrow the records it points at. The claimed
    index is scored by the lease's end (a claim's record expires a retention after it),
    the others by the last change."""
    removals = " ".join(f"redis.call('ZREMRANGEBYSCORE', KEYS[{i}], '-inf', stale)"
                        for i in indexes)
    return f"local stale = '(' .. (now - retention) {removals}"


# KEYS: record, claimed index, released index, delivered index; the retention is the last
# ARGV. The hot path (a won claim, a completion) replies with the few fields the caller
# does not know, not the whole record. A claim prunes nothing: a
# completion or a release prunes the indexes it writes to, and the claimed one.
_CLAIM = _NOW + """
local retention = tonumber(ARGV[4])
local r = redis.call('HMGET', KEYS[1], 'state', 'lease_until', 'attempts', 'created_at')
local free = (not r[1]) or r[1] == 'released' or (r[1] == 'claimed' and tonumber(r[2]) <= now)
if not free then return {0, redis.call('HGETALL', KEYS[1]), now_text} end
local attempts = (tonumber(r[3]) or 0) + 1
local created = r[4] or now_text
local lease = tonumber(ARGV[3])
local lease_until = tostring(now + lease)
redis.call('HSET', KEYS[1], 'order_id', ARGV[1], 'state', 'claimed', 'token', ARGV[2],
           'lease_until', lease_until, 'attempts', attempts,
           'created_at', created, 'updated_at', now_text)
if r[1] == 'released' then redis.call('ZREM', KEYS[3], ARGV[1]) end
redis.call('ZADD', KEYS[2], lease_until, ARGV[1])
if retention > 0 then redis.call('EXPIRE', KEYS[1], math.ceil(lease + retention)) end
return {1, {lease_until, attempts, created}, now_text}
"""
_COMPLETE = _NOW + """
local retention = tonumber(ARGV[5])
local r = redis.call('HMGET', KEYS[1], 'state', 'token', 'attempts', 'created_at')
if r[1] ~= 'claimed' or r[2] ~= ARGV[2] then
  local again = r[1] == 'delivered' and r[2] == ARGV[2]
  return {again and 2 or 0, redis.call('HGETALL', KEYS[1])}
end
redis.call('HSET', KEYS[1], 'state', 'delivered', 'lease_until', '', 'payload_hash', ARGV[3],
           'receipt', ARGV[4], 'delivered_at', now_text, 'updated_at', now_text)
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[4], now_text, ARGV[1])
if retention > 0 then
  redis.call('EXPIRE', KEYS[1], retention)
  """ + _prune(4, 2) + """
end
return {1, {r[3], r[4], now_text}}
"""
_RELEASE = _NOW + """
local retention = tonumber(ARGV[3])
local r = redis.call('HMGET', KEYS[1], 'state', 'token')
if r[1] ~= 'claimed' or r[2] ~= ARGV[2] then return {0, redis.call('HGETALL', KEYS[1])} end
redis.call('HSET', KEYS[1], 'state', 'released', 'lease_until', '', 'updated_at', now_text)
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], now_text, ARGV[1])
if retention > 0 then
  redis.call('EXPIRE', KEYS[1], retention)
  """ + _prune(3, 2) + """
end
return {1, redis.call('HGETALL', KEYS[1])}
"""
_RENEW = _NOW + """
local retention = tonumber(ARGV[4])
local r = redis.call('HMGET', KEYS[1], 'state', 'token')
if r[1] ~= 'claimed' or r[2] ~= ARGV[2] then return {0, redis.call('HGETALL', KEYS[1])} end
local lease = tonumber(ARGV[3])
local lease_until = tostring(now + lease)
redis.call('HSET', KEYS[1], 'lease_until', lease_until, 'updated_at', now_text)
redis.call('ZADD', KEYS[2], lease_until, ARGV[1])
if retention > 0 then redis.call('EXPIRE', KEYS[1], math.ceil(lease + retention)) end
return {1, redis.call('HGETALL', KEYS[1])}
"""
_SCRIPTS = {"claim": _CLAIM, "complete": _COMPLETE, "release": _RELEASE, "renew": _RENEW}


@attrs.frozen
class Script(Op[list[Any]]):
    """Run the store's Lua script ``name``; resume with its reply (every script answers
    with a table)."""

    name: str
    keys: Sequence[str]
    args: Sequence[Any]


@attrs.frozen
class Command(Op[T]):
    """Run one Redis command through the client's ``execute_command``; resume with the
    reply as the client shapes it (its protocol and ``decode_responses`` decide: bytes or
    text, a flat list or a mapping)."""

    args: tuple[Any, ...]


def _fields(reply: Sequence[Any] | Mapping[Any, Any]) -> dict[str, Any]:
    """A hash's fields by name, from a flat ``[field, value, ...]`` list (a script's
    reply) or a mapping (``HGETALL`` through the client's response callbacks)."""
    if isinstance(reply, Mapping):
        pairs: Any = reply.items()
    else:
        flat = iter(reply)
        pairs = zip(flat, flat, strict=False)  # one iterator, read in pairs
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in pairs}


@attrs.frozen
class RedisFlows:
    """The store's primitives as flows of :class:`Script` and :class:`Command` ops."""

    prefix: str
    retention: int

    def record_key(self, order_id: str) -> str:
        return f"{self.prefix}delivery:{order_id}"

    def state_key(self, state: DeliveryState) -> str:
        return f"{self.prefix}deliveries:{state.value}"

    #: The claimed, released and delivered indexes, in the scripts' KEYS order.
    index_keys: tuple[str, ...] = attrs.field(init=False)

    @index_keys.default
    def _index_keys(self) -> tuple[str, ...]:
        return tuple(self.state_key(state) for state in (
            DeliveryState.CLAIMED, DeliveryState.RELEASED, DeliveryState.DELIVERED))

    def keys(self, order_id: str) -> list[str]:
        return [self.record_key(order_id), *self.index_keys]

    def claim(self, order_id: str, token: str, lease: float) -> Flow[ClaimResult]:
        won, found, now_text = yield from Script(
            "claim", self.keys(order_id), (order_id, token, lease, self.retention))
        now = float(now_text)
        if won:
            lease_until, attempts, created_at = found
            return ClaimResult(True, claimed_record(order_id, token, lease_until, attempts,
                                                    created_at, now), now)
        return ClaimResult(False, self._record(order_id, found), now)

    def _record(self, order_id: str, reply: Sequence[Any] | Mapping[Any, Any]
                ) -> DeliveryRecord:
        """The record of ``order_id`` from its hash's fields, as a reply gives them."""
        return record_from_fields(_fields(reply), order_id=order_id,
                                  key=self.record_key(order_id))

    def _owned(self, name: str, order_id: str, args: tuple[Any, ...]) -> Flow[DeliveryRecord]:
        done, flat = yield from Script(name, self.keys(order_id), args)
        if done:
            return self._record(order_id, flat)
        raise lease_lost(order_id, self._record(order_id, flat) if flat else None)

    def complete(
        self, order_id: str, token: str, payload_hash: str, receipt: str | None
    ) -> Flow[DeliveryRecord]:
        args = (order_id, token, payload_hash, receipt or "", self.retention)
        done, found = yield from Script("complete", self.keys(order_id), args)
        if done == 1:  # attempts, created_at, delivered_at
            return delivered_record(order_id, token, payload_hash, receipt or None, *found)
        if done == 2:  # completed before with this token: the stored record
            return self._record(order_id, found)
        raise lease_lost(order_id, self._record(order_id, found) if found else None)

    def release(self, order_id: str, token: str) -> Flow[DeliveryRecord]:
        return (yield from self._owned("release", order_id,
                                       (order_id, token, self.retention)))

    def renew(self, order_id: str, token: str, lease: float) -> Flow[DeliveryRecord]:
        return (yield from self._owned("renew", order_id,
                                       (order_id, token, lease, self.retention)))

    def get(self, order_id: str) -> Flow[DeliveryRecord | None]:
        reply = yield from Command[Any](("HGETALL", self.record_key(order_id)))
        return self._record(order_id, reply) if reply else None

    def list(self, state: DeliveryState, limit: int) -> Flow[list[DeliveryRecord]]:
        records: list[DeliveryRecord] = []
        start = 0
        while len(records) < limit:  # page on past entries whose records have gone
            members = yield from Command[list[Any]](
                ("ZRANGE", self.state_key(state), start, start + limit - 1))
            if not members:
                break
            start += len(members)
            for member in members:
                order_id = member.decode() if isinstance(member, bytes) else member
                record = yield from self.get(order_id)
                if record is None or record.state is not state:  # expired, or moved on
                    yield from Command[int](("ZREM", self.state_key(state), order_id))
                    start -= 1  # the entries after it moved up by one
                elif len(records) < limit:
                    records.append(record)
        return records


class _RedisStore(FlowStore):
    """What both Redis stores share; each names its client and retry classes."""

    _client_class: Any
    _retry_class: Any
    _blocking: bool
    _client: Any  # a redis.Redis or a redis.asyncio.Redis, by subclass

    def __init__(
        self, where: str | redis.Redis | aredis.Redis, *, key_prefix: str = "foxpoll:",
        retention: int = THIRTY_DAYS,
        statement_timeout: float = 5.0, connect_timeout: float = 5.0,
    ) -> None:
        check_timeout(statement_timeout, "statement_timeout")
        check_timeout(connect_timeout, "connect_timeout")
        self._owns = isinstance(where, str)
        if not self._owns:
            # Only the socket timeout can end a blocking call on a frozen network: without
            # it, a call (and a delivery's lease) could wait for good.
            check_client(where, "RedisDedupStore" if self._blocking else "AsyncRedisDedupStore",
                         asynchronous=not self._blocking, bounded=self._blocking,
                         why="the store's blocking calls are bounded by it")
        # No retries: a command retried after a timeout would wait out socket_timeout
        # again, past statement_timeout; delivery retries what needs retrying itself.
        self._client = (
            self._client_class.from_url(
                where, socket_timeout=statement_timeout,
                socket_connect_timeout=connect_timeout,
                retry=self._retry_class(NoBackoff(), 0))
            if isinstance(where, str) else where
        )
        self.statement_timeout = statement_timeout
        self.connect_timeout = connect_timeout
        self._flows = RedisFlows(key_prefix, check_retention(retention))
        self._scripts = {name: self._client.register_script(source)
                         for name, source in _SCRIPTS.items()}

    def _send(self, op: Op[Any]) -> Any:
        """Send ``op`` through the client: its reply, or on ``redis.asyncio`` an awaitable
        of it."""
        if isinstance(op, Script):
            return self._scripts[op.name](keys=op.keys, args=op.args)
        if isinstance(op, Command):
            return self._client.execute_command(*op.args)
        raise TypeError(f"a Redis store cannot perform {type(op).__name__}")

    def _refused(self, op: Op[Any], exc: RedisResponseError) -> DedupError:
        """The :class:`DedupError` for a command Redis refused (a record's key holding
        another type, say): it names the key and Redis's error code, never the rest of
        the reply."""
        key = op.keys[0] if isinstance(op, Script) else (
            op.args[1] if isinstance(op, Command) and len(op.args) > 1 else "?")
        if isinstance(key, bytes):
            key = key.decode(errors="replace")
        code = re.match(r"[A-Z]+\b", str(exc))
        return DedupError(f"Redis refused a delivery step on key {key!r}: "
                          f"{code.group() if code else type(exc).__name__}")

    def _failure(self, exc: Exception) -> StoreUnavailable:
        """The :class:`StoreUnavailable` for a call that failed with ``exc``."""
        if isinstance(exc, RedisTimeoutError):  # the client's socket timeouts
            if not self._owns:
                return StoreUnavailable("Redis did not answer within the client's socket "
                                        "timeout")
            return StoreUnavailable(
                f"Redis did not answer within statement_timeout ({self.statement_timeout:g} s)"
                f" or connect_timeout ({self.connect_timeout:g} s)")
        if isinstance(exc, TimeoutError):  # the async store's own deadline
            return StoreUnavailable(f"Redis did not answer within statement_timeout "
                                    f"({self.statement_timeout:g} s)")
        return unavailable("Redis", exc)


def _socket_timeout(client: Any) -> float | None:
    """The socket timeout a client's connections get (None: they wait for good); a client
    that does not say (a cluster client, say) counts as bounded."""
    settings = getattr(getattr(client, "connection_pool", None), "connection_kwargs", None)
    if not isinstance(settings, dict):
        return math.inf
    timeout: float | None = settings.get("socket_timeout")
    return timeout


def is_asyncio_client(client: Any) -> bool:
    """Whether ``client`` is a ``redis.asyncio`` client: its commands are coroutines."""
    return inspect.iscoroutinefunction(getattr(client, "execute_command", None))


def check_client(client: Any, what: str, *, asynchronous: bool, bounded: bool,
                 why: str = "", above: float = 0.0) -> None:
    """Refuse a Redis client of the caller's that ``what`` (a class's name) cannot use.

    Args:
        client: The client given.
        what: The class given it; its twin (``Async`` prefixed or dropped) is the one
            to use for a client of the other kind.
        asynchronous: Whether ``what`` needs a ``redis.asyncio`` client.
        bounded: Whether the client must have a ``socket_timeout``: the only bound on a
            call where ``what`` has none of its own.
        why: What the socket timeout bounds, for the message.
        above: Seconds the socket timeout must exceed (a blocking read's wait).

    Raises:
        TypeError: ``client`` is not a Redis client, or is one of the other kind.
        ValueError: ``bounded``, and the client has no socket timeout, or one of at most
            ``above`` seconds.
    """
    if not callable(getattr(client, "execute_command", None)):
        raise TypeError(f"{what} takes a redis:// URL or a Redis client, not "
                        f"{type(client).__name__}")
    if is_asyncio_client(client) != asynchronous:
        twin = what.removeprefix("Async") if what.startswith("Async") else f"Async{what}"
        given, needed = ("redis.asyncio", "redis.Redis") if not asynchronous else (
            "redis.Redis", "redis.asyncio")
        raise TypeError(f"{what} needs a {needed} client, and was given a {given} one: "
                        f"use {twin} for that")
    if not bounded:
        return
    timeout = _socket_timeout(client)
    if timeout is None:
        why = why or "nothing else ends a call on a frozen network"
        raise ValueError("a Redis client of your own needs a socket_timeout (Redis(..., "
                         f"socket_timeout=5)): {why}")
    if timeout <= above:
        raise ValueError(f"the Redis client's socket_timeout ({timeout:g} s) must be above "
                         f"block ({above:g} s): each read waits up to block for new "
                         "entries, and the socket timeout would end it first")


class RedisDedupStore(_RedisStore, DedupStore):
    """A dedup store in Redis.

    Args:
        where: A ``redis://`` URL (the store's own client, closed by :meth:`close`), or
            your ``redis.Redis`` client, used as it is and never closed by the store.
        key_prefix: Prefix of every key the store writes.
        retention: Seconds a DELIVERED record is kept (0: forever).
        statement_timeout: Seconds one command may wait for its reply before the call
            raises :class:`StoreUnavailable` (a network that froze mid-command): the
            ``socket_timeout`` of the client the store builds from a URL. A client of
            your own is bounded by its own ``socket_timeout`` and retry policy instead;
            one without a ``socket_timeout`` is refused (:class:`ValueError`), since
            nothing would end a call on a frozen network.
        connect_timeout: Seconds to connect, for a client built from a URL
            (``socket_connect_timeout``).

    Raises:
        TypeError: ``where`` is a ``redis.asyncio`` client (that is
            :class:`AsyncRedisDedupStore`'s), or no Redis client at all.
        ValueError: Your client has no ``socket_timeout``.
    """

    _client_class = redis.Redis
    _retry_class = redis.retry.Retry
    _blocking = True

    def _perform(self, op: Op[Any]) -> Any:
        try:
            return self._send(op)
        except RedisResponseError as exc:
            if is_redis_outage(exc):  # a replica after a failover, say: _run maps it
                raise
            raise self._refused(op, exc) from exc

    def _run(self, flow: Flow[T]) -> T:
        try:
            return run(flow, self._perform)
        except RedisError as exc:
            if not is_redis_outage(exc):
                raise
            raise self._failure(exc) from exc

    def close(self) -> None:
        """Close the store's own client (a client you passed in stays open)."""
        if self._owns:
            self._client.close()


class AsyncRedisDedupStore(_RedisStore, AsyncDedupStore):
    """:class:`RedisDedupStore` on ``redis.asyncio`` (a URL, or a ``redis.asyncio.Redis``).
    Its connections belong to one event loop: build one store per loop, shared by that
    loop's tasks.

    ``statement_timeout`` bounds every call, whatever the client: past it, the call is
    cancelled (redis-py then drops its connection) and raises :class:`StoreUnavailable`.
    A blocking ``redis.Redis`` client is refused (:class:`TypeError`): that is
    :class:`RedisDedupStore`'s.
    """

    _client_class = aredis.Redis
    _retry_class = redis.asyncio.retry.Retry
    _blocking = False  # every call runs under statement_timeout, whatever the client

    async def _perform(self, op: Op[Any]) -> Any:
        try:
            return await self._send(op)
        except RedisResponseError as exc:
            if is_redis_outage(exc):
                raise
            raise self._refused(op, exc) from exc

    async def _run(self, flow: Flow[T]) -> T:
        try:
            async with within(self.statement_timeout):
                return await arun(flow, self._perform)
        except (TimeoutError, RedisError) as exc:
            if isinstance(exc, RedisError) and not is_redis_outage(exc):
                raise
            raise self._failure(exc) from exc

    async def aclose(self) -> None:
        """Close the store's own client (a client you passed in stays open)."""
        if self._owns:
            await self._client.aclose()
