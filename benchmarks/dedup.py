"""deliver_once against the raw driver doing the same two round trips, per backend, one run.

For each backend, the raw side runs exactly the statements foxpoll's happy path sends (the
claim, then the complete), on the same server, with the same driver and connection
reuse; foxpoll runs ``deliver_once`` with a no-op deliver. The two sides alternate, op by
op, so a machine's drift affects both alike. Printed: median and p99 latency,
operations per second, and the ratio of foxpoll's median to the raw one (the target is
1.25x or less on PostgreSQL and Redis).

Then the contention case: 64 worker threads share a queue in which each of 1,000 orders
appears 4 times; every worker delivers what it takes. Every order must be delivered
exactly once.

Needs PostgreSQL and Redis on localhost (as in the tests). Run: ``nox -s bench`` or
``python benchmarks/dedup.py [--ops 2000]``.
"""

from __future__ import annotations

import argparse
import contextlib
import queue
import random
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from foxpoll import DeliveryInProgress, Order, OrderStatus, deliver_once
from foxpoll.dedup import DedupStore
from foxpoll.dedup._sql import POSTGRES, SQLITE
from foxpoll.models import OrderItem

POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
REDIS_URL = "redis://127.0.0.1:6379/0"


def order(order_id: str) -> Order:
    return Order(id=order_id, status=OrderStatus.COMPLETED,
                 items=(OrderItem("p", 1, external_data=("CODE",)),))


def timed(operation: Callable[[str], Any], count: int) -> list[float]:
    latencies = []
    for _ in range(count):
        order_id = str(uuid.uuid4())
        start = time.perf_counter()
        operation(order_id)
        latencies.append(time.perf_counter() - start)
    return latencies


def interleaved(first: Callable[[str], Any], second: Callable[[str], Any],
                count: int) -> tuple[list[float], list[float]]:
    """Time the two sides alternately, op by op, so drift on a busy machine hits both."""
    a: list[float] = []
    b: list[float] = []
    for _ in range(count):
        a += timed(first, 1)
        b += timed(second, 1)
    return a, b


def summary(latencies: list[float]) -> tuple[float, float, float]:
    ordered = sorted(latencies)
    median = statistics.median(ordered)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return median, p99, len(ordered) / sum(ordered)


# -- the raw sequences: the same two statements, through the same drivers --------------


def raw_postgres(table: str) -> tuple[Callable[[str], Any], Callable[[], None]]:
    import psycopg

    sql = POSTGRES.statements(table)
    conn = psycopg.connect(POSTGRES_URL, autocommit=True)

    def run(order_id: str) -> None:
        token = uuid.uuid4().hex
        conn.execute(sql.claim, {"order_id": order_id, "token": token, "lease": 60}).fetchall()
        conn.execute(sql.complete, {"order_id": order_id, "token": token,
                                    "payload_hash": "h", "receipt": None}).fetchall()

    return run, conn.close


def raw_sqlite(path: str, table: str) -> tuple[Callable[[str], Any], Callable[[], None]]:
    import sqlite3

    sql = SQLITE.statements(table)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)

    def run(order_id: str) -> None:
        token = uuid.uuid4().hex
        for statement, params in (
            (sql.claim, {"order_id": order_id, "token": token, "lease": 60}),
            (sql.complete, {"order_id": order_id, "token": token, "payload_hash": "h",
                            "receipt": None}),
        ):
            db.execute("BEGIN IMMEDIATE")
            db.execute(statement, {**params, "now": time.time()}).fetchall()
            db.execute("COMMIT")

    return run, db.close


def raw_redis(prefix: str) -> tuple[Callable[[str], Any], Callable[[], None]]:
    import redis

    from foxpoll.dedup.redis import _CLAIM, _COMPLETE, THIRTY_DAYS

    client = redis.Redis.from_url(REDIS_URL)
    claim, complete = client.register_script(_CLAIM), client.register_script(_COMPLETE)

    def keys(order_id: str) -> list[str]:
        return [f"{prefix}delivery:{order_id}", *(f"{prefix}deliveries:{s}" for s in
                                                  ("claimed", "released", "delivered"))]

    def run(order_id: str) -> None:
        token = uuid.uuid4().hex
        claim(keys=keys(order_id), args=[order_id, token, 60])
        complete(keys=keys(order_id), args=[order_id, token, "h", "", THIRTY_DAYS])

    return run, client.close


