"""A completed order without codes: a top-up, or a supplier whose codes are late. Visible
either way (a warning and a metric), and refused where codes are required."""

from __future__ import annotations

import logging
import math

import pytest
from prometheus_client import CollectorRegistry

from foxpoll import CodesMissing, deliver_once
from foxpoll.backoff import Fixed
from foxpoll.dedup import MemoryDedupStore
from foxpoll.metrics import PrometheusMetrics
from foxpoll.polling import WaitPolicy
from foxpoll.testing import FakeClock, FakeFoxReload, OrderScript

from .test_recovery import paid


def test_by_default_a_codeless_order_is_returned_with_a_warning_and_counted(
    sim: FakeFoxReload, caplog: pytest.LogCaptureFixture
) -> None:
    order_id = paid(sim, OrderScript.complete(after=5, codes_after=math.inf))
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry=registry)
    with sim.client(listeners=[metrics]) as client, caplog.at_level(logging.WARNING):
        order = client.wait_for_completion(order_id)
    assert (order.status, order.codes) == ("completed", ())
    assert "completed with no codes" in caplog.text
    assert registry.get_sample_value("foxpoll_orders_without_codes_total") == 1
    assert registry.get_sample_value("foxpoll_orders_completed_total") == 1


def test_required_codes_that_come_late_are_waited_for(sim: FakeFoxReload,
                                                      clock: FakeClock) -> None:
    order_id = paid(sim, OrderScript.complete(after=5, codes_after=12))
    with sim.client() as client:
        order = client.wait_for_completion(order_id,
                                           policy=WaitPolicy(backoff=Fixed(5), polls_for_codes=5))
    assert len(order.codes) == 1
    gets = [r.at for r in sim.requests if r.method == "GET"]
    assert len(gets) >= 4  # completed at 5 s, codes at 17 s: polled on until they came


def test_required_codes_that_never_come_raise_codes_missing(sim: FakeFoxReload) -> None:
    order_id = paid(sim, OrderScript.complete(after=5, codes_after=math.inf))
    with sim.client() as client, pytest.raises(CodesMissing) as info:
        client.wait_for_completion(order_id,
                                   policy=WaitPolicy(backoff=Fixed(5), polls_for_codes=2))
    assert info.value.order.id == order_id
    gets = [r for r in sim.requests if r.method == "GET"]
    # The first poll saw it processing; then the one that saw it completed, and two more.
    assert len(gets) - 1 == 3


def test_wait_many_reports_codes_missing_as_a_result(sim: FakeFoxReload) -> None:
    missing = paid(sim, OrderScript.complete(after=5, codes_after=math.inf))
    fine = paid(sim, OrderScript.complete(after=5))
    with sim.client() as client:
        results = {r.order_id: r for r in client.wait_many([missing, fine],
                                                          policy=WaitPolicy(polls_for_codes=1))}
    assert isinstance(results[missing].error, CodesMissing)
    assert results[fine].ok


def test_deliver_once_can_refuse_a_codeless_order_without_claiming_it(
    sim: FakeFoxReload, caplog: pytest.LogCaptureFixture
) -> None:
    order_id = paid(sim, OrderScript.complete(after=0, codes_after=math.inf))
    store = MemoryDedupStore()
    with sim.client() as client:
        order = client.orders.get(order_id)
    with pytest.raises(CodesMissing):
        deliver_once(order, print, store, require_codes=True)
    assert store.get(order_id) is None  # a later attempt, with codes, may still claim it
    with caplog.at_level(logging.WARNING):
        assert deliver_once(order, lambda o: None, store).delivered  # a top-up
    assert "delivering it empty" in caplog.text


def test_polls_for_codes_is_a_whole_number(sim: FakeFoxReload) -> None:
    with pytest.raises(ValueError, match="polls_for_codes"):
        WaitPolicy(polls_for_codes=-1)
