"""Metrics for alerting, fed as a listener of the client's waits: Prometheus or
OpenTelemetry.

Nothing is created at import time and no global state is kept: a metrics object owns its
instruments, in the registry (or meter) you give it, and is told of every wait of the
client it is given to::

    metrics = PrometheusMetrics(registry=my_registry)
    client = FoxReload(listeners=[metrics])

Instruments (no order ids as labels, so their number stays bounded):

====================================  ========================================================
``foxpoll_orders_started_total``      waits begun (counted at their first poll)
``foxpoll_orders_completed_total``    waits that ended with a completed order
``foxpoll_orders_failed_total``       waits that ended failed or cancelled
``foxpoll_orders_without_codes_total``  completed orders that carried no codes
``foxpoll_orders_stalled_total``      waits that ran out of attempts, errors or time
``foxpoll_poll_requests_total``       polls, by ``outcome``: ok, not_found, rate_limited, error
``foxpoll_order_completion_seconds``  histogram: wait start to the completed order being seen
``foxpoll_rate_limit_waits_total``    permits asked for and not yet given (the budget was
                                      short), by ``budget``; with :meth:`track`
``foxpoll_rate_limit_throttled_total``  429s received, by ``budget``
``foxpoll_rate_limit_per_minute``     the budget's rate now (the learned one, if adaptive)
``foxpoll_worker_errors_total``       failed rounds of a long-running loop, by ``component``
                                      (:meth:`~PrometheusMetrics.on_worker_error`)
``foxpoll_possible_orphans_total``    creates of ``buy()`` whose outcome was unknown: orders
                                      that may exist, never paid, and expire
                                      (:meth:`~PrometheusMetrics.on_possible_orphan`)
====================================  ========================================================

The alerts are in ``docs/alerts.yml``: the completion rate, completed / (completed +
stalled) over 10 minutes, below 99 %; and a worker whose rounds keep failing (an outage
of its queue, store or of the API) for 10 minutes.
"""

from __future__ import annotations

from typing import Any

from .errors import AmbiguousOrderError, OrderCancelled, OrderFailed
from .models import OrderStatus
from .polling import Listener, PollAttempt, WaitResult
from .ratelimit import BaseRateLimit

__all__ = ["COMPLETION_BUCKETS", "OpenTelemetryMetrics", "PrometheusMetrics"]

#: Seconds: most orders finish within a minute, some take minutes, stalls take ~20.
COMPLETION_BUCKETS = (1, 2, 5, 10, 20, 30, 45, 60, 90, 120, 300, 600, 1200, 1800, 3600)


class _ListenerMetrics(Listener):
    """What both backends share: which wait event moves which instrument."""

    def _started(self) -> None:
        raise NotImplementedError

    def _polled(self, outcome: str) -> None:
        raise NotImplementedError

    def _finished(self, kind: str, seconds: float | None) -> None:
        raise NotImplementedError

    def _without_codes(self) -> None:
        raise NotImplementedError

    def _worker_error(self, component: str) -> None:
        raise NotImplementedError

    def _possible_orphan(self) -> None:
        raise NotImplementedError

    def on_possible_orphan(self, error: AmbiguousOrderError) -> None:
        """Count a create whose outcome was unknown, which ``buy()`` never pays and
        followed with a fresh one: an order that may exist unpaid, until it expires.

        The clients call it on each of their listeners that has it. A steady rate means
        the API's creates time out: each such order may hold stock until it expires.

        Args:
            error: The create's :class:`~foxpoll.AmbiguousOrderError`; only counted.
        """
        self._possible_orphan()

    def on_worker_error(self, component: str, error: BaseException) -> None:
        """Count one failed round of a long-running loop that backs off and tries again.

        foxpoll's loops call it: the recovery worker (``component="recovery"``), the
        procrastinate dispatcher (``"dispatcher"``) and the event consumers (``"events"``).
        Your own loops may call it too, with a component name of their own: a fixed word,
        never an order id, so the number of series stays bounded.

        Args:
            component: Which loop failed.
            error: What it failed with; only its presence is counted.
        """
        self._worker_error(component)

    def on_poll(self, attempt: PollAttempt) -> None:
        """Count the poll (and, at the first, the wait)."""
        if attempt.attempt == 1:
            self._started()
        self._polled(attempt.outcome)

    def on_finish(self, result: WaitResult) -> None:
        """Count how the wait ended."""
        if result.order is not None and result.order.status is OrderStatus.COMPLETED \
                and not result.order.codes:
            self._without_codes()
        if result.ok:
            self._finished("completed", result.elapsed)
        elif result.stalled:
            self._finished("stalled", None)
        elif isinstance(result.error, (OrderFailed, OrderCancelled)) or (
            result.order is not None and result.order.is_terminal
        ):
            self._finished("failed", None)


