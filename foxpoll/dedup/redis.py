"""``RedisDedupStore``: one Lua script per transition, Redis ``TIME`` as the clock.

A record is a hash at ``{prefix}delivery:{order_id}``; a sorted set per state
(``{prefix}deliveries:{state}``, scored by the last change) serves listing. Each script
reads and writes atomically, so no two claims interleave. DELIVERED records expire after
``retention`` seconds (30 days by default; 0 keeps them forever), released ones too, and a
claim nobody finished after its lease plus the retention; every completion and release
prunes the indexes of entries older than the retention, so they never outgrow the records.

The blocking store runs its commands on a connection it keeps *warm* between calls (see
:mod:`foxpoll._warm`), straight through the connection's ``send_command`` and
``read_response``: redis-py's ``execute_command`` takes the connection from the pool,
polls its socket, wraps the call in its retry and metrics machinery and gives the
connection back, which right after a round trip costs more than the round trip's own
Python here. A warm connection is polled once before it serves again, so one the server
closed meanwhile is replaced, as the pool would.
"""

from __future__ import annotations

import select
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

try:
    import redis
    import redis.asyncio as aredis
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import NoScriptError, ResponseError
    from redis.exceptions import TimeoutError as RedisTimeoutError
except ImportError as exc:  # pragma: no cover - only without the extra
    raise ImportError("RedisDedupStore needs redis: pip install 'foxpoll[redis]'") from exc

import attrs

from foxpoll._deadlines import WATCHDOG, Guard, within
from foxpoll._effects import arun_flow, run_flow
from foxpoll._warm import WarmConnections
from foxpoll.errors import DedupError, StoreUnavailable

from ._flows import Flow, FlowStore
from .base import (
    AsyncDedupStore,
    ClaimResult,
    DedupStore,
    DeliveryRecord,
    DeliveryState,
    claimed_record,
    delivered_record,
    lease_lost,
    record_from_fields,
    unavailable,
)

__all__ = ["AsyncRedisDedupStore", "RedisDedupStore"]

THIRTY_DAYS = 30 * 24 * 3600

# Inside Redis a number's conversion to text (or back) costs about as much as a small
# command: each script converts ``now`` once, and the replies carry that text.
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
# ARGV. Each script makes as few calls as it can (a call inside a script costs about as
# much as a small command), and the hot path (a won claim, a completion) replies with the
# few fields the caller does not know, not the whole record. A claim prunes nothing: a
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


class Script(NamedTuple):
    """Run the named Lua script; resume with its reply. (A named tuple: one is built per
    store call.)"""

    name: str
    keys: Sequence[str]
    args: Sequence[Any]


@attrs.frozen
class Command:
    """Run one Redis command; resume with its reply."""

    name: str
    args: Sequence[Any]


def _fields(flat: Sequence[Any]) -> dict[str, Any]:
    pairs = iter(flat)
    return {(k.decode() if isinstance(k, bytes) else k): v
            for k, v in zip(pairs, pairs, strict=False)}  # one iterator, read in pairs


@attrs.frozen
class RedisFlows:
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
        won, found, now = yield Script("claim", self.keys(order_id),
                                       [order_id, token, lease, self.retention])
        now = float(now)
        if won:
            lease_until, attempts, created_at = found
            return ClaimResult(True, claimed_record(order_id, token, lease_until, attempts,
                                                    created_at, now), now)
        return ClaimResult(False, record_from_fields(_fields(found)), now)

    def _owned(self, name: str, order_id: str, args: list[Any]) -> Flow[DeliveryRecord]:
        done, flat = yield Script(name, self.keys(order_id), args)
        if done:
            return record_from_fields(_fields(flat))
        raise lease_lost(order_id, record_from_fields(_fields(flat)) if flat else None)

    def complete(
        self, order_id: str, token: str, payload_hash: str, receipt: str | None
    ) -> Flow[DeliveryRecord]:
        args = [order_id, token, payload_hash, receipt or "", self.retention]
        done, found = yield Script("complete", self.keys(order_id), args)
        if done == 1:  # attempts, created_at, delivered_at
            return delivered_record(order_id, token, payload_hash, receipt or None, *found)
        if done == 2:  # completed before with this token: the stored record
            return record_from_fields(_fields(found))
        raise lease_lost(order_id, record_from_fields(_fields(found)) if found else None)

    def release(self, order_id: str, token: str) -> Flow[DeliveryRecord]:
        return (yield from self._owned("release", order_id,
                                       [order_id, token, self.retention]))

    def renew(self, order_id: str, token: str, lease: float) -> Flow[DeliveryRecord]:
        return (yield from self._owned("renew", order_id,
                                       [order_id, token, lease, self.retention]))

    def get(self, order_id: str) -> Flow[DeliveryRecord | None]:
        flat = yield Command("HGETALL", [self.record_key(order_id)])
        fields = _fields(flat) if isinstance(flat, list) else {
            (k.decode() if isinstance(k, bytes) else k): v for k, v in flat.items()
        }
        return record_from_fields(fields) if fields else None

    def list(self, state: DeliveryState, limit: int) -> Flow[list[DeliveryRecord]]:
        records: list[DeliveryRecord] = []
        start = 0
        while len(records) < limit:  # page on past entries whose records have gone
            members = yield Command("ZRANGE", [self.state_key(state), start,
                                               start + limit - 1])
            if not members:
                break
            start += len(members)
            for member in members:
                order_id = member.decode() if isinstance(member, bytes) else member
                record = yield from self.get(order_id)
                if record is None or record.state is not state:  # expired, or moved on
                    yield Command("ZREM", [self.state_key(state), order_id])
                    start -= 1  # the entries after it moved up by one
                elif len(records) < limit:
                    records.append(record)
        return records


