"""``foxpoll demo``: the whole job on the embedded defaults, against the in-process simulator.

Five orders are bought and paid; one loop waits for all of them with a live table (status,
attempt, next poll, elapsed). Completed orders are delivered exactly once through a SQLite
dedup store, and each terminal order publishes an event. One order stalls: it goes to the
recovery queue, and a recovery worker re-checks it until it completes and delivers it. No
service, no key. Timings are shortened so the demo runs in about half a minute;
``--virtual`` runs it on virtual time, at once.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import attrs

from ._clock import Clock, SystemClock
from .backoff import ExponentialJitter
from .dedup.sqlite import SQLiteDedupStore
from .delivery import deliver_once
from .events.base import OrderEvent
from .events.memory import MemoryPublisher
from .models import Order
from .polling import Listener, PollAttempt, StatusChange, WaitPolicy, WaitResult
from .ratelimit import RateLimit
from .recovery.base import RecoveryPolicy
from .recovery.sqlite import SQLiteRecoveryQueue
from .recovery.worker import RecoveryWorker
from .testing import FakeClock, FakeFoxReload, Fault, FaultKind, OrderScript

__all__ = ["run_demo"]

PLAN = (  # product, note, script
    ("product_steam_10", None, OrderScript.complete(after=3)),
    ("product_pubg_660", {"player_id": "5123"}, OrderScript.complete(after=8)),
    ("product_esim_eu_5gb", None, OrderScript.complete(after=13)),
    ("product_steam_50", None, OrderScript.fail(after=5, error="supplier out of stock")),
    ("product_steam_10", None, OrderScript.stall()),
)
BUDGET = 60  # requests a minute: the demo's key is on a small tier
BACKOFF = ExponentialJitter(base=1.0, factor=1.5, cap=4.0, jitter=0.3, poll_at_start=False)
WAIT = WaitPolicy(backoff=BACKOFF, max_attempts=6)
RECOVERY = RecoveryPolicy(max_attempts=6,
                          backoff=ExponentialJitter(base=1.0, factor=2.0, cap=4.0, jitter=0.2))


@attrs.define
class Row:
    order_id: str
    product: str
    status: str = "active"
    attempt: int = 0
    next_poll_at: float | None = None
    elapsed: float = 0.0  # final, once done; until then the table counts it live
    result: str = "waiting"
    started_at: float = 0.0
    done: bool = False


def _mask(code: Any) -> str:
    text = code.get("code", "") if isinstance(code, dict) else str(code)
    return text[:4] + "-****" if text else "****"


class Display:
    """A live rich table on a terminal; plain lines elsewhere (or without rich)."""

    def __init__(self, rows: dict[str, Row], clock: Callable[[], float], out: TextIO,
                 live: bool, budget: Callable[[], str] = str) -> None:
        self.rows, self.clock, self.out, self.budget = rows, clock, out, budget
        self._live: Any = None
        if live:
            try:
                from rich.console import Console
                from rich.live import Live
            except ImportError:
                return
            self._live = Live(get_renderable=self.table, refresh_per_second=8,
                              console=Console(file=out), transient=False)

    def table(self) -> Any:
        from rich.table import Table

        table = Table(title="foxpoll demo: waiting without webhooks", caption=self.budget())
        # Fixed widths: the table must not jump when a result or a status gets longer.
        for column, width in (("order", 8), ("product", 19), ("status", 10), ("poll", 4),
                              ("next poll", 9), ("elapsed", 7), ("result", 38)):
            table.add_column(column, min_width=width, max_width=width, no_wrap=True,
                             overflow="ellipsis")
        now = self.clock()
        for row in self.rows.values():
            countdown = ("" if row.next_poll_at is None
                         else f"{max(0.0, row.next_poll_at - now):4.1f}s")
            elapsed = row.elapsed if row.done else now - row.started_at
            table.add_row(row.order_id[:8], row.product, row.status, str(row.attempt),
                          countdown, f"{elapsed:5.1f}s", row.result)
        return table

    def say(self, message: str) -> None:
        if self._live is not None:
            self._live.console.print(message)
        else:
            print(message, file=self.out)

    def __enter__(self) -> Display:
        if self._live is not None:
            self._live.__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._live is not None:
            self._live.__exit__(*exc_info)


def run_demo(*, virtual: bool = False, live: bool = True, out: TextIO,
             db: Path | None = None) -> dict[str, int]:
    """Run the demo; return its tallies."""
    clock: Clock = FakeClock(epoch=time.time()) if virtual else SystemClock()
    sim = FakeFoxReload(clock=clock)
    with tempfile.TemporaryDirectory() as tmp:
        path = db or Path(tmp) / "foxpoll.db"
        store = SQLiteDedupStore(path, clock=clock)
        queue = SQLiteRecoveryQueue(path, policy=RECOVERY, clock=clock)
        publisher = MemoryPublisher()
        rows: dict[str, Row] = {}
        delivered: list[str] = []

        def send_codes(order: Order) -> str:
            delivered.append(order.id)
            publisher.publish(OrderEvent.from_order(order, now=clock.time()))
            return f"sent {len(order.codes)} code(s)"

        class Progress(Listener):
            """Moves each order's row as its wait goes."""

            def on_poll(self, attempt: PollAttempt) -> None:
                row = rows[attempt.order_id]
                row.attempt = attempt.attempt
                row.next_poll_at = (None if attempt.next_poll_in is None
                                    else clock.monotonic() + attempt.next_poll_in)

            def on_status_change(self, change: StatusChange) -> None:
                rows[change.order_id].status = change.order.status.value
                if display._live is None:
                    display.say(f"  {change.order_id[:8]} {change.previous or 'new'} -> "
                                f"{change.order.status} after {change.elapsed:.1f}s")

        limit = RateLimit(per_minute=BUDGET, clock=clock)

        def budget() -> str:
            now = clock.monotonic()
            used = sum(1 for r in sim.requests if r.at > now - 60)
            return (f"budget {limit.per_minute:.0f} requests/min: {used} used in the last "
                    f"minute, {limit.throttles} x 429, {limit.waits} waits for a permit")

        # One 429 while polling: the whole budget pauses for its Retry-After.
        sim.inject(Fault(FaultKind.RATE_LIMIT, method="GET", retry_after=2))
        with sim.client(recovery_queue=queue, rate_limit=limit, wait_policy=WAIT,
                        listeners=[Progress()]) as client, \
                Display(rows, clock.monotonic, out, live and not virtual, budget) as display:
            display.say("buying 5 orders from the FoxReload simulator...")
            sim.script_next(*(script for _, _, script in PLAN))
            ids = []
            for product, note, _ in PLAN:
                order = client.orders.create(items=[{"itemId": product, "note": note}])
                client.orders.pay(order.id)
                rows[order.id] = Row(order.id, product, "paid", started_at=clock.monotonic())
                ids.append(order.id)

            for result in client.wait_many(ids):
                _finish(result, rows[result.order_id], store, send_codes, publisher, clock)
                display.say(f"  {result.order_id[:8]}: {rows[result.order_id].result}")

            stalled = next((r.order_id for r in rows.values() if r.result.startswith("stalled")),
                           None)
            if stalled is not None:
                display.say(f"recovery: {stalled[:8]} is queued; FoxReload finishes it later")
                sim.settle(stalled, after=4)
                worker = RecoveryWorker(client, queue, store, on_completed=send_codes, lease=30)
                row = rows[stalled]
                row.result = "in the recovery queue"
                while (job := queue.get(stalled)) is not None and job.state.value == "queued":
                    row.status = job.last_status or row.status
                    row.next_poll_at = clock.monotonic() + max(0.0, job.due_at - clock.time())
                    clock.sleep(max(0.0, job.due_at - clock.time()))
                    worker.run_pending()
                    row.attempt += 1
                assert job is not None
                row.status, row.next_poll_at = job.note or job.state.value, None
                row.elapsed, row.done = clock.monotonic() - row.started_at, True
                row.result = (f"recovered after {job.attempts} re-checks, delivered"
                              if job.note == "completed" else f"{job.state.value} after recovery")
                display.say(f"  {stalled[:8]}: {row.result}")

            again = sum(deliver_once(client.orders.get(oid), send_codes, store,
                                     clock=clock).delivered
                        for oid in list(dict.fromkeys(delivered)))
            tallies = {
                "orders": len(ids),
                "delivered": len(set(delivered)),
                "deliveries": len(delivered),
                "redelivered": again,
                "events": len(publisher.unique),
                "dead_letters": len(queue.list_dead()),
                "requests": sim.count(),
            }
        display.say(budget())
        display.say(
            f"done: {tallies['delivered']} orders delivered exactly once, in "
            f"{tallies['deliveries']} deliveries; delivering them all again sent "
            f"{tallies['redelivered']} more. {tallies['events']} events published, "
            f"{tallies['dead_letters']} dead letters, {tallies['requests']} API requests."
        )
        store.close()
        queue.close()
    return tallies


def _finish(result: WaitResult, row: Row, store: SQLiteDedupStore,
            send: Callable[[Order], str], publisher: MemoryPublisher, clock: Clock) -> None:
    row.next_poll_at = None
    # Since payment, as the live count was; a stalled order's goes on through recovery.
    row.elapsed, row.done = clock.monotonic() - row.started_at, not result.stalled
    if result.ok:
        order = result.unwrap()
        deliver_once(order, send, store, clock=clock)
        row.status = "completed"
        row.result = f"delivered {', '.join(_mask(c) for c in order.codes)}"
    elif result.stalled:
        row.result = "stalled -> recovery queue"
    elif result.order is not None:
        row.status = result.order.status.value
        publisher.publish(OrderEvent.from_order(result.order, now=clock.time()))
        reason = result.order.items[0].error if result.order.items else None
        row.result = f"{result.order.status}: {reason or 'no codes'}"
    else:
        row.result = f"error: {result.error}"