class PrometheusMetrics(_ListenerMetrics):
    """The instruments in a Prometheus registry (``prometheus-client``, the ``prometheus``
    extra).

    Args:
        registry: Where to register; ``prometheus_client.REGISTRY`` when None. Create one
            ``PrometheusMetrics`` per registry.
    """

    def __init__(self, registry: Any = None) -> None:
        from prometheus_client import REGISTRY, Counter, Histogram

        registry = REGISTRY if registry is None else registry
        self.started = Counter("foxpoll_orders_started", "Waits for FoxReload orders begun.",
                               registry=registry)
        self.completed = Counter("foxpoll_orders_completed",
                                 "Waits that ended with a completed order.", registry=registry)
        self.failed = Counter("foxpoll_orders_failed",
                              "Waits that ended with a failed or cancelled order.",
                              registry=registry)
        self.stalled = Counter("foxpoll_orders_stalled",
                               "Waits that ran out of attempts, errors or time.",
                               registry=registry)
        self.poll_requests = Counter("foxpoll_poll_requests", "Polls of FoxReload orders.",
                                     ["outcome"], registry=registry)
        self.without_codes = Counter("foxpoll_orders_without_codes",
                                     "Completed orders that carried no codes.",
                                     registry=registry)
        self.completion_seconds = Histogram(
            "foxpoll_order_completion_seconds",
            "Seconds from the start of a wait to the completed order being seen.",
            buckets=COMPLETION_BUCKETS, registry=registry,
        )
        self.worker_errors = Counter(
            "foxpoll_worker_errors",
            "Failed rounds of foxpoll's long-running loops (each backs off and tries again).",
            ["component"], registry=registry)
        self.possible_orphans = Counter(
            "foxpoll_possible_orphans",
            "Creates whose outcome was unknown: orders that may exist unpaid, never paid.",
            registry=registry)
        self._registry = registry
        self._budgets: dict[str, BaseRateLimit] = {}

    def track(self, limit: BaseRateLimit, *, budget: str = "default") -> None:
        """Report a rate limit's throttling, read at every scrape."""
        if not self._budgets:
            self._registry.register(_BudgetCollector(self._budgets))
        self._budgets[budget] = limit

    def _started(self) -> None:
        self.started.inc()

    def _polled(self, outcome: str) -> None:
        self.poll_requests.labels(outcome=outcome).inc()

    def _without_codes(self) -> None:
        self.without_codes.inc()

    def _worker_error(self, component: str) -> None:
        self.worker_errors.labels(component=component).inc()

    def _possible_orphan(self) -> None:
        self.possible_orphans.inc()

    def _finished(self, kind: str, seconds: float | None) -> None:
        getattr(self, kind).inc()
        if seconds is not None:
            self.completion_seconds.observe(seconds)


