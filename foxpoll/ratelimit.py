"""One API key's request budget, shared by every request of every process that uses it.

FoxReload meters each key (100 requests a minute on the standard tier, 1,000 on
enterprise) and answers 429 past it. A client given ``rate_limit=`` takes one permit
before each request it sends: creates, payments, reads, polls, recovery re-checks.

The algorithm is GCRA (a token bucket kept as one number, the *theoretical arrival time*
``tat``), with **priority lanes in the same bucket**: a request of lane ``p`` may go when
``now >= tat - tau_p``, where ``tau_p = (burst - 1 - p) * interval``. Buys
(:attr:`Priority.BUY`) may use the whole burst; the first poll of a fresh order one permit
less; later polls two less. So when permits are short, polls wait while a buy still finds
one: the order holds across processes, because they share one ``tat``.

With ``per_minute=None`` (or ``adaptive=True``) the rate is learned (AIMD): it starts at
the ceiling; a 429 pauses every holder of the budget for the ``Retry-After`` and halves
the rate, at most once per two seconds (one storm of 429s is one signal); each success
wins back 1/400 of the ceiling. The client caps the ``Retry-After`` it reports with its
``max_retry_after``; a budget called directly caps it at :data:`MAX_PAUSE`. Backends:

=====================  ============================================  =====================
``RateLimit``          one process (threads and tasks)               a lock
``SQLiteRateLimit``    the processes of one host                     a row, BEGIN IMMEDIATE
``RedisRateLimit``     a fleet on many machines                      a Lua script, ``TIME``
=====================  ============================================  =====================

Each has ``acquire`` / ``aacquire`` (take a permit or say how long to wait) and
``throttled`` / ``athrottled`` (a 429 was seen); one object may serve sync and async
clients alike, where its backend allows. A budget whose server (the SQLite file, Redis)
cannot be reached, or does not answer in time, raises
:class:`~foxpoll.errors.StoreUnavailable`.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import math
import os
import sqlite3
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, TypeVar

import attrs

from ._clock import Clock, SystemClock
from .dedup._sql import TableName
from .errors import unavailable_on

__all__ = [
    "BaseRateLimit",
    "BudgetState",
    "Priority",
    "RateLimit",
    "RedisRateLimit",
    "SQLiteRateLimit",
]

#: Where a learned rate starts when no ``per_minute`` is given: the enterprise tier, a
#: little over, so the first 429 says where the real limit is.
ADAPTIVE_CEILING = 1200.0
GROWTH = 1 / 400  # of the ceiling, per success, for a learned rate
CUT_WINDOW = 2.0  # seconds: the 429s within one window after a cut are one signal
#: The longest pause, in seconds, one ``throttled`` call imposes. Only a sanity bound, for
#: a budget called directly: a client caps what it reports with its ``max_retry_after``
#: first, so a ``max_retry_after`` above this still pauses the budget for this at most.
MAX_PAUSE = 3600.0


class Priority(enum.IntEnum):
    """A request's lane; a lower value goes first when permits are short."""

    BUY = 0  #: create and pay: a customer is waiting
    FRESH = 1  #: the first poll of an order, and reads a caller asked for
    POLL = 2  #: later polls and recovery re-checks: they can wait


@attrs.frozen
class BudgetState:
    """The shared state of one budget (times in the backend's seconds).

    Attributes:
        tat: The theoretical arrival time: when the bucket is empty again.
        rate: Permits per second now (below the ceiling after 429s, when adaptive).
        paused_until: No permit before this (a 429's ``Retry-After``).
        cut_until: A learned rate is not halved again before this.
    """

    tat: float
    rate: float
    paused_until: float
    cut_until: float = 0.0


def take(state: BudgetState, now: float, priority: int, burst: int
         ) -> tuple[BudgetState, float]:
    """GCRA with lanes: the new state and 0.0, or the state unchanged and the seconds to
    wait before asking again."""
    if now < state.paused_until:
        return state, state.paused_until - now
    interval = 1.0 / state.rate
    allow_at = state.tat - (burst - 1 - priority) * interval
    if now < allow_at:
        return state, allow_at - now
    return attrs.evolve(state, tat=max(state.tat, now) + interval), 0.0


def grow(state: BudgetState, successes: int, ceiling: float) -> BudgetState:
    """A learned rate after ``successes`` more answers that were not 429."""
    if successes <= 0 or state.rate >= ceiling:
        return state
    return attrs.evolve(state, rate=min(ceiling, state.rate + successes * GROWTH * ceiling))


