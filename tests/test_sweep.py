"""The order-history sweep: ``orders.list``'s request shape, the sweep's rules, and
``wait_many`` with a sweep on virtual time, against honest and lying listings."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import respx
from hypothesis import given
from hypothesis import strategies as st

from foxpoll import AsyncFoxReload, FoxReload, OrderStatus, Sweep, WaitPolicy, WaitResult
from foxpoll._sweep import (
    LIFECYCLE,
    TERMINAL,
    Known,
    Listing,
    contradiction,
    hint,
    possible_after,
    vouches,
)
from foxpoll.ratelimit import Priority, RateLimit
from foxpoll.testing import FakeClock, FakeFoxReload, Fault, FaultKind, OrderScript
from foxpoll.testing._simulator import RecordedRequest

from .conftest import API_KEY

BASE = "https://api.example.test"
ROW = {"id": "abc", "status": "processing", "items": [{"itemId": "product_1", "quantity": 1}]}
STEAM = [{"itemId": "product_steam_10"}]


# -- orders.list ---------------------------------------------------------------------


@pytest.fixture
def api() -> Iterator[respx.MockRouter]:
    with respx.mock(base_url=BASE, assert_all_called=True) as router:
        yield router


def test_list_sends_its_named_parameters(api: respx.MockRouter) -> None:
    route = api.get("/api/orders/").respond(
        200, json={"items": [ROW], "limit": 1, "offset": 20, "total": 40})
    with FoxReload(API_KEY, base_url=BASE, max_retries=0) as client:
        page = client.orders.list(status=OrderStatus.PROCESSING, limit=1, offset=20,
                                  created_after="2026-01-01")
    assert dict(route.calls.last.request.url.params) == {
        "status": "processing", "limit": "1", "offset": "20", "created_after": "2026-01-01"}
    assert page.items[0].id == "abc"
    assert page.items[0].status is OrderStatus.PROCESSING
    assert (page.limit, page.offset, page.total, page.has_more) == (1, 20, 40, True)


async def test_async_list_pages_by_cursor(api: respx.MockRouter) -> None:
    route = api.get("/api/orders/").respond(
        200, json={"items": [ROW], "limit": 1, "nextCursor": "c2"})
    async with AsyncFoxReload(API_KEY, base_url=BASE, max_retries=0) as client:
        page = await client.orders.list(status="paid", cursor="c1", limit=1)
    assert dict(route.calls.last.request.url.params) == {
        "status": "paid", "cursor": "c1", "limit": "1"}
    assert page.next_cursor == "c2"
    assert page.has_more


@pytest.mark.parametrize("bad", [{"limit": 0}, {"limit": True}, {"offset": -1},
                                 {"status": ""}])
def test_list_refuses_bad_parameters_before_sending(bad: dict[str, Any]) -> None:
    with FoxReload(API_KEY, base_url=BASE) as client, pytest.raises(ValueError, match="must"):
        client.orders.list(**bad)


def test_the_simulator_lists_newest_first_by_status(sim: FakeFoxReload,
                                                    clock: FakeClock) -> None:
    sim.script_next(OrderScript.complete(after=100), OrderScript.complete(after=100),
                    OrderScript.complete(after=1), OrderScript.complete(after=100))
    with sim.client() as client:
        ids = []
        for _ in range(4):
            ids.append(client.orders.create(items=STEAM).id)
            client.orders.pay(ids[-1])
            clock.advance(1)
        clock.advance(10)
        first = client.orders.list(status="processing", limit=2)
        second = client.orders.list(status="processing", limit=2, offset=2)
    assert [o.id for o in first.items + second.items] == [ids[3], ids[1], ids[0]]
    assert (first.total, first.has_more, second.has_more) == (3, True, False)


# -- the rules -------------------------------------------------------------------------

STATUS = st.sampled_from([*LIFECYCLE, *sorted(TERMINAL), "on_hold"])


def listing(rows: dict[str, str], started: float = 10.0,
            complete: frozenset[str] = frozenset({"paid", "processing"})) -> Listing:
    return Listing(started, rows, complete, 1)


def rank(status: str) -> int:
    return LIFECYCLE.index(status) if status in LIFECYCLE else len(LIFECYCLE)


@st.composite
def histories(draw: st.DrawFn) -> tuple[list[tuple[float, str]], float]:
    """A forward-only history of one order (status from each instant on), and an instant
    after its first step."""
    steps = draw(st.lists(st.sampled_from([*LIFECYCLE, "completed", "failed"]),
                          min_size=1, max_size=5))
    steps = sorted(steps, key=rank)
    terminal = next((i for i, s in enumerate(steps) if s in TERMINAL), None)
    steps = steps if terminal is None else steps[:terminal + 1]
    times = sorted(draw(st.lists(st.floats(0, 100), min_size=len(steps),
                                 max_size=len(steps), unique=True)))
    return list(zip(times, steps, strict=True)), draw(st.floats(times[0], 200))


def status_at(history: list[tuple[float, str]], when: float) -> str:
    return [status for at, status in history if at <= when][-1]


@given(histories(), st.floats(0, 100), st.booleans())
def test_an_honest_listing_never_contradicts_an_earlier_read(
        history: tuple[list[tuple[float, str]], float], gap: float, complete: bool) -> None:
    steps, read_at = history
    listed_at = read_at + gap
    read = Known(status_at(steps, read_at), read_at)
    now = status_at(steps, listed_at)
    seen = listing({"o": now} if now in LIFECYCLE else {}, listed_at,
                   frozenset({"paid", "processing"}) if complete else frozenset())
    if now in LIFECYCLE:
        assert contradiction(read, now, seen) is None
    if hint(seen, "o", read):
        # An honest, complete listing hints only an order that has finished by then.
        assert now in TERMINAL


@given(STATUS, STATUS, st.floats(0, 20))
def test_a_listing_contradicts_only_a_read_made_before_it(read_status: str, listed: str,
                                                          read_at: float) -> None:
    why = contradiction(Known(read_status, read_at), listed, listing({"o": listed}))
    went_back = listed in LIFECYCLE and (read_status in TERMINAL or (
        read_status in LIFECYCLE and rank(read_status) > rank(listed)))
    assert (why is not None) == (went_back and read_at < 10.0)
    # A row never contradicts a read it may have come before.
    assert contradiction(Known(read_status, 10.0), listed, listing({"o": listed})) is None


@given(STATUS, st.floats(0, 20), st.booleans())
def test_a_pending_row_vouches_and_never_hints(listed: str, read_at: float,
                                              direct: bool) -> None:
    seen = listing({"o": listed})
    last = Known("processing", read_at, direct=direct)
    if listed in LIFECYCLE:
        assert not hint(seen, "o", last)
        assert vouches(seen, "o", Known("paid", read_at)) == (read_at <= 10.0)
    else:
        assert not vouches(seen, "o", last)


@given(STATUS, st.frozensets(st.sampled_from(LIFECYCLE)))
def test_absence_hints_only_when_every_status_left_was_listed(
        last: str, complete: frozenset[str]) -> None:
    left = possible_after(last)
    assert hint(listing({}, complete=complete), "o", Known(last, 5.0)) == (
        left is not None and left <= complete)
    assert not hint(listing({}, complete=complete), "o", None)  # never known pending
    assert not hint(listing({}, complete=complete), "o", Known(last, 10.0))


def test_sweep_settings_are_checked() -> None:
    assert Sweep(statuses="processing").statuses == ("processing",)
    assert Sweep(statuses=[OrderStatus.PAID]).statuses == ("paid",)
    assert Sweep(extra_params={"type": "api"}).params("paid", 0) == {
        "type": "api", "status": "paid", "limit": 100, "offset": 0}
    assert Sweep(paging="cursor", page_param="after").params("paid", "c") == {
        "status": "paid", "limit": 100, "after": "c"}
    for bad in ({"page_size": 0}, {"every": 0}, {"safety": math.inf}, {"paging": "pages"},
                {"statuses": ()}, {"min_orders": 0}, {"status_param": ""}):
        with pytest.raises(ValueError, match=r"must|statuses"):
            Sweep(**bad)
    with pytest.raises(TypeError):
        WaitPolicy(sweep="on")  # type: ignore[arg-type]


# -- wait_many with a sweep ------------------------------------------------------------


def buy(sim: FakeFoxReload, client: FoxReload, settles: list[float]) -> dict[str, float]:
    """Paid orders that settle so many seconds after payment (inf: stall), by id."""
    bought = {}
    for settle in settles:
        sim.script_next(OrderScript.stall() if math.isinf(settle)
                        else OrderScript.complete(after=settle))
        order = client.orders.create(items=STEAM)
        client.orders.pay(order.id)
        bought[order.id] = settle
    return bought


def is_listing(request: httpx.Request | RecordedRequest) -> bool:
    path = request.url.path if isinstance(request, httpx.Request) else request.path
    return request.method == "GET" and path.rstrip("/") == "/api/orders"


def waited(sweep: Sweep | None, seed: int = 3, orders: int = 60
           ) -> tuple[dict[str, float], list[WaitResult], FakeFoxReload]:
    sim = FakeFoxReload(api_key=API_KEY, clock=FakeClock())
    rng = random.Random(seed)
    with sim.client() as client:
        settles = buy(sim, client, [rng.uniform(2, 50) for _ in range(orders)])
        del sim.requests[:]
        results = list(client.wait_many(settles, policy=WaitPolicy(sweep=sweep)))
    return settles, results, sim


def test_a_sweep_finds_completed_orders_sooner_with_fewer_requests() -> None:
    settles, plain, sim = waited(None)
    _, swept, swept_sim = waited(Sweep())
    assert all(r.ok for r in plain + swept)
    assert {r.order_id for r in swept} == set(settles)
    polls = [r for r in swept_sim.requests if not is_listing(r)]
    listings = [r for r in swept_sim.requests if is_listing(r)]
    assert listings
    assert all(r.method == "GET" for r in polls)
    assert len(swept_sim.requests) < 0.75 * len(sim.requests)

    def mean_delay(results: list[WaitResult]) -> float:
        return sum(r.elapsed - settles[r.order_id] for r in results) / len(results)

    assert mean_delay(swept) < 0.6 * mean_delay(plain)
    # Every order was settled by a direct read, after it completed.
    for result in swept:
        assert result.elapsed >= settles[result.order_id]
        assert result.unwrap().codes


async def test_the_async_client_sweeps_too(sim: FakeFoxReload) -> None:
    rng = random.Random(5)
    sweep = Sweep()
    async with sim.async_client() as client:
        ids = []
        for _ in range(40):
            sim.script_next(OrderScript.complete(after=rng.uniform(2, 40)))
            order = await client.orders.create(items=STEAM)
            await client.orders.pay(order.id)
            ids.append(order.id)
        results = [r async for r in client.wait_many(
            ids, policy=WaitPolicy(sweep=sweep), max_in_flight=8)]
    assert sorted(r.order_id for r in results) == sorted(ids)
    assert all(r.ok for r in results)
    assert sweep.off_reason is None
    assert sim.count("GET", "/api/orders/") > 0
    assert sim.count("GET", "/api/orders/*") < 3 * len(ids)


def test_sweeps_take_permits_in_the_poll_lane(clock: FakeClock) -> None:
    sim = FakeFoxReload(api_key=API_KEY, clock=clock)
    lanes: list[int] = []

    class Recording(RateLimit):
        def acquire(self, priority: Any, /, *, timeout: float | None = None) -> float:
            lanes.append(int(priority))
            return super().acquire(priority, timeout=timeout)

    with sim.client(rate_limit=Recording(6000, clock=clock)) as client:
        ids = list(buy(sim, client, [20.0] * 12))
        lanes.clear()
        del sim.requests[:]
        list(client.wait_many(ids, policy=WaitPolicy(sweep=Sweep())))
    assert len(lanes) == len(sim.requests)  # every request took a permit
    assert is_listing(sim.requests[0])
    assert lanes[0] == Priority.POLL


def test_no_sweep_below_min_orders(sim: FakeFoxReload) -> None:
    with sim.client() as client:
        settles = buy(sim, client, [10.0] * 4)
        list(client.wait_many(settles, policy=WaitPolicy(sweep=Sweep(min_orders=5))))
    assert not any(is_listing(r) for r in sim.requests)


def test_a_listed_order_is_still_polled_on_the_safety_schedule(sim: FakeFoxReload,
                                                               clock: FakeClock) -> None:
    with sim.client() as client:
        settles = buy(sim, client, [math.inf] * 10)
        del sim.requests[:]
        start = clock.monotonic()
        policy = WaitPolicy(sweep=Sweep(safety=60), timeout=400)
        results = list(client.wait_many(settles, policy=policy))
    assert all(r.stalled for r in results)
    for order_id in settles:
        polls = [r.at - start for r in sim.requests if r.path.endswith(order_id)]
        gaps = [b - a for a, b in zip([0.0, *polls], polls, strict=False)]
        assert max(gaps) == pytest.approx(60)  # put off, but never past the safety poll
        assert len(polls) <= 400 / 60 + 2  # sparse: not the vendor's 5-39 s


def lying(sim: FakeFoxReload, lie: Callable[[str, str], str | None]) -> httpx.Client:
    """An HTTP client to ``sim`` whose order listings report ``lie(id, true_status)`` for
    every order (None: leave it out), whatever the status asked for."""

    def handle(request: httpx.Request) -> httpx.Response:
        if not is_listing(request):
            return sim.handle(request)
        sim.handle(request)  # counted like any other request
        rows = []
        for order_id in reversed(sim.order_ids()):
            shown = lie(order_id, sim.status_of(order_id))
            if shown is not None:
                rows.append({**ROW, "id": order_id, "status": shown})
        return httpx.Response(200, json={"items": rows, "limit": 100, "offset": 0,
                                         "total": len(rows)})

    return httpx.Client(transport=httpx.MockTransport(handle))


def test_a_stale_listing_switches_the_sweep_off_once(
        sim: FakeFoxReload, clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    sweep = Sweep(safety=30)
    stale = lying(sim, lambda _, status: "processing")  # finished orders stay listed
    with FoxReload(API_KEY, base_url=sim.base_url, http_client=stale, clock=clock,
                   rng=random.Random(0), wait_policy=WaitPolicy(sweep=sweep)) as client:
        settles = buy(sim, client, [float(5 + i) for i in range(10)] + [100.0] * 12)
        del sim.requests[:]
        start = clock.monotonic()
        with caplog.at_level(logging.WARNING, logger="foxpoll.polling"):
            results = list(client.wait_many(settles))
    assert all(r.ok for r in results)
    assert sweep.off_reason is not None
    assert "listed as processing" in sweep.off_reason
    assert "completed" in sweep.off_reason
    warned = [r for r in caplog.records if "sweep is off" in r.getMessage()]
    assert len(warned) == 1
    off_at = max(r.at for r in sim.requests if is_listing(r))
    assert off_at - start <= 30 + sweep.every  # the first sweep after a read saw it done
    # Off for this client: its next wait_many polls without listing.
    with sim.client(wait_policy=WaitPolicy(sweep=sweep)) as again:
        more = buy(sim, again, [3.0] * 12)
        listed = sum(is_listing(r) for r in sim.requests)
        assert all(r.ok for r in again.wait_many(more))
        assert sum(is_listing(r) for r in sim.requests) == listed


def test_no_order_is_settled_from_a_row(sim: FakeFoxReload, clock: FakeClock) -> None:
    sweep = Sweep()
    early = lying(sim, lambda _, status: "completed")  # every order "done" at once
    with FoxReload(API_KEY, base_url=sim.base_url, http_client=early, clock=clock,
                   rng=random.Random(0)) as client:
        settles = buy(sim, client, [float(20 + i) for i in range(12)])
        start = clock.monotonic()
        results = list(client.wait_many(settles, policy=WaitPolicy(sweep=sweep)))
    assert all(r.ok for r in results)
    for result in results:  # each settled by a direct read, once really completed
        assert result.elapsed >= settles[result.order_id]
        assert result.unwrap().codes
    assert clock.monotonic() - start >= 31
    # A direct read after the listing saw a "completed" order still pending.
    assert sweep.off_reason is not None
    assert "saw it" in sweep.off_reason


def test_a_listing_refused_switches_the_sweep_off(sim: FakeFoxReload,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    sweep = Sweep(status_param="state")
    sim.inject(Fault(FaultKind.NOT_FOUND, method="GET", path="/api/orders/"))
    with sim.client() as client, caplog.at_level(logging.WARNING, logger="foxpoll.polling"):
        settles = buy(sim, client, [8.0] * 10)
        results = list(client.wait_many(settles, policy=WaitPolicy(sweep=sweep)))
    assert all(r.ok for r in results)
    assert sweep.off_reason is not None
    assert "HTTP 404" in sweep.off_reason
    assert sum("sweep is off" in r.getMessage() for r in caplog.records) == 1


def test_failing_sweeps_are_given_up_after_three(sim: FakeFoxReload) -> None:
    sweep = Sweep()
    sim.inject(Fault(FaultKind.SERVER_ERROR, method="GET", path="/api/orders/", times=100))
    with sim.client(max_retries=0) as client:
        settles = buy(sim, client, [float(10 + 3 * i) for i in range(12)])
        results = list(client.wait_many(settles, policy=WaitPolicy(sweep=sweep)))
    assert all(r.ok for r in results)
    assert sweep.off_reason is not None
    assert "3 sweeps in a row" in sweep.off_reason
    assert sim.count("GET", "/api/orders/") == 3


def test_a_listing_reads_at_most_max_pages(sim: FakeFoxReload, clock: FakeClock) -> None:
    offsets: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        if is_listing(request):
            offsets.append(request.url.params["offset"])
        return sim.handle(request)

    sweep = Sweep(page_size=2, max_pages=2)
    http = httpx.Client(transport=httpx.MockTransport(handle))
    with FoxReload(API_KEY, base_url=sim.base_url, http_client=http, clock=clock,
                   rng=random.Random(0)) as client:
        settles = buy(sim, client, [float(5 + i) for i in range(12)])
        results = list(client.wait_many(settles, policy=WaitPolicy(sweep=sweep)))
    assert all(r.ok for r in results)
    assert sweep.off_reason is None
    assert set(offsets) == {"0", "2"}  # twelve pending: cut short after two pages


def test_cursor_paging(clock: FakeClock) -> None:
    sim = FakeFoxReload(api_key=API_KEY, clock=clock)
    seen: list[dict[str, str]] = []

    def handle(request: httpx.Request) -> httpx.Response:
        if not is_listing(request):
            return sim.handle(request)
        params = dict(request.url.params)
        seen.append(params)
        rows = [{**ROW, "id": i, "status": s} for i in reversed(sim.order_ids())
                if (s := sim.status_of(i)) == params["state"]]
        start = int(params.get("after", 0))
        size = int(params["per_page"])
        more = start + size < len(rows)
        return httpx.Response(200, json={"items": rows[start:start + size], "limit": size,
                                         "nextCursor": str(start + size) if more else None})

    sweep = Sweep(paging="cursor", page_param="after", status_param="state",
                  limit_param="per_page", page_size=4)
    http = httpx.Client(transport=httpx.MockTransport(handle))
    with FoxReload(API_KEY, base_url=sim.base_url, http_client=http, clock=clock,
                   rng=random.Random(0)) as client:
        settles = buy(sim, client, [float(5 + 2 * i) for i in range(12)])
        results = list(client.wait_many(settles, policy=WaitPolicy(sweep=sweep)))
    assert all(r.ok for r in results)
    assert sweep.off_reason is None
    assert {"state": "processing", "per_page": "4", "after": "4"} in seen
    assert all("offset" not in params for params in seen)
    assert sum(r.elapsed - settles[r.order_id] for r in results) / len(results) < 5