class _BudgetCollector:
    """A Prometheus collector reading the budgets' own counters when scraped."""

    def __init__(self, budgets: dict[str, BaseRateLimit]) -> None:
        self.budgets = budgets

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        waits = CounterMetricFamily("foxpoll_rate_limit_waits",
                                    "Permits asked for while the budget was short.",
                                    labels=["budget"])
        throttled = CounterMetricFamily("foxpoll_rate_limit_throttled",
                                        "429 answers received.", labels=["budget"])
        rate = GaugeMetricFamily("foxpoll_rate_limit_per_minute",
                                 "The budget's rate now, in requests a minute.",
                                 labels=["budget"])
        for name, limit in self.budgets.items():
            waits.add_metric([name], limit.waits)
            throttled.add_metric([name], limit.throttles)
            rate.add_metric([name], limit.per_minute)
        return [waits, throttled, rate]


class OpenTelemetryMetrics(_ListenerMetrics):
    """The instruments on an OpenTelemetry meter (the API package only, the ``otel`` extra;
    your SDK decides where they go).

    Args:
        meter: The meter; ``opentelemetry.metrics.get_meter("foxpoll")`` when None.
    """

    def __init__(self, meter: Any = None) -> None:
        if meter is None:
            from opentelemetry import metrics

            meter = metrics.get_meter("foxpoll")
        self.started = meter.create_counter("foxpoll.orders.started", unit="{order}",
                                            description="Waits for FoxReload orders begun.")
        self.completed = meter.create_counter("foxpoll.orders.completed", unit="{order}",
                                              description="Waits ended completed.")
        self.failed = meter.create_counter("foxpoll.orders.failed", unit="{order}",
                                           description="Waits ended failed or cancelled.")
        self.stalled = meter.create_counter("foxpoll.orders.stalled", unit="{order}",
                                            description="Waits that stalled.")
        self.poll_requests = meter.create_counter("foxpoll.poll.requests", unit="{request}",
                                                  description="Polls of FoxReload orders.")
        self.without_codes = meter.create_counter(
            "foxpoll.orders.without_codes", unit="{order}",
            description="Completed orders that carried no codes.")
        self.completion_seconds = meter.create_histogram(
            "foxpoll.order.completion", unit="s",
            description="Seconds from the start of a wait to the completed order being seen.",
        )
        self.worker_errors = meter.create_counter(
            "foxpoll.worker.errors", unit="{round}",
            description="Failed rounds of foxpoll's long-running loops.")
        self.possible_orphans = meter.create_counter(
            "foxpoll.orders.possible_orphans", unit="{order}",
            description="Creates whose outcome was unknown: orders that may exist unpaid.")
        self._meter = meter

    def track(self, limit: BaseRateLimit, *, budget: str = "default") -> None:
        """Report a rate limit's throttling, observed at every collection."""
        from opentelemetry.metrics import Observation

        labels = {"budget": budget}
        self._meter.create_observable_counter(
            "foxpoll.rate_limit.waits", unit="{request}",
            callbacks=[lambda _: [Observation(limit.waits, labels)]],
            description="Permits asked for while the budget was short.")
        self._meter.create_observable_counter(
            "foxpoll.rate_limit.throttled", unit="{response}",
            callbacks=[lambda _: [Observation(limit.throttles, labels)]],
            description="429 answers received.")
        self._meter.create_observable_gauge(
            "foxpoll.rate_limit.rate", unit="{request}/min",
            callbacks=[lambda _: [Observation(limit.per_minute, labels)]],
            description="The budget's rate now.")

    def _started(self) -> None:
        self.started.add(1)

    def _polled(self, outcome: str) -> None:
        self.poll_requests.add(1, {"outcome": outcome})

    def _without_codes(self) -> None:
        self.without_codes.add(1)

    def _worker_error(self, component: str) -> None:
        self.worker_errors.add(1, {"component": component})

    def _possible_orphan(self) -> None:
        self.possible_orphans.add(1)

    def _finished(self, kind: str, seconds: float | None) -> None:
        getattr(self, kind).add(1)
        if seconds is not None:
            self.completion_seconds.record(seconds)
