"""The simulator's lifecycle and faults, seen through both clients."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from foxpoll import (
    AmbiguousOrderError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    ConflictError,
    FoxReload,
    NotFoundError,
    OrderStatus,
    RateLimitError,
    SystemClock,
    UnprocessableEntityError,
)
from foxpoll.testing import (
    FakeClock,
    FakeFoxReload,
    Fault,
    FaultKind,
    OrderScript,
    SimulatorServer,
)

STEAM = [{"itemId": "product_steam_10", "quantity": 1}]


def test_lifecycle_moves_forward_with_virtual_time(sim: FakeFoxReload, clock: FakeClock) -> None:
    sim.script_next(OrderScript.complete(after=20))
    with sim.client() as client:
        order = client.orders.create(items=STEAM)
        assert order.status is OrderStatus.ACTIVE
        assert client.orders.pay(order.id).status is OrderStatus.PAID
        seen = []
        for _ in range(25):
            seen.append(client.orders.get(order.id).status)
            clock.advance(1)
    assert seen[0] is OrderStatus.PAID
    assert OrderStatus.PROCESSING in seen
    assert seen[-1] is OrderStatus.COMPLETED
    assert seen.index(OrderStatus.COMPLETED) == 20
    # forward only: once completed, always completed
    first = seen.index(OrderStatus.COMPLETED)
    assert all(s is OrderStatus.COMPLETED for s in seen[first:])


def test_completed_orders_carry_codes_per_quantity(sim: FakeFoxReload, clock: FakeClock) -> None:
    with sim.client() as client:
        order = client.orders.create(items=[
            {"itemId": "product_steam_10", "quantity": 3},
            {"itemId": "product_pubg_660", "quantity": 1, "note": {"player_id": "5"}},
        ])
        assert client.orders.get(order.id).codes == ()
        client.orders.pay(order.id)
        clock.advance(60)
        done = client.orders.get(order.id)
        again = client.orders.get(order.id)
    assert len(done.codes) == 4
    assert all(isinstance(c, str) for c in done.codes[:3])
    assert set(done.codes[3]) == {"code", "pin"}  # type: ignore[arg-type]
    assert done.codes == again.codes  # codes are stable across reads


@pytest.mark.parametrize(
    ("script", "status", "reason"),
    [(OrderScript.fail(after=5), OrderStatus.FAILED, None),
     (OrderScript.cancel(after=5, reason="user_request"), OrderStatus.CANCELLED, "user_request")],
)
def test_failed_and_cancelled_outcomes(
    sim: FakeFoxReload, clock: FakeClock, script: OrderScript, status: OrderStatus,
    reason: str | None,
) -> None:
    sim.script_next(script)
    with sim.client() as client:
        order = client.orders.create(items=STEAM)
        client.orders.pay(order.id)
        clock.advance(10)
        final = client.orders.get(order.id)
    assert final.status is status
    assert (final.cancel_reason.value if final.cancel_reason else None) == reason
    if status is OrderStatus.FAILED:
        assert final.items[0].error
    assert final.codes == ()


def test_stalled_order_stays_processing_until_rescripted(
    sim: FakeFoxReload, clock: FakeClock
) -> None:
    sim.script_next(OrderScript.stall())
    with sim.client() as client:
        order = client.orders.create(items=STEAM)
        client.orders.pay(order.id)
        clock.advance(3600)
        assert client.orders.get(order.id).status is OrderStatus.PROCESSING
        sim.script(order.id, OrderScript.complete(after=3601))
        clock.advance(2)
        assert client.orders.get(order.id).status is OrderStatus.COMPLETED


def test_unpaid_orders_expire(sim: FakeFoxReload, clock: FakeClock) -> None:
    with sim.client() as client:
        order = client.orders.create(items=STEAM)
        clock.advance(901)
        expired = client.orders.get(order.id)
    assert expired.status is OrderStatus.CANCELLED
    assert expired.cancel_reason == "payment_expiration"


def test_wrong_api_key_is_401(sim: FakeFoxReload) -> None:
    with sim.client(api_key="wrong") as client, pytest.raises(AuthenticationError):
        client.orders.get("anything")


def test_unknown_order_is_404(sim: FakeFoxReload) -> None:
    with sim.client() as client, pytest.raises(NotFoundError) as info:
        client.orders.get("00000000-0000-4000-8000-000000000000")
    assert info.value.code == "NOT_FOUND"


def test_404_right_after_create(sim: FakeFoxReload, clock: FakeClock) -> None:
    sim.script_next(OrderScript(visible_after=3))
    with sim.client() as client:
        order = client.orders.create(items=STEAM)
        with pytest.raises(NotFoundError):
            client.orders.get(order.id)
        clock.advance(3)
        assert client.orders.get(order.id).id == order.id


def test_business_errors_have_codes(sim: FakeFoxReload) -> None:
    sim.balance = sim.balance.__class__("1")
    with sim.client() as client:
        with pytest.raises(UnprocessableEntityError):
            client.orders.create(items=[{"itemId": "product_pubg_660"}])  # note missing
        with pytest.raises(UnprocessableEntityError) as price:
            client.orders.create(items=STEAM, total_price="1.00")
        assert price.value.code == "OFFER_PRICE_NOT_MATCHED"
        order = client.orders.create(items=STEAM)
        with pytest.raises(APIStatusError) as balance:
            client.orders.pay(order.id)
        assert (balance.value.status_code, balance.value.code) == (402, "BALANCE_NOT_ENOUGH")
        sim.balance = sim.balance.__class__("100")
        client.orders.pay(order.id)
        with pytest.raises(ConflictError) as twice:
            client.orders.pay(order.id)
        assert twice.value.code == "ORDER_PAYMENT_NOT_POSSIBLE"


def test_rate_limit_fault_is_retried_after_retry_after(
    sim: FakeFoxReload, clock: FakeClock
) -> None:
    sim.inject(Fault(FaultKind.RATE_LIMIT, method="GET", path="/api/orders/*", retry_after=4,
                     times=2))
    with sim.client() as client:
        order = client.orders.create(items=STEAM)
        client.orders.get(order.id)
    assert clock.sleeps == [4.0, 4.0]
    assert sim.count("GET", "/api/orders/*") == 3


def test_built_in_rate_limit(clock: FakeClock) -> None:
    sim = FakeFoxReload(clock=clock, rate_limit_per_minute=5)
    with sim.client(max_retries=0) as client:
        for _ in range(5):
            client.products.get("product_steam_10")
        with pytest.raises(RateLimitError) as info:
            client.products.get("product_steam_10")
    assert info.value.retry_after == 60


def test_server_errors_and_timeouts_are_retried(sim: FakeFoxReload, clock: FakeClock) -> None:
    sim.inject(Fault(FaultKind.SERVER_ERROR, method="GET", status=502),
               Fault(FaultKind.TIMEOUT, method="GET"))
    with sim.client(timeout=5) as client:
        product = client.products.get("product_steam_10")
    assert product.id == "product_steam_10"
    assert sim.count("GET") == 3
    assert clock.monotonic() >= 5  # the timeout took its (virtual) 5 seconds


def test_timeouts_exhaust_into_api_timeout_error(sim: FakeFoxReload) -> None:
    sim.inject(Fault(FaultKind.TIMEOUT, times=10))
    with sim.client(timeout=2, max_retries=2) as client, pytest.raises(APITimeoutError):
        client.products.get("product_steam_10")
    assert sim.count() == 3


def test_slow_answer_within_the_timeout_succeeds(sim: FakeFoxReload, clock: FakeClock) -> None:
    sim.inject(Fault(FaultKind.SLOW, delay=3))
    with sim.client(timeout=5) as client:
        client.products.get("product_steam_10")
    assert clock.monotonic() == 3
    assert sim.count() == 1


def test_malformed_json_on_a_read(sim: FakeFoxReload) -> None:
    sim.inject(Fault(FaultKind.MALFORMED_JSON, method="GET"))
    with sim.client() as client, pytest.raises(APIResponseValidationError, match="not JSON"):
        client.products.get("product_steam_10")


@pytest.mark.parametrize(
    "fault",
    [Fault.server_error_after_create(),
     Fault(FaultKind.DISCONNECT, method="POST", after_handling=True),
     Fault(FaultKind.MALFORMED_JSON, method="POST", after_handling=True),
     Fault(FaultKind.TIMEOUT, method="POST", after_handling=True)],
)
def test_create_that_happened_but_failed_is_never_resent(
    sim: FakeFoxReload, fault: Fault
) -> None:
    sim.inject(fault)
    with sim.client() as client, pytest.raises(AmbiguousOrderError) as info:
        client.orders.create(items=STEAM)
    assert sim.count("POST", "/api/orders/") == 1
    assert len(sim.order_ids()) == 1  # the order exists: the caller must reconcile
    assert info.value.request_body["items"][0]["itemId"] == "product_steam_10"


def test_create_refused_at_connect_is_retried_once_safely(sim: FakeFoxReload) -> None:
    sim.inject(Fault(FaultKind.CONNECT_ERROR, method="POST"))
    with sim.client() as client:
        client.orders.create(items=STEAM)
    assert sim.count("POST", "/api/orders/") == 2
    assert len(sim.order_ids()) == 1


def test_ambiguous_pay_is_reconciled_by_reading_the_order(sim: FakeFoxReload) -> None:
    with sim.client() as client:
        order = client.orders.create(items=STEAM)
        sim.inject(Fault(FaultKind.SERVER_ERROR, path="/api/orders/*/pay", after_handling=True))
        paid = client.orders.pay(order.id)
    assert paid.status is OrderStatus.PAID
    assert sim.count("POST", "/api/orders/*/pay") == 1


def test_ambiguous_pay_on_a_still_active_order_raises(sim: FakeFoxReload) -> None:
    with sim.client() as client:
        order = client.orders.create(items=STEAM)
        sim.inject(Fault(FaultKind.SERVER_ERROR, path="/api/orders/*/pay"))  # before paying
        with pytest.raises(AmbiguousOrderError):
            client.orders.pay(order.id)
    assert sim.count("POST", "/api/orders/*/pay") == 1
    assert sim.status_of(order.id) == "active"


def test_catalogue(sim: FakeFoxReload) -> None:
    with sim.client() as client:
        steam = client.products.list(category="steam", limit=1)
        assert steam.total == 2
        assert steam.has_more
        nxt = client.products.list(category="steam", limit=1, offset=1)
        assert not nxt.has_more
        assert {steam.items[0].id, nxt.items[0].id} == {"product_steam_10", "product_steam_50"}
        assert client.products.search("pubg").items[0].required_note_fields == ("player_id",)
        first = client.categories.list(limit=2)
        second = client.categories.list(limit=2, cursor=first.next_cursor)
        assert len(first.items) + len(second.items) == 3
        assert second.next_cursor is None
        history = client.orders.list(status="active")
        assert history.total == 0


async def test_async_client_on_the_simulator(sim: FakeFoxReload, clock: FakeClock) -> None:
    sim.inject(Fault(FaultKind.SERVER_ERROR, method="GET"))
    async with sim.async_client() as client:
        order = await client.orders.create(items=STEAM)
        await client.orders.pay(order.id)
        clock.advance(30)
        done = await client.orders.get(order.id)
    assert done.status is OrderStatus.COMPLETED
    assert len(done.codes) == 1


async def test_async_create_is_never_resent(sim: FakeFoxReload) -> None:
    sim.inject(Fault.server_error_after_create(503))
    async with sim.async_client() as client:
        with pytest.raises(AmbiguousOrderError):
            await client.orders.create(items=STEAM)
    assert sim.count("POST") == 1


@pytest.mark.slow
def test_served_over_real_http() -> None:
    sim = FakeFoxReload(clock=SystemClock(), default_script=OrderScript.complete(after=0.2))
    with SimulatorServer(sim) as server, FoxReload(sim.api_key, base_url=server.url) as client:
        order = client.orders.create(items=STEAM, is_mock=True)
        client.orders.pay(order.id)
        with httpx.Client() as raw:
            bare = raw.get(f"{server.url}/api/orders/{order.id}/",
                           headers={"X-API-Key": sim.api_key})
        assert bare.status_code == 200  # the trailing-slash spelling works too
        import time

        deadline = time.monotonic() + 5
        while (current := client.orders.get(order.id)).status is not OrderStatus.COMPLETED:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert current.is_mock
    assert len(current.codes) == 1


def test_disconnect_over_real_http_is_a_connection_error() -> None:
    sim = FakeFoxReload(clock=SystemClock())
    sim.inject(Fault(FaultKind.DISCONNECT, times=1))
    with SimulatorServer(sim) as server, \
            FoxReload(sim.api_key, base_url=server.url, max_retries=1,
                      clock=FakeClock()) as client:  # the retry's backoff: virtual
        assert client.products.get("product_steam_10").id == "product_steam_10"
    assert sim.count() == 2


@pytest.mark.parametrize("real_clock", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_settle_finishes_a_stalled_order_relative_to_now(real_clock: bool) -> None:
    clock: Any = SystemClock() if real_clock else FakeClock(start=5000)
    sim = FakeFoxReload(clock=clock, default_script=OrderScript.stall(paid_for=0))
    with sim.client() as client:
        order = client.orders.create(items=STEAM)
        client.orders.pay(order.id)
        sim.settle(order.id, after=0.2 if real_clock else 60)
        assert client.orders.get(order.id).status is OrderStatus.PROCESSING
        if real_clock:
            import time

            time.sleep(0.25)
        else:
            clock.advance(60)
        assert client.orders.get(order.id).status is OrderStatus.COMPLETED
        unpaid = client.orders.create(items=STEAM)
        with pytest.raises(ValueError, match="not paid"):
            sim.settle(unpaid.id)