# -- the stores ------------------------------------------------------------------------


def stores(tmp: Path) -> dict[str, tuple[DedupStore, Callable[[str], Any], Callable[[], None]]]:
    import psycopg
    from psycopg_pool import ConnectionPool

    from foxpoll.dedup import PostgresDedupStore, RedisDedupStore, SQLiteDedupStore

    table = f"foxpoll_bench_{uuid.uuid4().hex[:8]}"
    pool = ConnectionPool(POSTGRES_URL, min_size=1, max_size=64, kwargs={"autocommit": True})
    pg = PostgresDedupStore(pool, table=table)
    pg.create_schema()
    prefix = f"foxpoll-bench-{uuid.uuid4().hex[:8]}:"
    sqlite_path = str(tmp / "bench.db")
    pg_raw, pg_close = raw_postgres(table)
    redis_raw, redis_close = raw_redis(prefix)
    sqlite_raw, sqlite_close = raw_sqlite(sqlite_path, "foxpoll_deliveries")
    sqlite_store = SQLiteDedupStore(sqlite_path)

    def drop_pg() -> None:
        pg_close()
        pool.close()
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {table}")

    def drop_redis() -> None:
        redis_close()
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        for key in client.scan_iter(f"{prefix}*"):
            client.delete(key)
        client.close()

    return {
        "PostgreSQL": (pg, pg_raw, drop_pg),
        "Redis": (RedisDedupStore(REDIS_URL, key_prefix=prefix), redis_raw, drop_redis),
        "SQLite": (sqlite_store, sqlite_raw, sqlite_close),
    }


def contention(store: DedupStore, workers: int = 64, orders: int = 1000,
               copies: int = 4) -> tuple[float, int, int]:
    """(jobs per second, orders delivered twice or more, orders never delivered)."""
    ids = [str(uuid.uuid4()) for _ in range(orders)]
    jobs: queue.Queue[str] = queue.Queue()
    for order_id in random.sample(ids * copies, orders * copies):
        jobs.put(order_id)
    delivered: dict[str, int] = dict.fromkeys(ids, 0)
    lock = threading.Lock()

    def deliver(o: Order) -> None:
        with lock:
            delivered[o.id] += 1

    def worker() -> None:
        while True:
            try:
                order_id = jobs.get_nowait()
            except queue.Empty:
                return
            # DeliveryInProgress: another worker has it right now, the point of the lease
            with contextlib.suppress(DeliveryInProgress):
                deliver_once(order(order_id), deliver, store)

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    twice = sum(1 for n in delivered.values() if n > 1)
    never = sum(1 for n in delivered.values() if n == 0)
    return orders * copies / elapsed, twice, never


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ops", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        backends = stores(Path(tmp))
        try:
            print(f"{args.ops} deliveries per side, sequential, localhost\n")
            print(f"{'backend':<11}{'side':<9}{'median':>10}{'p99':>10}{'ops/s':>9}"
                  f"{'foxpoll / raw':>15}")
            for name, (store, raw, _) in backends.items():
                timed(raw, 100)  # warm both up: connections, prepared scripts, caches
                timed(lambda i, s=store: deliver_once(order(i), lambda o: None, s), 100)
                raw_times, fox_times = interleaved(
                    raw, lambda i, s=store: deliver_once(order(i), lambda o: None, s), args.ops)
                raw_stats, fox_stats = summary(raw_times), summary(fox_times)
                for side, (median, p99, rate) in (("raw", raw_stats), ("foxpoll", fox_stats)):
                    ratio = f"{fox_stats[0] / raw_stats[0]:.2f}x" if side == "foxpoll" else ""
                    print(f"{name:<11}{side:<9}{median * 1e3:>8.3f}ms{p99 * 1e3:>8.3f}ms"
                          f"{rate:>9.0f}{ratio:>15}")
            print("\ncontention: 64 workers, 1,000 orders, each queued 4 times")
            print(f"{'backend':<11}{'jobs/s':>9}{'delivered twice':>17}{'never':>7}")
            for name, (store, _, _) in backends.items():
                rate, twice, never = contention(store)
                print(f"{name:<11}{rate:>9.0f}{twice:>17}{never:>7}")
        finally:
            for _, _, close in backends.values():
                close()


if __name__ == "__main__":
    main()
