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
clients alike, where its backend allows. Each call is bounded by the caller's ``timeout``
(a client passes what is left of the call's or the wait's deadline) and by the backend's
own timeout. A budget whose server (the SQLite file, Redis) cannot be reached, or does not
answer in time, raises :class:`~foxpoll.errors.BudgetUnavailable` (a ``StoreUnavailable``):
it **fails closed**, so no request goes out unmetered, unless it was built with
``fail_open=True``. Any other error of its backend (a Redis key of another type, a row it
cannot read) is a :class:`~foxpoll.errors.StoreError` naming the key.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import logging
import math
import os
import re
import sqlite3
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import attrs

from ._clock import Clock, SystemClock
from ._core import RETRY_AFTER_CEILING, check_timeout
from ._deadlines import within
from .dedup._sql import TableName
from .dedup._sqlite import closed, connect
from .errors import BudgetUnavailable, StoreError, is_redis_outage

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
#: The longest pause, in seconds, one ``throttled`` call imposes: a bound for a budget
#: called directly. A client caps what it reports with its ``max_retry_after`` first, which
#: may not exceed this, so that cap is the one that binds.
MAX_PAUSE = RETRY_AFTER_CEILING
#: The slowest rate a budget takes, in requests a minute: one a day. A slower one is a
#: mistake (a rate given per day, or per second in the wrong unit), and would make a
#: request wait for days.
MIN_PER_MINUTE = 1 / 1440
#: The fastest: a budget past ten million requests a minute meters nothing.
MAX_PER_MINUTE = 10_000_000.0
#: The largest burst, in permits.
MAX_BURST = 1_000_000

log = logging.getLogger("foxpoll.ratelimit")

T = TypeVar("T")


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


def _rate(_: object, attribute: attrs.Attribute[Any], value: float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            MIN_PER_MINUTE <= value <= MAX_PER_MINUTE):
        raise ValueError(f"{attribute.name} must be a number of requests a minute, from one "
                         f"a day ({MIN_PER_MINUTE:.6f}) to {MAX_PER_MINUTE:,.0f}, "
                         f"not {value!r}")


def _burst(_: object, attribute: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or not 1 <= value <= MAX_BURST):
        raise ValueError(f"{attribute.name} must be a whole number of permits, from 1 to "
                         f"{MAX_BURST:,}, not {value!r}")