class _RedisStore(FlowStore):
    """What both Redis stores share; each names its client class and its driver."""

    _client_class: Any

    def __init__(
        self, url_or_client: Any, *, key_prefix: str = "foxpoll:", retention: int = THIRTY_DAYS,
        statement_timeout: float = 5.0, reuse_connection_for: float = 1.0,
    ) -> None:
        self._warm: WarmConnections[_Held] = WarmConnections(reuse_connection_for)
        self._owns = isinstance(url_or_client, str)
        self._client = (
            self._client_class.from_url(url_or_client, socket_timeout=statement_timeout,
                                        socket_connect_timeout=statement_timeout)
            if self._owns else url_or_client
        )
        self.statement_timeout = statement_timeout
        self._flows = RedisFlows(key_prefix, int(retention))
        self._scripts = {n: self._client.register_script(s) for n, s in _SCRIPTS.items()}

    def _failure(self, exc: Exception, cut: bool) -> StoreUnavailable:
        if cut:
            return StoreUnavailable(f"Redis did not answer within statement_timeout "
                                    f"({self.statement_timeout:g} s)")
        return unavailable("Redis", exc)


class RedisDedupStore(_RedisStore, DedupStore):
    """A dedup store in Redis.

    Args:
        url_or_client: A ``redis://`` URL, or a ``redis.Redis`` client (not closed by
            the store).
        key_prefix: Prefix of every key the store writes.
        retention: Seconds a DELIVERED record is kept (0: forever).
        statement_timeout: Seconds one store call may take, whatever the client's own
            socket timeout; past that, the call's connection is dropped and the call
            raises :class:`StoreUnavailable` (a network that froze mid-command).
        reuse_connection_for: Seconds a connection taken from the client's pool serves
            the next calls before it goes back (at once after a failed call, and when
            the store is idle or closed); 0 returns it after every call. Taking it anew
            costs each call tens of microseconds; keeping it holds one connection of a
            shared pool per busy thread that much longer.
    """

    _client_class = redis.Redis

    def _checkout(self) -> _Held:
        """A connection for one call: a warm one still open, or one from the pool."""
        held = self._warm.take()
        if held is not None:
            if held.idle():
                return held
            held.discard()
        pool = self._client.connection_pool
        conn = pool.get_connection()
        return _Held(pool, conn, self._scripts,
                     WATCHDOG.guard(self.statement_timeout, conn.disconnect))

    def _run(self, flow: Flow[Any]) -> Any:
        # redis-py bounds a call only by the client's socket timeout, which a caller's
        # client may not have: the watchdog drops the connection of a frozen call.
        try:
            held = self._checkout()
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise self._failure(exc, False) from exc
        guard = held.guard
        guard.start()
        healthy = False  # whether the connection read every reply it was sent
        try:
            result = run_flow(flow, held.perform)
            healthy = True
            return result
        except (ResponseError, DedupError):  # an error reply, or a record the flow refused
            healthy = True
            raise
        except (RedisConnectionError, RedisTimeoutError) as exc:
            # The store's own client times its reads out at statement_timeout too.
            timed_out = self._owns and isinstance(exc, RedisTimeoutError)
            raise self._failure(exc, guard.fired or timed_out) from exc
        except Exception as exc:
            if guard.fired:  # cut mid-read, the parser may fail in its own way
                raise self._failure(exc, True) from exc
            raise
        finally:
            if guard.stop() or not healthy:
                held.discard()
            elif not self._warm.keep(held):
                held.put_back()

    def close(self) -> None:
        self._warm.flush(everything=True)
        if self._owns:
            self._client.close()