def throttle(state: BudgetState, now: float, pause: float, *, adaptive: bool,
             floor: float) -> BudgetState:
    """A 429: pause everyone for ``pause`` seconds; halve a learned rate, once per cut
    window (the other answers of the same storm only extend the pause)."""
    rate, cut_until = state.rate, state.cut_until
    if adaptive and now >= cut_until:
        rate = max(floor, rate / 2)
        cut_until = now + max(pause, CUT_WINDOW)
    paused = max(state.paused_until, now + pause)
    return BudgetState(tat=max(state.tat, paused), rate=rate, paused_until=paused,
                       cut_until=cut_until)


def _positive(_: object, attribute: attrs.Attribute[Any], value: float | None) -> None:
    if value is not None and not (0 < value < math.inf):
        raise ValueError(f"{attribute.name} must be a positive number, not {value!r}")


@attrs.frozen
class Settings:
    """A budget's configuration. See :class:`BaseRateLimit`."""

    per_minute: float | None = attrs.field(default=None, validator=_positive)
    burst: int | None = None
    adaptive: bool = False

    def __attrs_post_init__(self) -> None:
        if self.burst is not None and (isinstance(self.burst, bool) or self.burst < 1):
            raise ValueError("burst must be a whole number of permits, at least 1")

    @property
    def learns(self) -> bool:
        return self.adaptive or self.per_minute is None

    @property
    def ceiling(self) -> float:
        """Permits per second at most."""
        return (self.per_minute or ADAPTIVE_CEILING) / 60.0

    @property
    def floor(self) -> float:
        return self.ceiling / 16

    @property
    def lanes_burst(self) -> int:
        """The burst, in permits: half a second's worth by default, so that requests
        delayed on their way (a busy machine, a slow network) and arriving together still
        fit a server's bucket of a second's worth; and at least one more than there are
        lanes below buys, so every lane has room."""
        if self.burst is not None:
            return self.burst
        return max(len(Priority), round(self.ceiling / 2))

    def applied(self, state: BudgetState) -> BudgetState:
        """``state`` under these settings: a fixed rate is always this one (a tier can
        change, and the stored state may be another process's); a learned one never
        above this ceiling."""
        rate = min(state.rate, self.ceiling) if self.learns else self.ceiling
        return state if rate == state.rate else attrs.evolve(state, rate=rate)

    def take(self, state: BudgetState, now: float, priority: int, successes: int
             ) -> tuple[BudgetState, float]:
        """:func:`take` on ``state`` as these settings see it, after ``successes``."""
        return take(grow(self.applied(state), successes, self.ceiling), now, priority,
                    self.lanes_burst)

    def throttle(self, state: BudgetState, now: float, pause: float) -> BudgetState:
        """:func:`throttle` with these settings."""
        return throttle(state, now, pause, adaptive=self.learns, floor=self.floor)

    def fresh(self) -> BudgetState:
        return BudgetState(tat=0.0, rate=self.ceiling, paused_until=0.0, cut_until=0.0)


_B = TypeVar("_B", bound="BaseRateLimit")