def _flag(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{attribute.name} must be True or False, not {value!r}")


@attrs.frozen
class Settings:
    """A budget's configuration. See :class:`BaseRateLimit`."""

    per_minute: float | None = attrs.field(default=None, validator=_rate)
    burst: int | None = attrs.field(default=None, validator=_burst)
    adaptive: bool = attrs.field(default=False, validator=_flag)
    fail_open: bool = attrs.field(default=False, validator=_flag)

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

    @property
    def longest_wait(self) -> float:
        """The longest wait a permit can be told to take under these settings: the
        longest pause, then the whole burst at the floor's pace. A stored state asking
        for more (another host's clock far ahead, an edited row) is cut to it."""
        return MAX_PAUSE + self.lanes_burst / self.floor

    def applied(self, state: BudgetState) -> BudgetState:
        """``state`` under these settings: a fixed rate is always this one (a tier can
        change, and the stored state may be another process's); a learned one between
        this floor and this ceiling."""
        rate = min(max(state.rate, self.floor), self.ceiling) if self.learns else self.ceiling
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


def stored_state(values: Sequence[Any], where: str) -> BudgetState:
    """A budget's state as a backend stored it.

    Raises:
        StoreError: a value is not a finite number, or the rate not above zero (an edited
            or corrupted record): named by ``where``, never quoted.
    """
    try:
        tat, rate, paused, cut = (float(value) for value in values)
    except (TypeError, ValueError):
        raise StoreError(f"{where} holds a budget foxpoll cannot read") from None
    if not (all(math.isfinite(x) for x in (tat, rate, paused, cut)) and rate > 0):
        raise StoreError(f"{where} holds a budget foxpoll cannot read")
    return BudgetState(tat, rate, paused, cut)


class BaseRateLimit(abc.ABC):
    """A request budget. Subclasses keep the state; this class holds the rules.

    Args:
        per_minute: The key's limit; None learns it (see the module docs). From
            :data:`MIN_PER_MINUTE` (one a day) to :data:`MAX_PER_MINUTE`.
        burst: Permits that may go at once; half a second's worth by default.
        adaptive: Learn below ``per_minute`` from 429s (implied when it is None).
        fail_open: What a request does while the backend cannot be reached: False (the
            default) fails closed, the call raises :class:`BudgetUnavailable` and nothing
            is sent; True sends it unmetered, with one warning per outage. Closed is
            the default because a fleet whose shared budget is down would otherwise spend
            the key blindly, every process at once.

    Raises:
        BudgetUnavailable: from each call, when the backend's server cannot be reached or
            does not answer in time (unless ``fail_open``).
        StoreError: from each call, when the backend answers with an error, or holds a
            state it cannot read.
    """

    #: The backend's errors that mean its server was not reached, or not in time.
    _unreached: tuple[type[BaseException], ...] = ()
    #: Of the backend's other errors, which mean the same: its server is not serving now.
    _outage: Callable[[BaseException], bool] | None = None
    #: The backend's other errors: it was reached, and refused.
    _faults: tuple[type[BaseException], ...] = ()
    #: The longest one call of the backend may take, whatever the caller's timeout (None:
    #: the backend does no I/O).
    _own_timeout: float | None = None

    def __init__(self, per_minute: float | None = None, *, burst: int | None = None,
                 adaptive: bool = False, fail_open: bool = False) -> None:
        self.settings = Settings(per_minute, burst, adaptive, fail_open)
        self._lock = threading.Lock()
        self._successes = 0  # not yet told to a shared backend (learned rates only)
        self._failing = False  # failing open: warned once, until the backend answers
        self.waits = 0  #: acquire calls answered "not yet"
        self.throttles = 0  #: 429s reported
        self.unmetered = 0  #: requests let through unmetered while the backend was down
        self.last_state: BudgetState | None = None  #: as of the last call

    # -- what a backend provides ---------------------------------------------------------

    @abc.abstractmethod
    def _take(self, priority: int, successes: int, timeout: float | None
              ) -> tuple[BudgetState, float]:
        """Apply ``successes``, then :func:`take`, atomically, within ``timeout`` seconds
        (None: the backend's own bound); return state and wait."""

    @abc.abstractmethod
    def _throttle(self, pause: float, timeout: float | None) -> BudgetState:
        """Apply :func:`throttle` atomically, within ``timeout`` seconds."""

    async def _atake(self, priority: int, successes: int, timeout: float | None
                     ) -> tuple[BudgetState, float]:
        return await asyncio.to_thread(self._take, priority, successes, timeout)

    async def _athrottle(self, pause: float, timeout: float | None) -> BudgetState:
        return await asyncio.to_thread(self._throttle, pause, timeout)

    def _fault(self, exc: BaseException) -> str:
        """What a backend error of :attr:`_faults` says, for a message (never its text,
        which may quote a connection string)."""
        return type(exc).__name__

    # -- the budget ------------------------------------------------------------------------

    @property
    def fail_open(self) -> bool:
        """Whether a request goes unmetered while the backend cannot be reached."""
        return self.settings.fail_open

    @property
    def per_minute(self) -> float:
        """The rate now, in requests a minute (the learned one, when adaptive)."""
        state = self.last_state
        return 60.0 * (state.rate if state is not None else self.settings.ceiling)

    def _pending_successes(self) -> int:
        with self._lock:
            successes, self._successes = self._successes, 0
        return successes

    def _bound(self, timeout: float | None) -> float | None:
        """How long one backend call may take: the caller's ``timeout`` and the backend's
        own, whichever is shorter."""
        if timeout is not None:
            check_timeout(timeout)
        own = self._own_timeout
        if timeout is None or own is None:
            return own if timeout is None else timeout
        return min(timeout, own)

    def _record(self, state: BudgetState, wait: float) -> float:
        self.last_state = state
        if self._failing:
            self._failing = False
            log.warning("%s answers again: requests are metered again", type(self).__name__)
        if wait > 0:
            self.waits += 1
        return min(wait, self.settings.longest_wait)

    def _opened(self) -> None:
        """A request goes unmetered: the backend is down and the budget fails open."""
        self.unmetered += 1
        if not self._failing:
            self._failing = True
            log.warning("%s cannot be reached: requests go unmetered (fail_open) until it "
                        "answers", type(self).__name__)

    @contextmanager
    def _reaching(self) -> Iterator[None]:
        """Turn the backend's errors into :class:`BudgetUnavailable` (not reached, or not
        in time) or :class:`StoreError` (reached, and refused)."""
        name = type(self).__name__
        try:
            yield
        except (BudgetUnavailable, StoreError):
            raise
        except self._unreached as exc:
            raise BudgetUnavailable(f"{name} is unavailable: {type(exc).__name__}") from exc
        except self._faults as exc:
            if self._outage is not None and self._outage(exc):
                raise BudgetUnavailable(f"{name} is unavailable: {type(exc).__name__}"
                                        ) from exc
            raise StoreError(f"{name} failed: {self._fault(exc)}") from exc

    def acquire(self, priority: Priority = Priority.FRESH, *,
                timeout: float | None = None) -> float:
        """Take a permit: 0.0 when taken, else the seconds to wait before asking again.

        Args:
            priority: The request's lane.
            timeout: Seconds the call may take at most, besides the backend's own bound:
                what is left of the caller's deadline.
        """
        bound = self._bound(timeout)
        try:
            with self._reaching():
                state, wait = self._take(int(priority), self._pending_successes(), bound)
        except BudgetUnavailable:
            if not self.fail_open:
                raise
            self._opened()
            return 0.0
        return self._record(state, wait)

    async def aacquire(self, priority: Priority = Priority.FRESH, *,
                       timeout: float | None = None) -> float:
        """:meth:`acquire`, for asyncio."""
        bound = self._bound(timeout)
        try:
            with self._reaching():
                state, wait = await self._atake(int(priority), self._pending_successes(),
                                                bound)
        except BudgetUnavailable:
            if not self.fail_open:
                raise
            self._opened()
            return 0.0
        return self._record(state, wait)

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

    def throttled(self, retry_after: float | None, *, timeout: float | None = None) -> None:
        """A 429: pause every holder of this budget (and halve a learned rate).

        Args:
            retry_after: The pause in seconds, as the server asked (a client caps it with
                its ``max_retry_after`` first); 1 when None or not finite, at most
                :data:`MAX_PAUSE`.
            timeout: As for :meth:`acquire`.
        """
        bound = self._bound(timeout)
        try:
            with self._reaching():
                self.last_state = self._throttle(self._pause(retry_after), bound)
        except BudgetUnavailable:
            if not self.fail_open:
                raise
            self._opened()

    async def athrottled(self, retry_after: float | None, *,
                         timeout: float | None = None) -> None:
        """:meth:`throttled`, for asyncio."""
        bound = self._bound(timeout)
        try:
            with self._reaching():
                self.last_state = await self._athrottle(self._pause(retry_after), bound)
        except BudgetUnavailable:
            if not self.fail_open:
                raise
            self._opened()

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

    def _take(self, priority: int, successes: int, timeout: float | None
              ) -> tuple[BudgetState, float]:
        with self._state_lock:
            self._state, wait = self.settings.take(self._state, self._clock(), priority,
                                                   successes)
            return self._state, wait

    def _throttle(self, pause: float, timeout: float | None) -> BudgetState:
        with self._state_lock:
            self._state = self.settings.throttle(self._state, self._clock(), pause)
            return self._state

    async def _atake(self, priority: int, successes: int, timeout: float | None
                     ) -> tuple[BudgetState, float]:
        return self._take(priority, successes, timeout)  # no I/O: no thread needed

    async def _athrottle(self, pause: float, timeout: float | None) -> BudgetState:
        return self._throttle(pause, timeout)


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
        where: The database file (its own, or the dedup store's): a path, or
            ``sqlite:///PATH`` (``sqlite:////PATH`` for an absolute one).
        table: The budget table's name; each part a plain identifier or a double-quoted
            one.
        key: Which budget: one per API key (a row of the table).
        busy_timeout: Seconds one call waits for another process's (or thread's) lock
            before :class:`BudgetUnavailable`; a caller's shorter ``timeout`` (what is
            left of its deadline) cuts it.
        clock: The budget's time, read with ``clock.time()`` (wall clock: the file is
            shared by processes).

    Raises:
        StoreError: The path is a directory, or its directory does not exist.
        BudgetUnavailable: The file could not be opened otherwise (locked, unreadable).
    """

    # Locked, busy, the disk, the file's access. Not a closed connection: a call after
    # close() is the program's mistake (StoreError), which waiting would not cure.
    _unreached = (sqlite3.OperationalError,)
    _faults = (sqlite3.Error,)  # not a database, or a malformed one

    def __init__(self, where: str | os.PathLike[str], per_minute: float | None = None, *,
                 burst: int | None = None, adaptive: bool = False, fail_open: bool = False,
                 table: str = "foxpoll_rate_limit", key: str = "default",
                 busy_timeout: float = 30.0, clock: Clock | None = None) -> None:
        super().__init__(per_minute, burst=burst, adaptive=adaptive, fail_open=fail_open)
        self._own_timeout = self.busy_timeout = check_timeout(busy_timeout, "busy_timeout")
        name = TableName.parse(table).qualified  # checked and quoted: safe in statements
        self._where = f"SQLiteRateLimit's row {key!r} of {name}"
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
        self._busy = busy_timeout  # the connection's busy timeout now
        self._closed = False
        with self._reaching():
            self._db = connect(where, busy_timeout=busy_timeout)
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=OFF")
                self._db.execute(self._schema)
            except BaseException:
                self._db.close()  # a budget that failed to open holds nothing open
                raise

    def _wait_for_lock(self, seconds: float) -> None:
        """Have the next statement wait at most ``seconds`` for a lock held elsewhere
        (SQLite's busy timeout, in whole milliseconds, at least one)."""
        if seconds != self._busy:
            self._db.execute(f"PRAGMA busy_timeout = {max(1, math.ceil(seconds * 1000))}")
            self._busy = seconds

    def _update(self, change: Callable[[BudgetState, float], tuple[BudgetState, float]],
                timeout: float | None) -> tuple[BudgetState, float]:
        bound = self.busy_timeout if timeout is None else timeout
        deadline = time.monotonic() + bound
        # Another thread of this process may hold the connection for its whole busy wait.
        if not self._db_lock.acquire(timeout=bound):
            raise BudgetUnavailable(f"SQLiteRateLimit is unavailable: busy in this process "
                                    f"for {bound:g} s")
        try:
            if self._closed:
                raise closed("this SQLiteRateLimit")
            self._wait_for_lock(max(deadline - time.monotonic(), 1e-3))
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(self._select, (self.key,)).fetchone()
                state = stored_state(row, self._where) if row else self.settings.fresh()
                new, wait = change(state, self._clock())
                if new != state:
                    self._db.execute(self._upsert, (self.key, new.tat, new.rate,
                                                    new.paused_until, new.cut_until))
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return new, wait
        finally:
            self._db_lock.release()

    def _take(self, priority: int, successes: int, timeout: float | None
              ) -> tuple[BudgetState, float]:
        return self._update(lambda state, now: self.settings.take(state, now, priority,
                                                                  successes), timeout)

    def _throttle(self, pause: float, timeout: float | None) -> BudgetState:
        return self._update(lambda state, now: (
            self.settings.throttle(state, now, pause), 0.0), timeout)[0]

    def close(self) -> None:
        """Close the database connection; a later call raises :class:`StoreError`."""
        with self._db_lock:
            self._closed = True
            self._db.close()


# The same rules as take(), grow() and throttle(), in Lua, on Redis's clock. A budget
# idle for an hour is forgotten (it would be full again anyway). A field that is not a
# finite number (an edited or corrupted hash) is an error reply, not a rate of nan.
_REDIS_READ = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local s = redis.call('HMGET', KEYS[1], 'tat', 'rate', 'paused', 'cut')
local function field(i, default)
  if not s[i] then return default end
  local n = tonumber(s[i])
  if n == nil or n ~= n or n == math.huge or n == -math.huge then
    error({err = 'CORRUPT the budget holds a field that is not a number'})
  end
  return n
end
"""

_REDIS_TAKE = _REDIS_READ + """
local ceiling, floor = tonumber(ARGV[4]), tonumber(ARGV[7])
local tat, rate = field(1, 0), field(2, ceiling)
local paused, cut = field(3, 0), field(4, 0)
if ARGV[6] == '1' then rate = math.max(floor, math.min(rate, ceiling)) else rate = ceiling end
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

_REDIS_THROTTLE = _REDIS_READ + """
local floor = tonumber(ARGV[4])
local tat, rate = field(1, 0), math.max(floor, field(2, tonumber(ARGV[3])))
local paused, cut = field(3, 0), field(4, 0)
local pause = tonumber(ARGV[1])
if ARGV[2] == '1' and now >= cut then
    rate = math.max(floor, rate / 2)
    cut = now + math.max(pause, tonumber(ARGV[5]))
end
paused = math.max(paused, now + pause)
tat = math.max(tat, paused)
redis.call('HSET', KEYS[1], 'tat', tostring(tat), 'rate', tostring(rate),
           'paused', tostring(paused), 'cut', tostring(cut))
redis.call('EXPIRE', KEYS[1], 3600)
return {tostring(tat), tostring(rate), tostring(paused), tostring(cut), '0'}
"""


def _in_thread(fn: Callable[[], T], seconds: float, what: str) -> T:
    """``fn()`` on a daemon thread of its own, waited for at most ``seconds``.

    A blocking Redis client bounds each read by its socket timeout, once per try of its
    retry policy (redis-py's default client retries ten times): nothing bounds a whole
    call, and no per-call timeout can be given to it. Past ``seconds`` the caller raises
    :class:`BudgetUnavailable` and leaves the thread to end by itself (a client without a
    socket timeout is refused, so it does). A daemon thread, never a pool: a worker stuck
    on a frozen network must hold neither the next call nor the interpreter's exit.
    """
    done = threading.Event()
    outcome: list[tuple[bool, Any]] = []

    def work() -> None:
        try:
            outcome.append((True, fn()))
        except BaseException as exc:  # handed to the caller, who raises it
            outcome.append((False, exc))
        finally:
            done.set()

    threading.Thread(target=work, name="foxpoll-budget", daemon=True).start()
    if not done.wait(seconds):
        raise BudgetUnavailable(f"{what} did not answer within {seconds:g} s")
    ok, value = outcome[0]
    if ok:
        result: T = value
        return result
    raise value


class RedisRateLimit(BaseRateLimit):
    """A budget shared by a fleet on many machines, in one Redis hash.

    Takes :class:`BaseRateLimit`'s arguments, and:

    Args:
        where: A ``redis://`` URL (sync and async clients are made from it, so one object
            serves ``FoxReload`` and ``AsyncFoxReload``, and :meth:`aclose` closes both;
            see :meth:`close`), or your ``redis.Redis`` / ``redis.asyncio.Redis``
            (then only that kind of client), never closed by the budget. A
            ``redis.Redis`` of yours needs a ``socket_timeout``: without one, nothing
            would end a call on a frozen network (:class:`ValueError`).
        key_prefix: The budget's hash is ``{key_prefix}rate-limit``: one prefix per API key.
        connect_timeout: Seconds to connect, for clients made from a URL.
        statement_timeout: Seconds one call may take, whatever the client (yours
            included, retries and all); a caller's shorter ``timeout`` (what is left of
            its deadline) cuts it. Clients made from a URL also get it as their socket
            timeout, and no retries.
    """

    def __init__(self, where: Any, per_minute: float | None = None, *,
                 burst: int | None = None, adaptive: bool = False, fail_open: bool = False,
                 key_prefix: str = "foxpoll:", connect_timeout: float = 5.0,
                 statement_timeout: float = 5.0) -> None:
        super().__init__(per_minute, burst=burst, adaptive=adaptive, fail_open=fail_open)
        try:
            import redis
            import redis.asyncio
            import redis.asyncio.retry
            import redis.retry
            from redis.backoff import NoBackoff
        except ImportError as exc:  # pragma: no cover - only without the extra
            raise ImportError("RedisRateLimit needs redis: pip install 'foxpoll[redis]'") from exc
        from .dedup.redis import check_client, is_asyncio_client

        self.statement_timeout = check_timeout(statement_timeout, "statement_timeout")
        self.connect_timeout = check_timeout(connect_timeout, "connect_timeout")
        self._own_timeout = self.statement_timeout
        self.key = f"{key_prefix}rate-limit"
        # Not reached, not in time (TimeoutError: the budget's own deadline on asyncio),
        # or not serving now (a replica after a failover, out of memory...).
        self._unreached = (redis.ConnectionError, redis.TimeoutError, TimeoutError)
        self._outage = is_redis_outage
        self._faults = (redis.RedisError,)
        clients: dict[str, Any] = {}
        self._owns = isinstance(where, str)
        if isinstance(where, str):
            # A permit must not wait on a frozen network; a retry would wait it out again.
            clients = {kind: factory.from_url(where, socket_timeout=statement_timeout,
                                              socket_connect_timeout=connect_timeout,
                                              retry=retry(NoBackoff(), 0))
                       for kind, factory, retry in (
                           ("sync", redis.Redis, redis.retry.Retry),
                           ("async", redis.asyncio.Redis, redis.asyncio.retry.Retry))}
        else:
            asynchronous = is_asyncio_client(where)
            check_client(where, "RedisRateLimit", asynchronous=asynchronous,
                         bounded=not asynchronous, why="a budget call left waiting on a "
                         "frozen network would never end")
            clients = {"async" if asynchronous else "sync": where}
        self._clients = clients
        # The loop the budget's own asyncio client was first used on: its connections
        # belong to that loop, and only a coroutine run on it can close them.
        self._async_loop: asyncio.AbstractEventLoop | None = None
        # EVALSHA, falling back to EVAL once per connection's script cache.
        self._scripts = {(kind, name): client.register_script(source)
                         for kind, client in clients.items()
                         for name, source in (("take", _REDIS_TAKE),
                                              ("throttle", _REDIS_THROTTLE))}

    def close(self) -> None:
        """Close the budget's own blocking client (a client you passed in stays open).

        Its own asyncio client, once used, belongs to that event loop, and only a
        coroutine on it can close it: close a budget used from asyncio with
        :meth:`aclose` (or ``async with``), on that loop. ``close()`` closes that client
        too only while its loop is idle (neither running nor closed); otherwise it
        leaves it open and warns (:class:`ResourceWarning`).
        """
        if not self._owns:
            return
        self._clients["sync"].close()
        loop, self._async_loop = self._async_loop, None
        if loop is None:  # never used: it holds no connection
            return
        if not loop.is_running() and not loop.is_closed():
            loop.run_until_complete(self._clients["async"].aclose())
            return
        warnings.warn("RedisRateLimit.close() cannot close the asyncio client the budget "
                      "used on a running or closed event loop: close it with aclose() "
                      "(or async with) on that loop", ResourceWarning, stacklevel=2)

    async def aclose(self) -> None:
        """Close the budget's own clients, both kinds (a client you passed in stays
        open)."""
        if self._owns:
            self._async_loop = None  # closed here: close() below has nothing more to do
            await self._clients["async"].aclose()
        self.close()

    def _fault(self, exc: BaseException) -> str:
        # Redis's error code (WRONGTYPE, CORRUPT, OOM, ...), never the rest of its text.
        code = re.match(r"[A-Z]+\b", str(exc))
        return f"key {self.key!r}: {code.group() if code else type(exc).__name__}"

    def _script(self, kind: str, name: str) -> Any:
        script = self._scripts.get((kind, name))
        if script is None:
            raise TypeError(f"this RedisRateLimit was given no {kind} Redis client: "
                            "give it a URL to serve both")
        return script

    def _take_args(self, priority: int, successes: int) -> list[Any]:
        s = self.settings
        return [s.lanes_burst, priority, successes, s.ceiling, GROWTH, int(s.learns),
                s.floor]

    def _throttle_args(self, pause: float) -> list[Any]:
        s = self.settings
        return [pause, int(s.learns), s.ceiling, s.floor, CUT_WINDOW]

    def _parse(self, reply: list[Any]) -> tuple[BudgetState, float]:
        where = f"RedisRateLimit's key {self.key!r}"
        if not isinstance(reply, list) or len(reply) != 5:
            raise StoreError(f"{where} answered a reply that is not a budget")
        try:
            wait = float(reply[4])
        except (TypeError, ValueError):
            raise StoreError(f"{where} holds a budget foxpoll cannot read") from None
        state = stored_state(reply[:4], where)
        if not math.isfinite(wait):
            raise StoreError(f"{where} holds a budget foxpoll cannot read")
        return state, wait

    def _call(self, name: str, args: list[Any], timeout: float | None) -> list[Any]:
        script = self._script("sync", name)
        bound = self.statement_timeout if timeout is None else timeout
        reply: list[Any] = _in_thread(lambda: script(keys=[self.key], args=args), bound,
                                      "RedisRateLimit")
        return reply

    async def _acall(self, name: str, args: list[Any], timeout: float | None) -> list[Any]:
        script = self._script("async", name)
        if self._owns and self._async_loop is None:
            self._async_loop = asyncio.get_running_loop()
        bound = self.statement_timeout if timeout is None else timeout
        async with within(bound):  # any client: redis-py drops a cancelled call's connection
            reply: list[Any] = await script(keys=[self.key], args=args)
        return reply

    def _take(self, priority: int, successes: int, timeout: float | None
              ) -> tuple[BudgetState, float]:
        return self._parse(self._call("take", self._take_args(priority, successes), timeout))

    async def _atake(self, priority: int, successes: int, timeout: float | None
                     ) -> tuple[BudgetState, float]:
        return self._parse(await self._acall("take", self._take_args(priority, successes),
                                             timeout))

    def _throttle(self, pause: float, timeout: float | None) -> BudgetState:
        return self._parse(self._call("throttle", self._throttle_args(pause), timeout))[0]

    async def _athrottle(self, pause: float, timeout: float | None) -> BudgetState:
        return self._parse(await self._acall("throttle", self._throttle_args(pause),
                                             timeout))[0]
