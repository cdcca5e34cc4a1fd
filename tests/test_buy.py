"""``buy()``: create, pay, wait, deliver, on virtual time against the simulator.

Each outcome, on both clients; an ambiguous create followed by one fresh create, and
its orphan left unpaid to expire; an ambiguous payment never resent. The same sequence
with real processes killed at each stage is in ``test_buy_crash.py``.
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from foxpoll import (
    AmbiguousOrderError,
    AsyncFoxReload,
    Fixed,
    FoxReload,
    Listener,
    Order,
    OrderStatus,
    Purchase,
    PurchaseOutcome,
    SystemClock,
    WaitPolicy,
    WaitResult,
    deliver_once,
)
from foxpoll.cli import main
from foxpoll.dedup import DeliveryState, MemoryDedupStore
from foxpoll.events import MemoryPublisher
from foxpoll.metrics import PrometheusMetrics
from foxpoll.recovery import JobState, RecoveryPolicy, SQLiteRecoveryQueue
from foxpoll.testing import (
    FakeClock,
    FakeFoxReload,
    Fault,
    FaultKind,
    OrderScript,
    SimulatorServer,
)

STEAM = [{"itemId": "product_steam_10"}]
PUBG = [{"itemId": "product_pubg_660"}]
CREATE = ("POST", "/api/orders/")
PAY = ("POST", "/api/orders/*/pay")
SHORT = WaitPolicy(backoff=Fixed(5.0), max_attempts=6)


@pytest.fixture
def queue(tmp_path: Path, clock: FakeClock) -> Iterator[SQLiteRecoveryQueue]:
    with SQLiteRecoveryQueue(tmp_path / "q.db", policy=RecoveryPolicy(), clock=clock) as q:
        yield q


def paid(sim: FakeFoxReload) -> list[str]:
    """The ids of the orders a payment was sent for, once per payment."""
    return [r.path.split("/")[3] for r in sim.requests if (r.method, r.path[-4:]) ==
            ("POST", "/pay")]


def run_buy(client: FoxReload | AsyncFoxReload, **kwargs: Any) -> Purchase:
    """``client.buy(STEAM, ...)`` on either client."""
    kwargs.setdefault("store", MemoryDedupStore())
    kwargs.setdefault("deliver", lambda order: None)
    items = kwargs.pop("items", STEAM)
    if isinstance(client, AsyncFoxReload):
        return asyncio.run(client.buy(items, **kwargs))
    return client.buy(items, **kwargs)


@pytest.fixture(params=["sync", "async"])
def make_client(request: pytest.FixtureRequest, sim: FakeFoxReload) -> Any:
    def make(**kwargs: Any) -> FoxReload | AsyncFoxReload:
        return sim.client(**kwargs) if request.param == "sync" else sim.async_client(**kwargs)
    return make


def test_buy_delivers_once_publishes_once_and_settles_the_watch(
    sim: FakeFoxReload, make_client: Any, queue: SQLiteRecoveryQueue
) -> None:
    store, publisher = MemoryDedupStore(), MemoryPublisher()
    delivered: list[Order] = []
    client = make_client(recovery_queue=queue)
    purchase = run_buy(client, deliver=delivered.append, store=store, publisher=publisher)

    assert purchase.outcome is PurchaseOutcome.DELIVERED
    assert purchase.ok
    assert [o.id for o in delivered] == [purchase.order_id] == sim.order_ids()
    assert delivered[0].codes
    assert purchase.order is not None
    assert purchase.order.status is OrderStatus.COMPLETED
    assert purchase.delivery is not None
    assert purchase.delivery.delivered
    record = store.get(purchase.order_id)
    assert record is not None
    assert record.state is DeliveryState.DELIVERED
    assert [(e.order_id, e.status) for e in publisher.events] == [
        (purchase.order_id, "completed")]
    assert paid(sim) == [purchase.order_id]
    assert (purchase.reason, purchase.recovering, purchase.possible_orphans) == (
        None, False, ())
    # The watch written at pay was settled by the wait: a worker confirms the delivery in
    # the store after delivery_grace, with no request to the API.
    job = queue.get(purchase.order_id)
    assert job is not None
    assert (job.state, job.reason) == (JobState.QUEUED, "delivery")


def test_the_event_goes_out_inside_the_claim(sim: FakeFoxReload) -> None:
    store = MemoryDedupStore()
    states: list[DeliveryState | None] = []

    class Watching(MemoryPublisher):
        def publish(self, event: Any) -> str:
            record = store.get(event.order_id)
            states.append(record.state if record is not None else None)
            return super().publish(event)

    with sim.client() as client:
        client.buy(STEAM, deliver=lambda order: None, store=store, publisher=Watching())
    assert states == [DeliveryState.CLAIMED]


def test_an_order_delivered_already_is_not_delivered_again(
    sim: FakeFoxReload, make_client: Any
) -> None:
    store = MemoryDedupStore()
    first: list[str] = []

    class Recovered(Listener):
        """A recovery worker delivered the order while this wait ran."""

        def on_finish(self, result: WaitResult) -> None:
            deliver_once(result.unwrap(), lambda order: first.append(order.id), store)

    delivered: list[Order] = []
    purchase = run_buy(make_client(), deliver=delivered.append, store=store,
                       listener=Recovered())
    assert purchase.outcome is PurchaseOutcome.ALREADY_DELIVERED
    assert purchase.ok
    assert first == [purchase.order_id]
    assert delivered == []
    assert purchase.delivery is not None
    assert not purchase.delivery.delivered


@pytest.mark.parametrize(("script", "outcome", "reason"), [
    (OrderScript.fail(after=10), PurchaseOutcome.FAILED, "supplier rejected the request"),
    (OrderScript.cancel(after=10, reason="user_request"), PurchaseOutcome.CANCELLED,
     "user_request"),
])
def test_a_failed_or_cancelled_order_is_a_result_with_its_reason(
    sim: FakeFoxReload, make_client: Any, queue: SQLiteRecoveryQueue,
    script: OrderScript, outcome: PurchaseOutcome, reason: str,
) -> None:
    sim.script_next(script)
    publisher = MemoryPublisher()
    delivered: list[Order] = []
    purchase = run_buy(make_client(recovery_queue=queue), deliver=delivered.append,
                       publisher=publisher)
    assert (purchase.outcome, purchase.reason) == (outcome, reason)
    assert not purchase.ok
    assert purchase.delivery is None
    assert delivered == []
    assert [(e.order_id, e.status, e.codes) for e in publisher.events] == [
        (purchase.order_id, outcome.value, ())]
    job = queue.get(purchase.order_id)
    assert job is not None
    assert job.state is JobState.DONE


def test_a_stall_is_handed_to_the_recovery_queue(
    sim: FakeFoxReload, make_client: Any, queue: SQLiteRecoveryQueue
) -> None:
    sim.script_next(OrderScript.stall())
    publisher = MemoryPublisher()
    purchase = run_buy(make_client(recovery_queue=queue, wait_policy=SHORT),
                       publisher=publisher)
    assert purchase.outcome is PurchaseOutcome.STALLED
    assert purchase.recovering
    assert purchase.order is not None
    assert purchase.order.status is OrderStatus.PROCESSING
    assert purchase.reason is not None
    assert "after 6 polls" in purchase.reason
    job = queue.get(purchase.order_id)
    assert job is not None
    assert (job.state, job.reason) == (JobState.QUEUED, "stalled")
    assert publisher.events == []  # not finished: the worker publishes when it is


def test_without_a_recovery_queue_a_stall_says_nothing_holds_it(
    sim: FakeFoxReload, make_client: Any
) -> None:
    sim.script_next(OrderScript.stall())
    purchase = run_buy(make_client(), policy=SHORT)
    assert purchase.outcome is PurchaseOutcome.STALLED
    assert not purchase.recovering
    assert paid(sim) == [purchase.order_id]


def test_an_ambiguous_create_is_never_paid_and_a_fresh_one_is_bought(
    sim: FakeFoxReload, clock: FakeClock, make_client: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    sim.inject(Fault.server_error_after_create())
    registry = CollectorRegistry()
    told: list[AmbiguousOrderError] = []

    class Told(Listener):
        async def on_possible_orphan(self, error: AmbiguousOrderError) -> None:
            told.append(error)

    client = make_client(listeners=[PrometheusMetrics(registry=registry)])
    delivered: list[Order] = []
    listener = Told() if isinstance(client, AsyncFoxReload) else None
    with caplog.at_level(logging.WARNING, logger="foxpoll.buy"):
        purchase = run_buy(client, items=PUBG, note={"player_id": "P-7781"},
                           deliver=delivered.append, listener=listener)

    orphan, bought = sim.order_ids()
    assert sim.count(*CREATE) == 2
    assert purchase.outcome is PurchaseOutcome.DELIVERED
    assert purchase.order_id == bought
    assert [o.id for o in delivered] == [bought]
    assert paid(sim) == [bought]  # the order whose create may have happened: never
    body = {"items": [{"itemId": "product_pubg_660", "quantity": 1,
                       "note": {"player_id": "P-7781"}}], "isMock": False}
    assert purchase.possible_orphans == (body,)
    assert "P-7781" not in repr(purchase)
    assert registry.get_sample_value("foxpoll_possible_orphans_total") == 1.0
    if listener is not None:
        assert [e.request_body for e in told] == [body]
    [warning] = [r for r in caplog.records if r.name == "foxpoll.buy"]
    assert warning.levelno == logging.WARNING
    assert "product_pubg_660" in warning.getMessage()
    assert "player_id" in warning.getMessage()
    assert "P-7781" not in warning.getMessage()
    assert "creating again, once" in warning.getMessage()
    # The orphan stays unpaid, and expires: it costs nothing and delivers nothing.
    assert sim.status_of(orphan) == "active"
    clock.advance(OrderScript().payment_expires_after)
    with sim.client() as reader:
        expired = reader.orders.get(orphan)
    assert (expired.status, expired.cancel_reason) == (OrderStatus.CANCELLED,
                                                       "payment_expiration")


def test_two_ambiguous_creates_raise_and_pay_nothing(
    sim: FakeFoxReload, make_client: Any
) -> None:
    sim.inject(Fault(FaultKind.TIMEOUT, method="POST", path="/api/orders/", times=2,
                     after_handling=True, delay=60.0))
    registry = CollectorRegistry()
    client = make_client(listeners=[PrometheusMetrics(registry=registry)], timeout=5.0)
    with pytest.raises(AmbiguousOrderError) as raised:
        run_buy(client)
    assert raised.value.request_body == {"items": [{"itemId": "product_steam_10",
                                                    "quantity": 1}], "isMock": False}
    assert sim.count(*CREATE) == 2
    assert paid(sim) == []
    assert registry.get_sample_value("foxpoll_possible_orphans_total") == 2.0


def test_an_ambiguous_payment_is_not_resent_and_the_order_tells(
    sim: FakeFoxReload, make_client: Any, queue: SQLiteRecoveryQueue
) -> None:
    # The payment is taken, then its answer is lost: pay() reads the order, sees it paid.
    sim.inject(Fault(FaultKind.SERVER_ERROR, method="POST", path="/api/orders/*/pay",
                     after_handling=True, status=502))
    delivered: list[Order] = []
    purchase = run_buy(make_client(recovery_queue=queue), deliver=delivered.append)
    assert purchase.outcome is PurchaseOutcome.DELIVERED
    assert paid(sim) == [purchase.order_id] == [o.id for o in delivered]


def test_a_payment_that_stays_unknown_is_waited_on_not_resent(
    sim: FakeFoxReload, make_client: Any, queue: SQLiteRecoveryQueue,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Lost before the server took it, and the order could not be read after: unknown.
    sim.inject(Fault(FaultKind.DISCONNECT, method="POST", path="/api/orders/*/pay"),
               Fault(FaultKind.SERVER_ERROR, method="GET", path="/api/orders/*", times=4))
    policy = WaitPolicy(backoff=Fixed(120.0), max_attempts=20)
    with caplog.at_level(logging.WARNING, logger="foxpoll.buy"):
        purchase = run_buy(make_client(recovery_queue=queue, max_retries=0), policy=policy)
    assert any("payment's outcome is unknown" in r.getMessage() for r in caplog.records)
    # Never paid: the wait watched it expire.
    assert len(paid(sim)) == 1
    assert (purchase.outcome, purchase.reason) == (PurchaseOutcome.CANCELLED,
                                                   "payment_expiration")


def test_a_deliver_that_raises_is_re_raised_with_the_claim_released(
    sim: FakeFoxReload, make_client: Any, queue: SQLiteRecoveryQueue
) -> None:
    store, publisher = MemoryDedupStore(), MemoryPublisher()

    def broken(order: Order) -> None:
        raise ConnectionError("the mail server is down")

    with pytest.raises(ConnectionError, match="mail server"):
        run_buy(make_client(recovery_queue=queue), deliver=broken, store=store,
                publisher=publisher)
    [order_id] = sim.order_ids()
    record = store.get(order_id)
    assert record is not None
    assert record.state is DeliveryState.RELEASED
    assert publisher.events == []
    job = queue.get(order_id)  # the worker delivers it after delivery_grace
    assert job is not None
    assert (job.state, job.reason) == (JobState.QUEUED, "delivery")


def test_note_fills_the_items_without_one(sim: FakeFoxReload) -> None:
    items = [{"itemId": "product_pubg_660"},
             {"itemId": "product_pubg_660", "note": {"player_id": "B"}}]
    with sim.client() as client:
        client.buy(items, note={"player_id": "A"}, deliver=lambda order: None,
                   store=MemoryDedupStore())
    [create] = [r for r in sim.requests if (r.method, r.path) == CREATE]
    assert [i["note"] for i in create.json["items"]] == [{"player_id": "A"},
                                                         {"player_id": "B"}]


@pytest.mark.parametrize("what", ["deliver", "publisher"])
def test_the_blocking_client_refuses_an_async_deliver_before_buying(
    sim: FakeFoxReload, what: str
) -> None:
    """Found only after the wait, an async callback would leave an order paid and
    completed with nothing to deliver it (and, without a recovery queue, no one to)."""
    store = MemoryDedupStore()

    async def deliver(order: Order) -> None:
        raise AssertionError("never called")

    class AsyncPublisher:
        async def publish(self, event: Any) -> str:
            raise AssertionError("never called")

    kwargs: dict[str, Any] = (
        {"deliver": deliver} if what == "deliver"
        else {"deliver": lambda order: None, "publisher": AsyncPublisher()})
    with sim.client() as client, pytest.raises(TypeError, match=r"AsyncFoxReload\.buy"):
        client.buy(STEAM, store=store, **kwargs)
    assert sim.order_ids() == []  # nothing created, so nothing paid


def test_a_publisher_that_fails_after_the_codes_went_out_does_not_deliver_them_twice(
    sim: FakeFoxReload, caplog: pytest.LogCaptureFixture,
) -> None:
    store = MemoryDedupStore()
    delivered: list[str] = []

    class Down:
        def publish(self, event: Any) -> str:
            raise ConnectionError("events server down")

    with sim.client() as client:
        purchase = client.buy(STEAM, deliver=lambda order: delivered.append(order.id),
                              store=store, publisher=Down())
        record = store.get(purchase.order_id)
        assert record is not None
        assert record.state is DeliveryState.DELIVERED  # recorded: no one delivers again
    assert purchase.outcome is PurchaseOutcome.DELIVERED
    assert delivered == [purchase.order_id]
    assert "completion event was not published" in caplog.text


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"items": {"itemId": "product_steam_10"}}, TypeError),
    ({"items": []}, ValueError),
    ({"note": "player=1"}, TypeError),
    ({"policy": 30}, TypeError),
    ({"deliver": "send"}, TypeError),
])
def test_bad_arguments_are_refused_before_anything_is_bought(
    sim: FakeFoxReload, kwargs: dict[str, Any], error: type[Exception]
) -> None:
    with sim.client() as client, pytest.raises(error):
        run_buy(client, **kwargs)
    assert sim.requests == []


# -- foxpoll buy -----------------------------------------------------------------------


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeFoxReload]:
    sim = FakeFoxReload(clock=SystemClock(), default_script=OrderScript.complete(after=0.3))
    with SimulatorServer(sim) as server:
        monkeypatch.setenv("FOXRELOAD_API_KEY", sim.api_key)
        monkeypatch.setenv("FOXRELOAD_BASE_URL", server.url)
        yield sim


def command(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    return main(list(argv), out=out), out.getvalue()


def test_the_buy_command_prints_the_order_once_with_a_line_per_poll(
    api: FakeFoxReload, capsys: pytest.CaptureFixture[str]
) -> None:
    code, shown = command("buy", "--item", "product_pubg_660:2", "--note", "player_id=77",
                          "--timeout", "30")
    assert code == 0
    [order_id] = api.order_ids()
    assert shown.splitlines()[0] == f"order {order_id}: completed"
    assert "2 x product_pubg_660" in shown
    assert shown.count("<redacted: --show-codes>") == 2
    [create] = [r for r in api.requests if (r.method, r.path) == CREATE]
    assert create.json["items"] == [{"itemId": "product_pubg_660", "quantity": 2,
                                     "note": {"player_id": "77"}}]
    assert paid(api) == [order_id]
    err = capsys.readouterr().err
    assert "  poll 1: " in err
    assert "not paid yet" not in err


def test_the_buy_command_exits_3_on_a_failed_order_and_4_on_a_stall(
    api: FakeFoxReload, capsys: pytest.CaptureFixture[str]
) -> None:
    api.script_next(OrderScript.fail(after=0.2), OrderScript.stall())
    code, shown = command("buy", "--item", "product_steam_10", "--timeout", "30")
    assert code == 3
    assert "failed" in shown.splitlines()[0]
    assert "error: supplier rejected the request" in shown
    code, shown = command("buy", "--item", "product_steam_10", "--timeout", "1")
    assert (code, shown) == (4, "")
    stalled = api.order_ids()[1]
    err = capsys.readouterr().err
    assert f"may still complete: foxpoll orders wait {stalled}" in err
    assert paid(api) == api.order_ids()


def test_the_buy_command_says_when_a_create_was_ambiguous(
    api: FakeFoxReload, capsys: pytest.CaptureFixture[str]
) -> None:
    api.inject(Fault.server_error_after_create())
    code, _ = command("buy", "--item", "product_steam_10", "--timeout", "30")
    assert code == 0
    _, bought = api.order_ids()
    assert paid(api) == [bought]
    assert "it was never paid and expires unpaid" in capsys.readouterr().err
