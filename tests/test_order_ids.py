"""A response must be about the order asked for (issue 23, finding 1): every read, poll,
payment and recovery re-check of ``o1`` refuses an answer whose ``id`` is not exactly
``o1``, so no other order's codes are ever returned, delivered or recorded under a dedup
key. Over real sockets against ``HostileServer``'s wrong-id modes, and as a property of
``wait_for_completion`` against a server answering random ids, statuses and shapes."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from foxpoll import (
    AmbiguousOrderError,
    APIResponseValidationError,
    AsyncFoxReload,
    Fixed,
    FoxPollError,
    FoxReload,
    Order,
    OrderError,
    OrderMismatch,
    OrderStalled,
    OrderStatus,
    WaitPolicy,
    deliver_once,
    errors,
)
from foxpoll.dedup import DeliveryState, MemoryDedupStore
from foxpoll.recovery import JobState, RecoveryWorker, SQLiteRecoveryQueue
from foxpoll.testing import FakeClock, HostileServer, Hostility

KEY = "sk-live-ids-9d41"
WRONG_IDS = {Hostility.WRONG_ID: "SOMEONE-ELSES-ORDER", Hostility.WRONG_ID_CASE: "O1",
             Hostility.WRONG_ID_SPACE: "o1 "}
FAST = WaitPolicy(backoff=Fixed(0.01), max_attempts=20, max_errors=3)


@pytest.fixture
def server() -> Iterator[HostileServer]:
    with HostileServer() as hostile:
        yield hostile


def client_of(server: HostileServer, **options: Any) -> FoxReload:
    return FoxReload(KEY, base_url=server.url, max_retries=0, **options)


# -- the error ---------------------------------------------------------------------------


def test_the_error_names_both_ids_quoted_and_bounded() -> None:
    error = OrderMismatch(requested="o1", received="o1 ")
    assert isinstance(error, APIResponseValidationError)
    assert (error.requested, error.received) == ("o1", "o1 ")
    assert "'o1'" in str(error)
    assert "'o1 '" in str(error)
    huge = OrderMismatch(requested="o1", received="\x1b]0;pwned\x07" + "x" * 100_000)
    assert len(str(huge)) < 300
    assert "\x1b" not in str(huge)  # escaped, never sent raw to a terminal or a log
    assert errors.OrderMismatch is OrderMismatch


# -- orders.get and orders.pay -----------------------------------------------------------


@pytest.mark.parametrize("hostility", list(WRONG_IDS))
def test_get_refuses_an_answer_about_another_order(server: HostileServer,
                                                   hostility: Hostility) -> None:
    server.hostility = hostility
    with client_of(server) as client, pytest.raises(OrderMismatch) as info:
        client.orders.get("o1")
    assert (info.value.requested, info.value.received) == ("o1", WRONG_IDS[hostility])
    assert info.value.response is not None  # the caller can look at what came back
    assert [r.path for r in server.requests] == ["/api/orders/o1"]


async def test_async_get_refuses_an_answer_about_another_order(server: HostileServer) -> None:
    server.hostility = Hostility.WRONG_ID_CASE
    async with AsyncFoxReload(KEY, base_url=server.url, max_retries=0) as client:
        with pytest.raises(OrderMismatch):
            await client.orders.get("o1")
    server.hostility = Hostility.WELL_BEHAVED
    async with AsyncFoxReload(KEY, base_url=server.url) as client:
        assert (await client.orders.get("o1")).id == "o1"


def test_pay_answered_about_another_order_is_ambiguous(server: HostileServer) -> None:
    server.hostility = Hostility.WRONG_ID
    with client_of(server) as client, pytest.raises(AmbiguousOrderError) as info:
        client.orders.pay("o1")
    assert isinstance(info.value.cause, OrderMismatch)
    # Paid once, never resent; the order read again was about another order too.
    assert [(r.method, r.path) for r in server.requests] == [
        ("POST", "/api/orders/o1/pay"), ("GET", "/api/orders/o1")]
    assert isinstance(info.value.__context__, OrderMismatch)


def test_pay_answered_about_another_order_is_settled_by_the_real_one() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":  # the payment went through; its answer is not ours
            return httpx.Response(200, json=order_body("VICTIM-ORDER", "paid"))
        return httpx.Response(200, json=order_body("o1", "processing"))

    with FoxReload(KEY, base_url="https://api.test",
                   transport=httpx.MockTransport(answer)) as client:
        paid = client.orders.pay("o1")
    assert (paid.id, paid.status) == ("o1", OrderStatus.PROCESSING)


# -- waits -------------------------------------------------------------------------------


@pytest.mark.parametrize("hostility", list(WRONG_IDS))
def test_a_wait_never_returns_another_order(server: HostileServer,
                                            hostility: Hostility) -> None:
    server.hostility = hostility
    with client_of(server) as client, pytest.raises(OrderStalled) as info:
        client.wait_for_completion("o1", policy=FAST)
    # Passing errors on the error budget: the wait stalls, as it would on 5xx answers.
    assert info.value.order is None
    assert info.value.attempts == FAST.max_errors + 1  # type: ignore[operator]
    assert isinstance(info.value.__cause__, OrderMismatch)


async def test_async_wait_many_never_returns_another_order(server: HostileServer) -> None:
    server.hostility = Hostility.WRONG_ID
    async with AsyncFoxReload(KEY, base_url=server.url, max_retries=0) as client:
        results = [r async for r in client.wait_many(["o1", "o2"], policy=FAST)]
    assert sorted(r.order_id for r in results) == ["o1", "o2"]
    for result in results:
        assert result.order is None
        assert isinstance(result.error, OrderStalled)  # a stall: recovery takes it over
        assert isinstance(result.error.__cause__, OrderMismatch)


def test_wait_many_keeps_polling_past_a_wrong_answer(server: HostileServer) -> None:
    answers = iter([Hostility.WRONG_ID_SPACE, Hostility.WRONG_ID, Hostility.WELL_BEHAVED])

    class Switch:
        def on_poll(self, attempt: Any) -> None:
            server.hostility = next(answers, Hostility.WELL_BEHAVED)

    server.hostility = Hostility.WRONG_ID_CASE
    with client_of(server) as client:
        (result,) = client.wait_many(["o1"], policy=FAST, listener=Switch())
    assert result.error is None
    assert result.order is not None
    assert result.order.id == "o1"
    assert result.attempts == 4


# -- one dedup store, answers that differ in case and spaces -----------------------------


def deliveries(server: HostileServer, answers: list[Hostility]) -> list[Order]:
    """Read ``o1`` once per answer and deliver what came back through one dedup store."""
    store = MemoryDedupStore()
    delivered: list[Order] = []
    with client_of(server) as client:
        for hostility in answers:
            server.hostility = hostility
            try:
                order = client.orders.get("o1")
            except OrderMismatch:
                continue
            deliver_once(order, delivered.append, store)
    assert store.get("O1") is None
    assert store.get("o1 ") is None
    return delivered


def test_case_and_space_variants_are_never_delivered(server: HostileServer) -> None:
    variants = [Hostility.WRONG_ID_CASE, Hostility.WRONG_ID_SPACE, Hostility.WRONG_ID]
    assert deliveries(server, variants * 2) == []


def test_the_exact_id_among_its_variants_is_delivered_once(server: HostileServer) -> None:
    answers = [Hostility.WELL_BEHAVED, Hostility.WRONG_ID_CASE, Hostility.WRONG_ID_SPACE]
    delivered = deliveries(server, answers * 2)  # the issue: three deliveries of one order
    assert [o.id for o in delivered] == ["o1"]


# -- the recovery worker -----------------------------------------------------------------


def test_a_recheck_answered_with_another_order_delivers_nothing(tmp_path: Path) -> None:
    clock = FakeClock()
    delivered: list[Order] = []
    with HostileServer(Hostility.WRONG_ID, wrong_id="VICTIM-ORDER") as server, \
            SQLiteRecoveryQueue(tmp_path / "recovery.db", clock=clock) as queue, \
            client_of(server, clock=clock) as client:
        store = MemoryDedupStore(clock=clock)
        worker = RecoveryWorker(client, queue, store, on_completed=delivered.append)
        queue.enqueue("o1")
        assert worker.run_pending() == 1
        job = queue.get("o1")
        assert job is not None
        assert (job.state, job.attempts, job.last_status) == (JobState.QUEUED, 1, None)
        assert "OrderMismatch" in (job.last_error or "")
        assert "VICTIM-ORDER" in (job.last_error or "")
        assert delivered == []
        assert store.get("VICTIM-ORDER") is None
        assert store.get("o1") is None

        # The server comes back to its senses: o1 is delivered under its own key.
        server.hostility = Hostility.WELL_BEHAVED
        clock.advance(job.due_at - clock.time())
        assert worker.run_pending() == 1
    assert [o.id for o in delivered] == ["o1"]
    done = queue_job(tmp_path, clock)
    assert (done.state, done.note) == (JobState.DONE, "completed")
    assert store.get("o1").state is DeliveryState.DELIVERED  # type: ignore[union-attr]
    assert store.get("VICTIM-ORDER") is None


class LyingClient(FoxReload):
    """A client subclass whose ``orders.get`` hands back another order than the one asked
    for, as a partner's wrapper might: the worker must check the id itself."""

    def _bind_resources(self) -> None:
        super()._bind_resources()
        orders = self.orders

        class Lying:
            def get(self, order_id: str, **options: Any) -> Order:
                return attrs.evolve(orders.get(order_id, **options), id="VICTIM-ORDER")

        self.orders = Lying()  # type: ignore[assignment]


