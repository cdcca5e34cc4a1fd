"""Metrics fed as listeners of the waits, and the completion-rate alert checked with promtool."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from foxpoll import PollAttempt, WaitResult
from foxpoll.metrics import OpenTelemetryMetrics, PrometheusMetrics
from foxpoll.polling import Listener, WaitPolicy
from foxpoll.testing import FakeFoxReload, Fault, FaultKind, OrderScript

DOCS = Path(__file__).parent.parent / "docs"
STEAM = [{"itemId": "product_steam_10"}]


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def run_mixed_waits(sim: FakeFoxReload, *listeners: Any) -> None:
    sim.script_next(OrderScript.complete(after=30), OrderScript.complete(after=90),
                    OrderScript.fail(after=10), OrderScript.cancel(after=5), OrderScript.stall())
    # each failed request is a failed poll
    with sim.client(max_retries=0, listeners=listeners) as client:
        ids = []
        for _ in range(5):
            order = client.orders.create(items=STEAM)
            client.orders.pay(order.id)
            ids.append(order.id)
        sim.inject(Fault(FaultKind.RATE_LIMIT, method="GET", retry_after=1),
                   Fault(FaultKind.SERVER_ERROR, method="GET"))
        results = list(client.wait_many(ids, policy=WaitPolicy(max_attempts=10)))
    assert len(results) == 5


def test_prometheus_counts_what_the_waits_did(sim: FakeFoxReload) -> None:
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry=registry)
    run_mixed_waits(sim, metrics)
    assert value(registry, "foxpoll_orders_started_total") == 5
    assert value(registry, "foxpoll_orders_completed_total") == 2
    assert value(registry, "foxpoll_orders_failed_total") == 2
    assert value(registry, "foxpoll_orders_stalled_total") == 1
    polls = sum(value(registry, "foxpoll_poll_requests_total", outcome=o)
                for o in ("ok", "not_found", "rate_limited", "error"))
    assert polls == sim.count("GET")
    assert value(registry, "foxpoll_poll_requests_total", outcome="rate_limited") == 1
    assert value(registry, "foxpoll_poll_requests_total", outcome="error") == 1
    assert value(registry, "foxpoll_order_completion_seconds_count") == 2
    total = value(registry, "foxpoll_order_completion_seconds_sum")
    assert 30 + 90 <= total <= 30 + 90 + 2 * 40  # each seen within one capped wait


def test_no_order_ids_in_labels(sim: FakeFoxReload) -> None:
    registry = CollectorRegistry()
    run_mixed_waits(sim, PrometheusMetrics(registry=registry))
    for family in registry.collect():
        for sample in family.samples:
            assert set(sample.labels) <= {"outcome", "le"}
            for order_id in sim.order_ids():
                assert order_id not in str(sample.labels)


def test_importing_registers_nothing_globally() -> None:
    from prometheus_client import REGISTRY

    names = {family.name for family in REGISTRY.collect()}
    assert not any(name.startswith("foxpoll") for name in names)


class Mine(Listener):
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.polls: list[PollAttempt] = []
        self.finished: list[WaitResult] = []
        self.started_when_told: list[float] = []

    def on_poll(self, attempt: PollAttempt) -> None:
        self.polls.append(attempt)
        if attempt.attempt == 1:
            self.started_when_told.append(value(self.registry, "foxpoll_orders_started_total"))

    def on_finish(self, result: WaitResult) -> None:
        self.finished.append(result)


def test_listeners_are_told_in_the_order_the_client_was_given_them(
    sim: FakeFoxReload,
) -> None:
    registry = CollectorRegistry()
    mine = Mine(registry)
    run_mixed_waits(sim, PrometheusMetrics(registry=registry), mine)
    assert len(mine.polls) == sim.count("GET")
    assert len(mine.finished) == 5
    assert mine.started_when_told == [1, 2, 3, 4, 5]  # the metrics had counted it first
    assert value(registry, "foxpoll_orders_started_total") == 5


async def test_async_listener_methods_are_awaited_after_the_metrics(
    sim: FakeFoxReload,
) -> None:
    registry = CollectorRegistry()
    seen: list[tuple[bool, float]] = []

    class Finished(Listener):
        async def on_finish(self, result: WaitResult) -> None:
            seen.append((result.ok, value(registry, "foxpoll_orders_completed_total")))

    metrics = PrometheusMetrics(registry=registry)
    async with sim.async_client(listeners=[metrics]) as client:
        order = await client.orders.create(items=STEAM)
        await client.orders.pay(order.id)
        await client.wait_for_completion(order.id, listener=Finished())
    assert seen == [(True, 1)]  # the client's listener was told first, then the call's


class FakeInstrument:
    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: list[tuple[float, dict[str, str] | None]] = []

    def add(self, amount: float, attributes: dict[str, str] | None = None) -> None:
        self.calls.append((amount, attributes))

    def record(self, amount: float, attributes: dict[str, str] | None = None) -> None:
        self.calls.append((amount, attributes))


class FakeMeter:
    def __init__(self) -> None:
        self.instruments: dict[str, FakeInstrument] = {}

    def create_counter(self, name: str, **_: Any) -> FakeInstrument:
        return self.instruments.setdefault(name, FakeInstrument(name))

    create_histogram = create_counter


def test_opentelemetry_uses_the_api_meter(sim: FakeFoxReload) -> None:
    meter = FakeMeter()
    run_mixed_waits(sim, OpenTelemetryMetrics(meter=meter))
    counts = {name: sum(a for a, _ in i.calls) for name, i in meter.instruments.items()
              if name != "foxpoll.order.completion"}
    assert counts["foxpoll.orders.started"] == 5
    assert counts["foxpoll.orders.completed"] == 2
    assert counts["foxpoll.orders.failed"] == 2
    assert counts["foxpoll.orders.stalled"] == 1
    assert counts["foxpoll.poll.requests"] == sim.count("GET")
    assert len(meter.instruments["foxpoll.order.completion"].calls) == 2
    outcomes = {attrs["outcome"] for _, attrs in meter.instruments["foxpoll.poll.requests"].calls
                if attrs}
    assert outcomes == {"ok", "rate_limited", "error"}


def throttled_budget(sim: FakeFoxReload) -> Any:
    """A learned budget after a poll loop that met two 429 storms and waited for permits."""
    from foxpoll.backoff import Fixed
    from foxpoll.ratelimit import RateLimit

    limit = RateLimit(60, adaptive=True, clock=sim.clock)
    sim.script_next(OrderScript.complete(after=60))
    with sim.client(rate_limit=limit) as client:
        order = client.orders.create(items=STEAM)
        client.orders.pay(order.id)
        sim.inject(Fault(FaultKind.RATE_LIMIT, method="GET", retry_after=5))
        sim.inject(Fault(FaultKind.RATE_LIMIT, method="GET", retry_after=5))
        client.wait_for_completion(order.id,
                                   policy=WaitPolicy(backoff=Fixed(0.2), max_attempts=1000))
    return limit


def test_prometheus_reports_the_budget_s_throttling(sim: FakeFoxReload) -> None:
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry=registry)
    limit = throttled_budget(sim)
    metrics.track(limit, budget="key-1")
    assert value(registry, "foxpoll_rate_limit_throttled_total", budget="key-1") == 2
    assert value(registry, "foxpoll_rate_limit_waits_total", budget="key-1") == limit.waits > 0
    rate = value(registry, "foxpoll_rate_limit_per_minute", budget="key-1")
    assert rate == pytest.approx(limit.per_minute)
    assert rate < 60  # learned down from the ceiling by the 429s


def test_opentelemetry_reports_the_budget_s_throttling(sim: FakeFoxReload) -> None:
    observed: dict[str, Any] = {}

    class ObservingMeter(FakeMeter):
        def create_observable_counter(self, name: str, callbacks: list[Any],
                                      **_: Any) -> None:
            observed[name] = callbacks[0]

        create_observable_gauge = create_observable_counter

    metrics = OpenTelemetryMetrics(meter=ObservingMeter())
    limit = throttled_budget(sim)
    metrics.track(limit)
    [throttled] = observed["foxpoll.rate_limit.throttled"](None)
    assert (throttled.value, throttled.attributes) == (2, {"budget": "default"})
    assert observed["foxpoll.rate_limit.waits"](None)[0].value == limit.waits
    assert observed["foxpoll.rate_limit.rate"](None)[0].value == limit.per_minute


def test_opentelemetry_default_meter_needs_only_the_api() -> None:
    metrics = OpenTelemetryMetrics()  # the API's no-op meter until an SDK is configured
    metrics.on_poll(PollAttempt("o", 1, 0.0, "ok"))


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        message = "promtool is not installed (Debian package 'prometheus')"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return found


def test_alert_rules_are_valid() -> None:
    result = subprocess.run([promtool(), "check", "rules", "alerts.yml"], cwd=DOCS,  # noqa: S603
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 rules found" in result.stdout


def test_alert_rule_unit_tests_pass() -> None:
    result = subprocess.run([promtool(), "test", "rules", "alerts_test.yml"],  # noqa: S603
                            cwd=DOCS, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_alert_uses_the_metric_names_foxpoll_exports() -> None:
    rules = (DOCS / "alerts.yml").read_text()
    registry = CollectorRegistry()
    PrometheusMetrics(registry=registry)
    exported = {s.name for f in registry.collect() for s in f.samples}
    exported |= {f.name + "_total" for f in registry.collect()}
    for name in ("foxpoll_orders_completed_total", "foxpoll_orders_stalled_total"):
        assert name in rules
        assert name in exported
