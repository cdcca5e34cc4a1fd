"""What watches cost: pay then wait, with and without a recovery queue, in one run; then
what the heartbeat costs a process with 10, 100 and 1,000 orders in flight.

Each side pays an order and waits for it (``poll_at_start=False``, as the quickstart
does) against the in-process simulator on virtual time, so the only real time spent is
foxpoll's own work, the simulator's and, on the watched side, the queue's writes: one at
pay, one when the wait ends. The two sides alternate order by order, so a machine's drift
hits both alike. Printed per queue engine: the median time per order of each side, their
ratio, the time the watch adds per order, and the writes counted per order.

The heartbeat: one process pays N orders that complete after ten minutes and waits for
them all with ``wait_many``, on virtual time. Counted over the wait: the queue writes
per (virtual) minute, renewals apart, and the real time each renewal took.

Needs PostgreSQL on localhost for its rows (as in the tests).
Run: ``nox -s bench`` or ``python benchmarks/watch.py [--orders 400] [--in-flight 10 100]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from foxpoll.backoff import ExponentialJitter
from foxpoll.polling import WaitPolicy
from foxpoll.recovery import SQLiteRecoveryQueue
from foxpoll.testing import FakeClock, FakeFoxReload, OrderScript

POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
BACKOFF = ExponentialJitter(poll_at_start=False)


def counting(queue: Any, spent: dict[str, list[float]] | None = None
             ) -> tuple[Any, Counter[str]]:
    """Wrap the queue's write methods to count them (and time them into ``spent``)."""
    writes: Counter[str] = Counter()
    for name in ("watch", "settle", "enqueue", "unwatch", "renew"):
        method = getattr(queue, name)

        def counted(*args: Any, _method: Any = method, _name: str = name, **kwargs: Any) -> Any:
            writes[_name] += 1
            start = time.perf_counter()
            try:
                return _method(*args, **kwargs)
            finally:
                if spent is not None:
                    spent.setdefault(_name, []).append(time.perf_counter() - start)

        setattr(queue, name, counted)
    return queue, writes


def one_order(sim: FakeFoxReload, client: Any) -> float:
    sim.script_next(OrderScript.complete(after=12))
    order_id = client.orders.create(items=[{"itemId": "product_steam_10"}]).id
    start = time.perf_counter()
    client.orders.pay(order_id)
    client.wait_for_completion(order_id, policy=WaitPolicy(backoff=BACKOFF))
    return time.perf_counter() - start


def measure(name: str, queue: Any, orders: int) -> None:
    sim = FakeFoxReload(record_requests=False, default_script=OrderScript.complete(after=12))
    sim.balance = 10**12
    queue, writes = counting(queue)
    plain_times: list[float] = []
    watched_times: list[float] = []
    with sim.client() as plain, sim.client(recovery_queue=queue) as watched:
        for _ in range(20):  # warm both up
            one_order(sim, plain)
            one_order(sim, watched)
        writes.clear()
        for _ in range(orders):
            plain_times.append(one_order(sim, plain))
            watched_times.append(one_order(sim, watched))
    base, with_queue = statistics.median(plain_times), statistics.median(watched_times)
    per_order = {k: v / orders for k, v in sorted(writes.items())}
    print(f"{name:<22} {base * 1e3:>9.2f} ms {with_queue * 1e3:>11.2f} ms "
          f"{with_queue / base:>6.2f}x {(with_queue - base) * 1e3:>+10.2f} ms   {per_order}")


def heartbeat(name: str, queue: Any, clock: FakeClock, in_flight: int) -> None:
    sim = FakeFoxReload(clock=clock, record_requests=False)
    sim.balance = 10**12
    spent: dict[str, list[float]] = {}
    queue, writes = counting(queue, spent)
    sim.script_next(*[OrderScript.complete(after=600)] * in_flight)
    with sim.client() as plain, sim.client(recovery_queue=queue) as client:
        ids = [plain.orders.create(items=[{"itemId": "product_steam_10"}]).id
               for _ in range(in_flight)]
        for order_id in ids:
            client.orders.pay(order_id)
        writes.clear()
        spent.clear()
        began = clock.time()
        done = sum(r.ok for r in client.wait_many(ids, policy=WaitPolicy(backoff=BACKOFF)))
        minutes = (clock.time() - began) / 60
    assert done == in_flight
    renewals = spent.get("renew", [0.0])
    others = sum(v for k, v in writes.items() if k != "renew")
    print(f"{name:<22} {in_flight:>7} {writes['renew'] / minutes:>13.1f} "
          f"{others / minutes:>13.1f} {statistics.median(renewals) * 1e3:>10.2f} ms "
          f"{max(renewals) * 1e3:>8.2f} ms")


def heartbeats(sizes: list[int]) -> None:
    print("\nheartbeat: one process waiting on N orders (complete after 10 min), per "
          "virtual minute")
    print(f"{'queue':<22} {'orders':>7} {'renewals/min':>13} {'other w/min':>13} "
          f"{'renewal':>13} {'slowest':>11}")
    from foxpoll.recovery import PostgresRecoveryQueue

    for size in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            clock = FakeClock()
            with SQLiteRecoveryQueue(Path(tmp) / "q.db", clock=clock) as sqlite_queue:
                heartbeat("SQLiteRecoveryQueue", sqlite_queue, clock, size)
        table = f"bench_heartbeat_{uuid.uuid4().hex[:8]}"
        clock = FakeClock()
        with PostgresRecoveryQueue(POSTGRES_URL, table=table, clock=clock) as pg_queue:
            pg_queue.create_schema()
            try:
                heartbeat("PostgresRecoveryQueue", pg_queue, clock, size)
            finally:
                drop(table)


def drop(table: str) -> None:
    import psycopg

    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {table}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--orders", type=int, default=400)
    parser.add_argument("--in-flight", type=int, nargs="*", default=[10, 100, 1000])
    args = parser.parse_args()
    print(f"pay + wait per order, median of {args.orders}, the two sides interleaved")
    print(f"{'queue':<22} {'no queue':>12} {'with watches':>14} {'ratio':>7} "
          f"{'added':>13}   writes per order")
    with tempfile.TemporaryDirectory() as tmp, \
            SQLiteRecoveryQueue(Path(tmp) / "q.db") as sqlite_queue:
        measure("SQLiteRecoveryQueue", sqlite_queue, args.orders)
    from foxpoll.recovery import PostgresRecoveryQueue

    table = f"bench_recovery_{uuid.uuid4().hex[:8]}"
    with PostgresRecoveryQueue(POSTGRES_URL, table=table) as pg_queue:
        pg_queue.create_schema()
        try:
            measure("PostgresRecoveryQueue", pg_queue, args.orders)
        finally:
            drop(table)
    heartbeats(args.in_flight)


if __name__ == "__main__":
    main()