class BaseRateLimit(abc.ABC):
    """A request budget. Subclasses keep the state; this class holds the rules.

    Args:
        per_minute: The key's limit; None learns it (see the module docs).
        burst: Permits that may go at once; half a second's worth by default.
        adaptive: Learn below ``per_minute`` from 429s (implied when it is None).

    Raises:
        StoreUnavailable: from each call, when the backend's server cannot be reached or
            does not answer in time.
    """

    #: The backend's errors that mean its server was not reached, or not in time.
    _unreached: tuple[type[BaseException], ...] = ()

    def __init__(self, per_minute: float | None = None, *, burst: int | None = None,
                 adaptive: bool = False) -> None:
        self.settings = Settings(per_minute, burst, adaptive)
        self._lock = threading.Lock()
        self._successes = 0  # not yet told to a shared backend (learned rates only)
        self.waits = 0  #: acquire calls answered "not yet"
        self.throttles = 0  #: 429s reported
        self.last_state: BudgetState | None = None  #: as of the last call

    # -- what a backend provides ---------------------------------------------------------

    @abc.abstractmethod
    def _take(self, priority: int, successes: int) -> tuple[BudgetState, float]:
        """Apply ``successes``, then :func:`take`, atomically; return state and wait."""

    @abc.abstractmethod
    def _throttle(self, pause: float) -> BudgetState:
        """Apply :func:`throttle` atomically."""

    async def _atake(self, priority: int, successes: int) -> tuple[BudgetState, float]:
        return await asyncio.to_thread(self._take, priority, successes)

    async def _athrottle(self, pause: float) -> BudgetState:
        return await asyncio.to_thread(self._throttle, pause)

    # -- the budget ------------------------------------------------------------------------

    @property
    def per_minute(self) -> float:
        """The rate now, in requests a minute (the learned one, when adaptive)."""
        state = self.last_state
        return 60.0 * (state.rate if state is not None else self.settings.ceiling)

    def _pending_successes(self) -> int:
        with self._lock:
            successes, self._successes = self._successes, 0
        return successes

    def _record(self, state: BudgetState, wait: float) -> float:
        self.last_state = state
        if wait > 0:
            self.waits += 1
        return wait

    def _reaching(self) -> AbstractContextManager[None]:
        return unavailable_on(type(self).__name__, *self._unreached)

    def acquire(self, priority: Priority = Priority.FRESH) -> float:
        """Take a permit: 0.0 when taken, else the seconds to wait before asking again."""
        with self._reaching():
            return self._record(*self._take(int(priority), self._pending_successes()))

    async def aacquire(self, priority: Priority = Priority.FRESH) -> float:
        """:meth:`acquire`, for asyncio."""
        with self._reaching():
            return self._record(*await self._atake(int(priority), self._pending_successes()))

    def succeeded(self) -> None:
        """An answer that was not 429: a learned rate grows a little (told with the next
        :meth:`acquire`, so it costs no round trip)."""
        if self.settings.learns:
            with self._lock:
                self._successes += 1

    def _pause(self, retry_after: float | None) -> float:
        self.throttles += 1
        asked = 1.0 if retry_after is None or not math.isfinite(retry_after) else retry_after
        return min(max(asked, 0.0), MAX_PAUSE)

    def throttled(self, retry_after: float | None) -> None:
        """A 429: pause every holder of this budget (and halve a learned rate).

        Args:
            retry_after: The pause in seconds, as the server asked (a client caps it with
                its ``max_retry_after`` first); 1 when None or not finite, at most
                :data:`MAX_PAUSE`.
        """
        with self._reaching():
            self.last_state = self._throttle(self._pause(retry_after))

    async def athrottled(self, retry_after: float | None) -> None:
        """:meth:`throttled`, for asyncio."""
        with self._reaching():
            self.last_state = await self._athrottle(self._pause(retry_after))

    def close(self) -> None:  # noqa: B027 - only some backends hold connections
        """Release what the budget holds open (its state stays where it is)."""

    async def aclose(self) -> None:
        """:meth:`close`, for what asyncio callers opened."""
        self.close()

    def __enter__(self: _B) -> _B:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self: _B) -> _B:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        limit = self.settings.per_minute
        kind = "learned" if self.settings.learns else "fixed"
        return f"{type(self).__name__}(per_minute={limit}, {kind}, now={self.per_minute:.0f}/min)"


class RateLimit(BaseRateLimit):
    """A budget in this process: thread- and task-safe, no I/O.

    Takes :class:`BaseRateLimit`'s arguments, and:

    Args:
        clock: The budget's time, read with ``clock.monotonic()``; the client's clock (a
            ``FakeClock`` in tests) must be the same one.
    """

    def __init__(self, per_minute: float | None = None, *, burst: int | None = None,
                 adaptive: bool = False, clock: Clock | None = None) -> None:
        super().__init__(per_minute, burst=burst, adaptive=adaptive)
        self._clock = (clock or SystemClock()).monotonic
        self._state = self.settings.fresh()
        self._state_lock = threading.Lock()

    def _take(self, priority: int, successes: int) -> tuple[BudgetState, float]:
        with self._state_lock:
            self._state, wait = self.settings.take(self._state, self._clock(), priority,
                                                   successes)
            return self._state, wait

    def _throttle(self, pause: float) -> BudgetState:
        with self._state_lock:
            self._state = self.settings.throttle(self._state, self._clock(), pause)
            return self._state

    async def _atake(self, priority: int, successes: int) -> tuple[BudgetState, float]:
        return self._take(priority, successes)  # no I/O: no thread needed

    async def _athrottle(self, pause: float) -> BudgetState:
        return self._throttle(pause)


