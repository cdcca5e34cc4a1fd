"""What watches cost: pay then wait, with and without a recovery queue, in one run.

Each side pays an order and waits for it (``poll_at_start=False``, as the quickstart
does) against the in-process simulator on virtual time, so the only real time spent is
foxpoll's own work, the simulator's and, on the watched side, the queue's writes: one at
pay, one when the wait ends. The two sides alternate order by order, so a machine's drift
hits both alike. Printed per queue engine: the median time per order of each side, their
ratio, the time the watch adds per order, and the writes counted per order.

Needs PostgreSQL on localhost for its row (as in the tests).
Run: ``nox -s bench`` or ``python benchmarks/watch.py [--orders 400]``.
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
from foxpoll.testing import FakeFoxReload, OrderScript

POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
BACKOFF = ExponentialJitter(poll_at_start=False)


def counting(queue: Any) -> tuple[Any, Counter[str]]:
    """Wrap the queue's write methods to count them."""
    writes: Counter[str] = Counter()
    for name in ("watch", "settle", "enqueue", "unwatch"):
        method = getattr(queue, name)

        def counted(*args: Any, _method: Any = method, _name: str = name, **kwargs: Any) -> Any:
            writes[_name] += 1
            return _method(*args, **kwargs)

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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--orders", type=int, default=400)
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
            import psycopg

            with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
                conn.execute(f"DROP TABLE IF EXISTS {table}")


if __name__ == "__main__":
    main()
