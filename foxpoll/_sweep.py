"""The order-history sweep: one listing of pending orders, read as hints by ``wait_many``.

When many orders are in flight, a page of ``GET /api/orders/?status=processing`` (and
``paid``) shows which of them are still pending, for one request instead of one each.
What a sweep reads is a hint, never a result:

- an order listed as pending has its own polls put off, but never more than
  :attr:`Sweep.safety` seconds after its last one (the sparse safety schedule);
- an order missing from a complete listing, and last known in a status the listing
  covers, has probably finished: it is polled at once;
- only a direct ``GET /api/orders/{id}`` settles an order (``OrderWatch`` decides, as
  without a sweep);
- a listing that contradicts a direct read made before it began (an order listed as
  pending that a read had seen finished, or in a status a read had seen it leave)
  switches the sweep off, logged once.

The rules are the pure functions :func:`possible_after`, :func:`contradiction`,
:func:`vouches` and :func:`hint`; :class:`Sweeper` holds one ``wait_many`` call's state
and :func:`listing_flow` reads the pages. The listing's parameters are not published, so
every name and the paging style are :class:`Sweep` settings.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Collection, Iterable, Mapping
from typing import Any, Literal

import attrs

from . import _api
from ._effects import Flow
from .errors import APIStatusError
from .models import Order, OrderStatus, Page
from .ratelimit import Priority

__all__ = [
    "Known",
    "Listing",
    "Sweep",
    "Sweeper",
    "contradiction",
    "hint",
    "listing_flow",
    "possible_after",
    "vouches",
]

log = logging.getLogger("foxpoll.polling")

#: The pending statuses in lifecycle order: an order only ever moves right, then ends.
LIFECYCLE = ("active", "paid", "processing")
TERMINAL = frozenset({"completed", "cancelled", "failed"})
#: Failed sweeps in a row (5xx, timeouts, unreadable pages) before the sweep is given up.
MAX_FAILURES = 3
#: Seconds before a wait's deadline that a put-off poll goes at the latest (as
#: ``polling.LAST_POLL_GUARD``: room for the request).
DEADLINE_GUARD = 1.0


def _positive_int(_: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{attribute.name} must be a whole number, at least 1")


def _seconds(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not 0 < value < math.inf:
        raise ValueError(f"{attribute.name} must be a finite number of seconds above zero")


def _name(_: object, attribute: attrs.Attribute[Any], value: str | None) -> None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"{attribute.name} must be a non-empty string")


def _statuses(value: Iterable[OrderStatus | str]) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    names = tuple(OrderStatus(s).value for s in value)
    if not names or not all(names):
        raise ValueError("statuses must name at least one status")
    return names


def _pairs(value: Mapping[str, str] | Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    pairs = tuple(sorted(dict(value).items()))
    for key, item in pairs:
        if not isinstance(key, str) or not isinstance(item, str):
            raise TypeError("extra_params maps names to values, both strings")
    return pairs


@attrs.define
class _Switch:
    """Whether a :class:`Sweep` is still trusted; shared by every wait that uses it."""

    reason: str | None = None
    lock: threading.Lock = attrs.field(factory=threading.Lock)

    def off(self, reason: str) -> bool:
        """Switch off; True the first time, so that only one caller logs it."""
        with self.lock:
            if self.reason is not None:
                return False
            self.reason = reason
            return True


@attrs.frozen
class Sweep:
    """How ``wait_many`` sweeps the order history, an opt-in hint
    (``WaitPolicy(sweep=Sweep())``); see "Sweeping the order history" in the docs.

    While at least ``min_orders`` waits are open, every ``every`` seconds the sweep lists
    the orders in ``statuses``, up to ``max_pages`` pages of ``page_size`` each. An order
    listed as pending is polled only every ``safety`` seconds; one missing from a complete
    listing is polled at once. No order is ever settled from a listing. With a sweep on,
    a wait whose policy has no ``timeout`` gets its policy's horizon as one, so it gives
    up no later than it would without the sweep.

    A listing that disagrees with a direct read switches this instance off, for every wait
    that uses it, and says why in :attr:`off_reason` and one warning: give each client (API
    key and host) its own instance, on its ``wait_policy``.

    Attributes:
        statuses: The pending statuses to list, one listing each, in lifecycle order
            (``paid`` before ``processing``: an order that moves between the two is then
            seen in one of them). An order last known in a status is hinted only when
            every status it can still be in was listed completely.
        page_size: Orders per page (the ``limit_param``).
        max_pages: Pages read per status and sweep. A status with more pending orders is
            cut short: its rows still put polls off, but its missing orders hint nothing.
        paging: ``"offset"`` (``offset`` and ``total``, as the product catalog) or
            ``"cursor"`` (``nextCursor``, as the categories).
        every: Seconds from one sweep's start to the next.
        min_orders: Open waits below which no sweep is made: a sweep costs a request per
            status and page, whatever the number of orders it covers.
        safety: The longest an order listed as pending goes without its own poll.
        status_param, limit_param: The query parameters' names.
        page_param: The name of the offset or cursor parameter; ``"offset"`` or
            ``"cursor"``, after ``paging``, when None.
        extra_params: Further query parameters sent with every page.
    """

    statuses: tuple[str, ...] = attrs.field(default=("paid", "processing"),
                                            converter=_statuses)
    page_size: int = attrs.field(default=100, validator=_positive_int)
    max_pages: int = attrs.field(default=10, validator=_positive_int)
    paging: Literal["offset", "cursor"] = attrs.field(
        default="offset", validator=attrs.validators.in_(("offset", "cursor")))
    every: float = attrs.field(default=5.0, validator=_seconds)
    min_orders: int = attrs.field(default=10, validator=_positive_int)
    safety: float = attrs.field(default=60.0, validator=_seconds)
    status_param: str = attrs.field(default="status", validator=_name)
    limit_param: str = attrs.field(default="limit", validator=_name)
    page_param: str | None = attrs.field(default=None, validator=_name)
    extra_params: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_pairs)
    _switch: _Switch = attrs.field(factory=_Switch, init=False, repr=False, eq=False)

    @property
    def off_reason(self) -> str | None:
        """Why this sweep was switched off; None while it is on."""
        return self._switch.reason

    def switch_off(self, reason: str) -> None:
        """Stop sweeping with this instance, for every wait that uses it; the first call
        logs ``reason`` as a warning."""
        if self._switch.off(reason):
            log.warning("the order-history sweep is off: %s", reason)

    def params(self, status: str, position: int | str | None) -> dict[str, Any]:
        """The query parameters of one page: ``position`` is its offset or cursor (None
        for a first cursor page)."""
        params: dict[str, Any] = dict(self.extra_params)
        params[self.status_param] = status
        params[self.limit_param] = self.page_size
        if position is not None:
            params[self.page_param or self.paging] = position
        return params


@attrs.frozen
class Known:
    """What was last known of an order's status, and when (the client's monotonic clock).

    ``direct``: from a direct read of the order, answered at ``at`` (else from a
    listing's row; ``at`` is then when that listing ended).
    """

    status: str
    at: float
    direct: bool = True


@attrs.frozen
class Listing:
    """What one sweep saw.

    Attributes:
        started: When its first request was started, at the latest (monotonic).
        rows: Each listed order's status, as its latest row said.
        complete: The statuses listed to the end (no page left unread).
        requests: Pages read.
    """

    started: float
    rows: Mapping[str, str] = attrs.field(repr=False)
    complete: frozenset[str]
    requests: int


def possible_after(status: str) -> frozenset[str] | None:
    """The pending statuses an order seen in ``status`` may be in now (statuses only move
    forward); None when it is terminal or unknown, where no listing can say more."""
    if status not in LIFECYCLE:
        return None
    return frozenset(LIFECYCLE[LIFECYCLE.index(status):])


def contradiction(read: Known | None, listed: str, listing: Listing) -> str | None:
    """Why a row listing an order in ``listed`` contradicts a direct ``read`` of it made
    before the listing began; None when it does not (or cannot be told)."""
    if read is None or not read.direct or read.at >= listing.started:
        return None  # no read to go by, or one that may have come after the listing
    if listed not in LIFECYCLE:
        return None
    if read.status in TERMINAL:
        return f"listed as {listed} after a direct read had seen it {read.status}"
    if read.status in LIFECYCLE and LIFECYCLE.index(read.status) > LIFECYCLE.index(listed):
        return f"listed as {listed} after a direct read had seen it {read.status}"
    return None


def vouches(listing: Listing, order_id: str, read: Known | None) -> bool:
    """Whether ``listing`` says the order is still pending, and says it later than the
    last direct ``read``: its own poll can then wait (up to :attr:`Sweep.safety`)."""
    listed = listing.rows.get(order_id)
    return listed in LIFECYCLE and (read is None or read.at <= listing.started)


def hint(listing: Listing, order_id: str, last: Known | None) -> bool:
    """Whether to poll the order at once: a row says it finished, or it is missing from a
    listing that covered every status it can still be in, since it was ``last`` known
    pending (by a direct read or an earlier listing)."""
    listed = listing.rows.get(order_id)
    if listed is not None:
        return listed in TERMINAL and (last is None or last.status not in TERMINAL)
    if last is None or last.at >= listing.started:
        return False  # not known pending before this listing: its absence says nothing
    possible = possible_after(last.status)
    return possible is not None and possible <= listing.complete


def _more(page: Page[Order], sweep: Sweep, offset: int) -> bool:
    """Whether another page may follow; a full page with no total and no cursor may."""
    if page.next_cursor:
        return True
    if page.total is not None:
        return (page.offset if page.offset is not None else offset) + len(page.items) \
            < page.total
    return len(page.items) >= sweep.page_size


def listing_flow(rt: _api.Runtime, sweep: Sweep, started: float) -> Flow[Listing]:
    """Read the pending orders of ``sweep.statuses``, page by page, in the POLL lane of the
    client's budget; ``started`` is now, on the client's monotonic clock."""
    rows: dict[str, str] = {}
    complete: set[str] = set()
    requests = 0
    for status in sweep.statuses:
        offset = 0
        cursor: str | None = None
        for _ in range(sweep.max_pages):
            position: int | str | None = offset if sweep.paging == "offset" else cursor
            page = yield from _api.list_orders(rt, sweep.params(status, position),
                                               priority=Priority.POLL)
            requests += 1
            for order in page.items:
                rows[order.id] = order.status.value
            if not _more(page, sweep, offset):
                complete.add(status)
                break
            if sweep.paging == "cursor":
                cursor = page.next_cursor
                if cursor is None:
                    break  # a full page and no cursor to go on with: cut short
            elif not page.items:
                break
            offset += len(page.items)
    return Listing(started, rows, frozenset(complete), requests)


class Sweeper:
    """One ``wait_many`` call's sweep: when to sweep, what each sweep hints, and which due
    polls it puts off. Pure: the loop tells it what happened and when."""

    __slots__ = ("_deferred", "_failures", "_latest", "_listed", "_next", "_polling",
                 "_reads", "_running", "_started", "sweep")

    def __init__(self, sweep: Sweep, started: float) -> None:
        self.sweep = sweep
        self._started = started
        self._reads: dict[str, Known] = {}  # every direct read's latest, finished orders too
        self._listed: dict[str, Known] = {}  # the latest listing row of each order
        self._polling: dict[str, float] = {}  # order -> when its poll started
        self._deferred: dict[str, float] = {}  # put-off order -> when it was due
        self._latest: Listing | None = None
        self._running = False
        self._next = started
        self._failures = 0

    @property
    def on(self) -> bool:
        return self.sweep.off_reason is None

    def due(self, open_waits: int) -> float:
        """When the next sweep should start; infinity while one runs, while fewer than
        ``min_orders`` waits are open, or once the sweep is off."""
        if self._running or not self.on or open_waits < self.sweep.min_orders:
            return math.inf
        return self._next

    def begin(self, rt: _api.Runtime, now: float) -> Flow[Listing]:
        """The flow of a sweep starting ``now``."""
        self._running = True
        self._next = now + self.sweep.every
        return listing_flow(rt, self.sweep, now)

    def polling(self, order_id: str, now: float) -> None:
        """A direct poll of the order starts ``now``."""
        self._polling[order_id] = now
        self._deferred.pop(order_id, None)

    def polled(self, order_id: str, outcome: object, now: float) -> None:
        """A direct poll of the order was answered ``now`` (an order, or an error)."""
        sent = self._polling.pop(order_id, now)
        if not isinstance(outcome, Order):
            return
        status = outcome.status.value
        self._reads[order_id] = Known(status, now)
        row = self._listed.get(order_id)
        if row is not None and row.status in TERMINAL and status in LIFECYCLE \
                and sent >= row.at and self.on:
            self.sweep.switch_off(
                f"GET /api/orders/ listed order {order_id} as {row.status}, but a direct "
                f"read after the listing saw it {status}: the listing cannot be trusted "
                "to hint")
            self._latest = None

    def defer(self, order_id: str, now: float, deadline: float | None) -> float | None:
        """When the order's poll, due ``now``, should go instead; None: now."""
        latest = self._latest
        read = self._reads.get(order_id)
        if not self.on or latest is None or not vouches(latest, order_id, read):
            return None
        later = (read.at if read is not None else self._started) + self.sweep.safety
        if deadline is not None:
            later = min(later, deadline - DEADLINE_GUARD)
        if later <= now:
            return None
        self._deferred.setdefault(order_id, now)
        return later

    def listed(self, outcome: object, now: float,
               open_ids: Collection[str]) -> list[tuple[str, float]]:
        """A sweep ended ``now`` with ``outcome`` (a :class:`Listing`, or what it raised):
        the open orders to poll, and when (ids and times)."""
        self._running = False
        if not isinstance(outcome, Listing):
            self._failed(outcome)
            return self._restore(now)  # no listing vouches for the polls put off
        self._failures = 0
        for order_id, status in outcome.rows.items():
            why = contradiction(self._reads.get(order_id), status, outcome)
            if why is not None:
                self.sweep.switch_off(
                    f"GET /api/orders/ listed order {order_id} {why}: the listing lags or "
                    "ignores its parameters, so it cannot be trusted to hint")
                return self._restore(now)
        hinted = []
        for order_id in open_ids:
            if order_id in self._polling:
                continue
            read, row = self._reads.get(order_id), self._listed.get(order_id)
            last = read if row is None or (read is not None and read.at >= row.at) else row
            if hint(outcome, order_id, last):
                hinted.append((order_id, now))
                self._deferred.pop(order_id, None)
        for order_id, status in outcome.rows.items():
            self._listed[order_id] = Known(status, now, direct=False)
        self._latest = outcome
        return hinted

    def released(self, open_waits: int, now: float) -> list[tuple[str, float]]:
        """After a poll, ``open_waits`` are open: once the sweep is off, or below
        ``min_orders`` (where no sweep comes), the polls put off go back to when they
        were due (ids and times)."""
        if not self._deferred or (self.on and open_waits >= self.sweep.min_orders):
            return []
        return self._restore(now)

    def _failed(self, error: object) -> None:
        kind = type(error).__name__
        if isinstance(error, APIStatusError) and error.status_code not in (408, 429) \
                and error.status_code < 500:
            self.sweep.switch_off(
                f"GET /api/orders/ answered HTTP {error.status_code} to the sweep's "
                "parameters (check Sweep's statuses and parameter names)")
            return
        self._failures += 1
        if self._failures >= MAX_FAILURES:
            self.sweep.switch_off(f"GET /api/orders/ failed {self._failures} sweeps in a "
                                  f"row, the last with {kind}")
        else:
            log.info("a sweep of the order history failed (%s); polls go on as scheduled",
                     kind)

    def _restore(self, now: float) -> list[tuple[str, float]]:
        """The polls put off go back to when they were due (or now): no listing vouches
        for them any more."""
        self._latest = None
        restored = [(order_id, max(due, now)) for order_id, due in self._deferred.items()]
        self._deferred.clear()
        return restored