_PACK: Callable[[tuple[Any, ...]], bytes] | None
try:
    import hiredis

    _PACK = hiredis.pack_command
except ImportError:  # pragma: no cover - the redis extra installs hiredis
    _PACK = None


class _Held:
    """One connection of a blocking store, out of its client's pool.

    Its ``perform`` runs a flow's effects on it: a script by its hash (on ``NOSCRIPT``, a
    restarted or flushed server, loading it again first), a command as it is. Replies
    come back as the connection reads them, without the client's response callbacks: the
    flows take either form.
    """

    __slots__ = ("conn", "guard", "poller", "pool", "scripts", "since")

    def __init__(self, pool: Any, conn: Any, scripts: dict[str, Any], guard: Guard) -> None:
        self.pool, self.conn, self.scripts, self.guard = pool, conn, scripts, guard
        self.since = time.monotonic()
        sock = getattr(conn, "_sock", None)
        self.poller: Any = None
        if sock is not None and hasattr(select, "poll"):
            self.poller = select.poll()
            self.poller.register(sock, select.POLLIN)

    def idle(self) -> bool:
        """Whether the connection is still open, with nothing unread: the server may have
        closed it since its last call (a restart, ``CLIENT KILL``). One ``poll`` of its
        socket; redis-py's own ``can_read`` builds a poller each time."""
        try:
            if self.poller is not None:
                return not self.poller.poll(0)
            return not self.conn.can_read()
        except (RedisConnectionError, RedisTimeoutError, OSError):
            return False

    def perform(self, effect: Script | Command) -> Any:
        if type(effect) is Script:
            script = self.scripts[effect.name]
            call = ("EVALSHA", script.sha, len(effect.keys), *effect.keys, *effect.args)
            self._send(call)
            try:
                return self.conn.read_response()
            except NoScriptError:
                # Loaded on this connection, not through the client: a caller's pool may
                # have no other connection to lend while this one is held.
                self._send(("SCRIPT", "LOAD", script.script))
                self.conn.read_response()
                self._send(call)
                return self.conn.read_response()
        self._send((effect.name, *effect.args))
        return self.conn.read_response()

    def _send(self, command: tuple[Any, ...]) -> None:
        """Send one command. With hiredis, packed by it straight away, as redis-py would
        pack it, but without ``send_command``'s Python around the packing (it splits the
        command's name and rebuilds the arguments, a few microseconds a call)."""
        if _PACK is None:
            self.conn.send_command(*command)
        else:
            self.conn.send_packed_command([_PACK(command)])

    def put_back(self) -> None:
        self.guard.close()
        self.pool.release(self.conn)

    def discard(self) -> None:
        """Close the connection (its state is unknown) and give it back, to reconnect."""
        self.guard.close()
        try:
            self.conn.disconnect()
        finally:
            self.pool.release(self.conn)


class AsyncRedisDedupStore(_RedisStore, AsyncDedupStore):
    """:class:`RedisDedupStore` on ``redis.asyncio`` (a URL, or a ``redis.asyncio.Redis``).
    Each call goes through the client: ``reuse_connection_for`` is for blocking stores."""

    _client_class = aredis.Redis

    async def _perform(self, effect: Script | Command) -> Any:
        """A script by its hash, straight from the client (without redis-py's
        ``Script.__call__``, whose pipeline check costs microseconds a call); on
        ``NOSCRIPT`` (a restarted or flushed server) the script loads it again."""
        if type(effect) is not Script:
            return await self._client.execute_command(effect.name, *effect.args)
        script = self._scripts[effect.name]
        try:
            return await self._client.evalsha(script.sha, len(effect.keys), *effect.keys,
                                              *effect.args)
        except NoScriptError:
            return await script(keys=effect.keys, args=effect.args)

    async def _run(self, flow: Flow[Any]) -> Any:
        try:
            async with within(self.statement_timeout):
                return await arun_flow(flow, self._perform)
        except TimeoutError as exc:
            raise self._failure(exc, True) from exc
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise self._failure(exc, False) from exc

    async def aclose(self) -> None:
        if self._owns:
            await self._client.aclose()