_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS {table} (
    key TEXT PRIMARY KEY, tat REAL NOT NULL, rate REAL NOT NULL, paused_until REAL NOT NULL,
    cut_until REAL NOT NULL
)"""


class SQLiteRateLimit(BaseRateLimit):
    """A budget shared by the processes of one host, in a SQLite file.

    Each call is one ``BEGIN IMMEDIATE`` transaction; the budget is not worth an fsync,
    so the file is written with ``synchronous=OFF`` (a crash loses at most the last few
    permits' bookkeeping). Times are this host's wall clock.

    Takes :class:`BaseRateLimit`'s arguments, and:

    Args:
        where: The database file (its own, or the dedup store's).
        table: The budget table's name; each part a plain identifier or a double-quoted
            one.
        key: Which budget: one per API key (a row of the table).
        busy_timeout: Seconds to wait for another process's lock before
            :class:`StoreUnavailable`.
        clock: The budget's time, read with ``clock.time()`` (wall clock: the file is
            shared by processes).
    """

    _unreached = (sqlite3.Error,)

    def __init__(self, where: str | os.PathLike[str], per_minute: float | None = None, *,
                 burst: int | None = None, adaptive: bool = False,
                 table: str = "foxpoll_rate_limit", key: str = "default",
                 busy_timeout: float = 30.0, clock: Clock | None = None) -> None:
        super().__init__(per_minute, burst=burst, adaptive=adaptive)
        name = TableName.parse(table).qualified  # checked and quoted: safe in statements
        self._schema = _SQLITE_SCHEMA.format(table=name)
        self._select = (f"SELECT tat, rate, paused_until, cut_until FROM {name} "  # noqa: S608
                        "WHERE key = ?")
        self._upsert = (
            f"INSERT INTO {name} (key, tat, rate, paused_until, cut_until) "  # noqa: S608
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET tat = excluded.tat, "
            "rate = excluded.rate, paused_until = excluded.paused_until, "
            "cut_until = excluded.cut_until")
        self.key = key
        self._clock = (clock or SystemClock()).time
        self._db_lock = threading.Lock()
        with self._reaching():
            self._db = sqlite3.connect(os.fspath(where), timeout=busy_timeout,
                                       isolation_level=None,
                                       check_same_thread=False)
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=OFF")
                self._db.execute(self._schema)
            except BaseException:
                self._db.close()  # a budget that failed to open holds nothing open
                raise

    def _update(self, change: Callable[[BudgetState, float], tuple[BudgetState, float]]
                ) -> tuple[BudgetState, float]:
        with self._db_lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(self._select, (self.key,)).fetchone()
                state = BudgetState(*row) if row else self.settings.fresh()
                new, wait = change(state, self._clock())
                if new != state:
                    self._db.execute(self._upsert, (self.key, new.tat, new.rate,
                                                    new.paused_until, new.cut_until))
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return new, wait

    def _take(self, priority: int, successes: int) -> tuple[BudgetState, float]:
        return self._update(lambda state, now: self.settings.take(state, now, priority,
                                                                  successes))

    def _throttle(self, pause: float) -> BudgetState:
        return self._update(lambda state, now: (
            self.settings.throttle(state, now, pause), 0.0))[0]

    def close(self) -> None:
        with self._db_lock:
            self._db.close()


# The same rules as take(), grow() and throttle(), in Lua, on Redis's clock. A budget
# idle for an hour is forgotten (it would be full again anyway).
_REDIS_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local s = redis.call('HMGET', KEYS[1], 'tat', 'rate', 'paused', 'cut')
local ceiling = tonumber(ARGV[4])
local tat, rate = tonumber(s[1]) or 0, tonumber(s[2]) or ceiling
local paused, cut = tonumber(s[3]) or 0, tonumber(s[4]) or 0
if ARGV[6] == '1' then rate = math.min(rate, ceiling) else rate = ceiling end
local successes = tonumber(ARGV[3])
if successes > 0 and rate < ceiling then
    rate = math.min(ceiling, rate + successes * tonumber(ARGV[5]) * ceiling)
end
local wait = 0
if now < paused then
    wait = paused - now
else
    local interval = 1 / rate
    local allow_at = tat - (tonumber(ARGV[1]) - 1 - tonumber(ARGV[2])) * interval
    if now < allow_at then wait = allow_at - now else tat = math.max(tat, now) + interval end
end
redis.call('HSET', KEYS[1], 'tat', tostring(tat), 'rate', tostring(rate),
           'paused', tostring(paused), 'cut', tostring(cut))
redis.call('EXPIRE', KEYS[1], 3600)
return {tostring(tat), tostring(rate), tostring(paused), tostring(cut), tostring(wait)}
"""

_REDIS_THROTTLE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local s = redis.call('HMGET', KEYS[1], 'tat', 'rate', 'paused', 'cut')
local tat, rate = tonumber(s[1]) or 0, tonumber(s[2]) or tonumber(ARGV[3])
local paused, cut = tonumber(s[3]) or 0, tonumber(s[4]) or 0
local pause = tonumber(ARGV[1])
if ARGV[2] == '1' and now >= cut then
    rate = math.max(tonumber(ARGV[4]), rate / 2)
    cut = now + math.max(pause, tonumber(ARGV[5]))
end
paused = math.max(paused, now + pause)
tat = math.max(tat, paused)
redis.call('HSET', KEYS[1], 'tat', tostring(tat), 'rate', tostring(rate),
           'paused', tostring(paused), 'cut', tostring(cut))
redis.call('EXPIRE', KEYS[1], 3600)
return {tostring(tat), tostring(rate), tostring(paused), tostring(cut), '0'}
"""


class RedisRateLimit(BaseRateLimit):
    """A budget shared by a fleet on many machines, in one Redis hash.

    Takes :class:`BaseRateLimit`'s arguments, and:

    Args:
        where: A ``redis://`` URL (sync and async clients are made from it, so one object
            serves ``FoxReload`` and ``AsyncFoxReload``, and :meth:`close` /
            :meth:`aclose` close them), or your ``redis.Redis`` / ``redis.asyncio.Redis``
            (then only that kind of client), never closed by the budget.
        key_prefix: The budget's hash is ``{key_prefix}rate-limit``: one prefix per API key.
        connect_timeout: Seconds to connect, for clients made from a URL.
        statement_timeout: Seconds one call may wait for Redis's reply, for clients made
            from a URL (a client of yours is bounded by its own ``socket_timeout``).
    """

    def __init__(self, where: Any, per_minute: float | None = None, *,
                 burst: int | None = None, adaptive: bool = False,
                 key_prefix: str = "foxpoll:", connect_timeout: float = 5.0,
                 statement_timeout: float = 5.0) -> None:
        super().__init__(per_minute, burst=burst, adaptive=adaptive)
        try:
            import redis
            import redis.asyncio
        except ImportError as exc:  # pragma: no cover - only without the extra
            raise ImportError("RedisRateLimit needs redis: pip install 'foxpoll[redis]'") from exc
        self.key = f"{key_prefix}rate-limit"
        self._unreached = (redis.ConnectionError, redis.TimeoutError)
        clients: dict[str, Any] = {}
        self._owns = isinstance(where, str)
        if isinstance(where, str):
            # A permit must not wait on a frozen network.
            clients = {kind: factory.from_url(where, socket_timeout=statement_timeout,
                                              socket_connect_timeout=connect_timeout)
                       for kind, factory in (("sync", redis.Redis),
                                             ("async", redis.asyncio.Redis))}
        elif isinstance(where, redis.asyncio.Redis):
            clients = {"async": where}
        else:
            clients = {"sync": where}
        self._clients = clients
        # EVALSHA, falling back to EVAL once per connection's script cache.
        self._scripts = {(kind, name): client.register_script(source)
                         for kind, client in clients.items()
                         for name, source in (("take", _REDIS_TAKE),
                                              ("throttle", _REDIS_THROTTLE))}

    def close(self) -> None:
        if self._owns:
            self._clients["sync"].close()

    async def aclose(self) -> None:
        if self._owns:
            await self._clients["async"].aclose()
        self.close()

    def _script(self, kind: str, name: str) -> Any:
        script = self._scripts.get((kind, name))
        if script is None:
            raise TypeError(f"this RedisRateLimit was given no {kind} Redis client: "
                            "give it a URL to serve both")
        return script

    def _take_args(self, priority: int, successes: int) -> list[Any]:
        s = self.settings
        return [s.lanes_burst, priority, successes, s.ceiling, GROWTH, int(s.learns)]

    def _throttle_args(self, pause: float) -> list[Any]:
        s = self.settings
        return [pause, int(s.learns), s.ceiling, s.floor, CUT_WINDOW]

    @staticmethod
    def _parse(reply: list[Any]) -> tuple[BudgetState, float]:
        tat, rate, paused, cut, wait = (float(x) for x in reply)
        return BudgetState(tat, rate, paused, cut), wait

    def _take(self, priority: int, successes: int) -> tuple[BudgetState, float]:
        script = self._script("sync", "take")
        return self._parse(script(keys=[self.key], args=self._take_args(priority, successes)))

    async def _atake(self, priority: int, successes: int) -> tuple[BudgetState, float]:
        script = self._script("async", "take")
        reply = await script(keys=[self.key], args=self._take_args(priority, successes))
        return self._parse(reply)

    def _throttle(self, pause: float) -> BudgetState:
        script = self._script("sync", "throttle")
        return self._parse(script(keys=[self.key], args=self._throttle_args(pause)))[0]

    async def _athrottle(self, pause: float) -> BudgetState:
        script = self._script("async", "throttle")
        return self._parse(await script(keys=[self.key], args=self._throttle_args(pause)))[0]