def test_a_recheck_delivers_only_the_order_of_its_job_whatever_the_client_returns(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    delivered: list[Order] = []
    with HostileServer() as server, \
            SQLiteRecoveryQueue(tmp_path / "recovery.db", clock=clock) as queue, \
            LyingClient(KEY, base_url=server.url, max_retries=0, clock=clock) as client, \
            caplog.at_level(logging.INFO, logger="foxpoll"):
        store = MemoryDedupStore(clock=clock)
        worker = RecoveryWorker(client, queue, store, on_completed=delivered.append)
        queue.enqueue("o1")
        assert worker.run_pending() == 1
        job = queue.get("o1")
    assert job is not None
    assert (job.state, job.attempts, job.last_status) == (JobState.QUEUED, 1, None)
    assert (job.last_error or "").startswith("OrderMismatch: asked for order 'o1', the "
                                             "response is about order 'VICTIM-ORDER'")
    assert delivered == []
    assert store.get("VICTIM-ORDER") is None
    assert store.get("o1") is None
    assert len(server.requests) == 1
    assert [r.levelno for r in caplog.records if "VICTIM-ORDER" in r.getMessage()] == [
        logging.WARNING]


# -- the log: one WARNING per wrong answer, ids quoted and bounded, never a code ---------

LONG_ID = "\x1b]0;pwn\x07" + "X" * 500


async def wrong_answer_then_right(path: str, server: HostileServer, tmp_path: Path) -> None:
    """Ask for ``o1`` by ``path``; the first answer is about :data:`LONG_ID`."""
    answers = iter([Hostility.WELL_BEHAVED])

    class Heal:
        def on_poll(self, attempt: Any) -> None:
            server.hostility = next(answers, Hostility.WELL_BEHAVED)

    if path == "get":
        with client_of(server) as client, pytest.raises(OrderMismatch):
            client.orders.get("o1")
    elif path == "wait":
        with client_of(server) as client:
            assert client.wait_for_completion("o1", policy=FAST, listener=Heal()).id == "o1"
    elif path == "async wait_many":
        async with AsyncFoxReload(KEY, base_url=server.url, max_retries=0) as aclient:
            results = [r async for r in aclient.wait_many(["o1"], policy=FAST,
                                                           listener=Heal())]
        assert [r.order.id for r in results if r.order is not None] == ["o1"]
    else:
        with SQLiteRecoveryQueue(tmp_path / "q.db") as queue, client_of(server) as client:
            queue.enqueue("o1")
            RecoveryWorker(client, queue, MemoryDedupStore(), on_completed=print).run_pending()


@pytest.mark.parametrize("path", ["get", "wait", "async wait_many", "recheck"])
async def test_a_wrong_answer_is_logged_once_at_warning_with_its_ids_bounded(
        path: str, server: HostileServer, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    server.hostility, server.wrong_id = Hostility.WRONG_ID, LONG_ID
    with caplog.at_level(logging.INFO, logger="foxpoll"):
        await wrong_answer_then_right(path, server, tmp_path)
    about = [r for r in caplog.records if "is about order" in r.getMessage()]
    assert [r.levelno for r in about] == [logging.WARNING]
    message = about[0].getMessage()
    assert message.startswith("asked for order 'o1', the response is about order "
                              "'\\x1b]0;pwn\\x07XXX")
    assert "\x1b" not in message
    assert len(message) < 200
    assert "HOSTILE-TEST-CODE" not in caplog.text


def queue_job(tmp_path: Path, clock: FakeClock) -> Any:
    with SQLiteRecoveryQueue(tmp_path / "recovery.db", clock=clock) as queue:
        return queue.get("o1")


# -- a property: random ids, statuses and shapes -----------------------------------------

ASKED = "o1"
IDS = st.one_of(st.just(ASKED),
                st.sampled_from(["O1", "o1 ", " o1", "o1\n", "o2", "", "o1/", "VICTIM"]),
                st.text(max_size=6))
STATUSES = st.sampled_from(["completed", "completed", "completed", "active", "paid",
                            "processing", "failed", "cancelled", "refunded"])


def order_body(order_id: Any, status: str, serial: int = 0) -> dict[str, Any]:
    """An order whose code names the id it was sent under, so a delivery shows whose
    codes went out."""
    code = f"CODE-{order_id!r}-{serial}"
    return {"id": order_id, "status": status,
            "items": [{"id": "i1", "itemId": "product_steam_10", "quantity": 1,
                       "status": status, "externalData": [code]}]}


@st.composite
def answers(draw: st.DrawFn) -> tuple[int, Any]:
    """One response: an order about a random id, or a body of another shape, or an
    error status."""
    kind = draw(st.sampled_from(["order"] * 6 + ["no-id", "id-not-str", "list", "not-json",
                                                 "status"]))
    if kind == "status":
        return draw(st.sampled_from([404, 429, 500, 503])), {"detail": "no"}
    if kind == "not-json":
        return 200, b"<html>"
    body = order_body(draw(IDS), draw(STATUSES), draw(st.integers(0, 3)))
    if kind == "no-id":
        del body["id"]
    elif kind == "id-not-str":
        body["id"] = draw(st.sampled_from([1, None, ["o1"], {"id": "o1"}]))
    elif kind == "list":
        return 200, [body]
    return 200, body


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(script=st.lists(answers(), min_size=1, max_size=15), raise_on_failure=st.booleans())
def test_a_wait_only_ever_delivers_the_codes_of_the_order_asked_for(
        script: list[tuple[int, Any]], raise_on_failure: bool) -> None:
    served = iter(script)
    asked_codes: set[str] = set()  # codes served in an answer that was about o1 exactly

    def answer(request: httpx.Request) -> httpx.Response:
        assert request.url.path == f"/api/orders/{ASKED}"
        status, body = next(served, script[-1])
        if isinstance(body, bytes):
            return httpx.Response(status, content=body)
        if isinstance(body, dict) and body.get("id") == ASKED:
            asked_codes.update(c for i in body["items"] for c in i["externalData"])
        return httpx.Response(status, content=json.dumps(body).encode())

    clock = FakeClock()
    store = MemoryDedupStore(clock=clock)
    delivered: list[Order] = []
    policy = WaitPolicy(backoff=Fixed(5.0), max_attempts=len(script) + 2,
                        max_errors=len(script) + 1,
                        not_found_grace=12.0)
    with FoxReload(KEY, base_url="https://api.test", transport=httpx.MockTransport(answer),
                   clock=clock, rng=random.Random(0), max_retries=1) as client:
        outcome: Order | FoxPollError
        try:
            outcome = client.wait_for_completion(ASKED, policy=policy,
                                                 raise_on_failure=raise_on_failure)
        except FoxPollError as ended:
            outcome = ended
        order = outcome.order if isinstance(outcome, OrderError) else outcome
        event(type(outcome).__name__ if isinstance(outcome, Exception) else "returned")
        if isinstance(order, Order):  # returned, or failed, cancelled or stalled: o1 only
            assert order.id == ASKED
            if outcome is order and order.status is OrderStatus.COMPLETED:
                deliver_once(order, delivered.append, store, clock=clock)
                event("delivered")
    assert [o.id for o in delivered] in ([], [ASKED])
    assert {str(c) for o in delivered for c in o.codes} <= asked_codes
