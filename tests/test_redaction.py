"""The API key and delivered codes never show in reprs, messages or logs."""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterator

import pytest

from foxpoll import APIError, FoxPollError
from foxpoll.ratelimit import RateLimit
from foxpoll.testing import FakeClock, FakeFoxReload, Fault, FaultKind, OrderScript

from .conftest import API_KEY


def _held(root: object) -> Iterator[object]:
    """Every foxpoll object ``root`` holds, directly or through other foxpoll objects and
    plain containers (a tuple of headers is allowed to hold the key; a foxpoll object
    must not show it)."""
    seen: set[int] = set()
    todo = [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        ours = type(obj).__module__.startswith("foxpoll")
        if ours:
            yield obj
        if ours or isinstance(obj, (dict, list, tuple, set, frozenset)):
            todo.extend(gc.get_referents(obj))


def test_client_repr_hides_the_key(sim: FakeFoxReload) -> None:
    with sim.client(rate_limit=RateLimit(per_minute=100)) as client:
        clone = client.with_options(timeout=1, api_key=API_KEY)
        shown = [client, clone, client.orders, client.products, client.categories,
                 clone.orders, client.clock, client.rate_limit]
        held = [*_held(client), *_held(clone)]
        assert len(held) > len(shown)  # the walk reached what the clients keep inside
        for obj in (*shown, *held):
            assert API_KEY not in repr(obj), type(obj)
            assert API_KEY not in str(obj), type(obj)


def test_nothing_secret_in_logs_errors_or_reprs(
    sim: FakeFoxReload, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    sim.script_next(OrderScript.complete(after=2))
    errors: list[FoxPollError] = []
    with sim.client() as client:
        order = client.orders.create(items=[{"itemId": "product_pubg_660",
                                             "note": {"player_id": "PLAYER-99"}}])
        client.orders.pay(order.id)
        clock.advance(5)
        sim.inject(Fault(FaultKind.RATE_LIMIT, retry_after=1), Fault(FaultKind.SERVER_ERROR))
        done = client.orders.get(order.id)
        sim.inject(Fault(FaultKind.SERVER_ERROR, times=10))
        try:
            client.orders.get(order.id)
        except APIError as exc:
            errors.append(exc)
        sim.inject(Fault.server_error_after_create())
        try:
            client.orders.create(items=[{"itemId": "product_steam_10"}])
        except APIError as exc:
            errors.append(exc)
    codes = [str(c["code"]) for c in done.codes] + [str(c["pin"]) for c in done.codes]  # type: ignore[index]
    assert codes
    assert len(errors) == 2
    assert caplog.records  # retries were logged
    visible = [caplog.text, repr(done), str(done), *map(str, errors), *map(repr, errors)]
    for text in visible:
        assert API_KEY not in text
        assert "PLAYER-99" not in text
        for code in codes:
            assert code not in text


def test_a_password_in_the_base_url_never_reaches_a_client_or_its_repr() -> None:
    from foxpoll import AsyncFoxReload, FoxReload

    for cls in (FoxReload, AsyncFoxReload):
        with pytest.raises(ValueError, match="user name or password") as refused:
            cls("key", base_url="https://proxy-user:hunter2@proxy.test/x")
        assert "hunter2" not in str(refused.value)
        client = cls(API_KEY, base_url="https://proxy.test/x")
        assert repr(client) == f"{cls.__name__}(base_url='https://proxy.test/x', " \
                               "api_key='<redacted>')"


def test_orders_json_hides_notes_and_codes_unless_asked(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    import io
    import json

    from foxpoll import SystemClock
    from foxpoll.cli import main
    from foxpoll.testing import OrderScript, SimulatorServer

    sim = FakeFoxReload(clock=SystemClock(), default_script=OrderScript.complete(after=0))
    with SimulatorServer(sim) as server:
        monkeypatch.setenv("FOXRELOAD_API_KEY", sim.api_key)
        monkeypatch.setenv("FOXRELOAD_BASE_URL", server.url)
        with sim.client() as client:
            order = client.orders.create(items=[{"itemId": "product_pubg_660",
                                                 "note": {"player_id": "5123987"}}])
            client.orders.pay(order.id)
        out = io.StringIO()
        assert main(["orders", "get", order.id, "--json"], out=out) == 0
        assert "5123987" not in out.getvalue()
        item = json.loads(out.getvalue())["items"][0]
        assert item["note"] == item["externalData"] == "<redacted: --show-codes>"
        out = io.StringIO()
        main(["orders", "get", order.id, "--json", "--show-codes"], out=out)
        assert "5123987" in out.getvalue()
