"""The API key and delivered codes never show in reprs, messages or logs."""

from __future__ import annotations

import logging

import pytest

from foxpoll import APIError, FoxPollError
from foxpoll.testing import FakeClock, FakeFoxReload, Fault, FaultKind, OrderScript

from .conftest import API_KEY


def test_client_repr_hides_the_key(sim: FakeFoxReload) -> None:
    with sim.client() as client:
        assert API_KEY not in repr(client)
        assert API_KEY not in repr(client._runtime)
        assert API_KEY not in repr(client.with_options(timeout=1))


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
