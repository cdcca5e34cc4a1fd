"""deliver_once against the raw driver doing the same two round trips, per backend, one run.

For each backend, the raw side runs exactly the statements foxpoll's happy path sends (the
claim, then the complete), on the same server, with the same driver and connection
reuse. On PostgreSQL and Redis a lean side runs what a careful hand-written version
would: two round trips that read nothing back but a flag (``RETURNING 1`` and a row
count; ``SET NX PX`` and a three-line script), with no record, index or retention.
foxpoll runs ``deliver_once`` with a no-op deliver. The sides alternate, op by op, so a
machine's drift affects all alike. Printed: median and p99 latency, operations per
second, and foxpoll's median over each side's (the target is 1.25x or less of the lean
side on PostgreSQL and Redis).

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


def interleaved_all(sides: list[Callable[[str], Any]], count: int) -> list[list[float]]:
    """:func:`interleaved` for any number of sides."""
    times: list[list[float]] = [[] for _ in sides]
    for _ in range(count):
        for index, side in enumerate(sides):
            times[index] += timed(side, 1)
    return times


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
        claim(keys=keys(order_id), args=[order_id, token, 60, THIRTY_DAYS])
        complete(keys=keys(order_id), args=[order_id, token, "h", "", THIRTY_DAYS])

    return run, client.close


# -- the lean sequences: what a careful hand-written claim-then-complete would send -----


def lean_postgres(table: str) -> tuple[Callable[[str], Any], Callable[[], None]]:
    """The same table, but nothing read back: a claim that returns one column, a complete
    judged by its row count."""
    import psycopg

    conn = psycopg.connect(POSTGRES_URL, autocommit=True)
    now = POSTGRES.now
    claim = (f"INSERT INTO {table} (order_id, state, token, lease_until, attempts, "
             f"created_at, updated_at) VALUES (%(o)s, 'claimed', %(t)s, {now} + 60, 1, "
             f"{now}, {now}) ON CONFLICT (order_id) DO UPDATE SET state = 'claimed', "
             f"token = excluded.token, lease_until = excluded.lease_until, "
             f"attempts = {table}.attempts + 1, updated_at = excluded.updated_at "
             f"WHERE {table}.state = 'released' OR ({table}.state = 'claimed' AND "
             f"{table}.lease_until <= excluded.updated_at) RETURNING 1")
    complete = (f"UPDATE {table} SET state = 'delivered', payload_hash = %(h)s, "
                f"lease_until = NULL, delivered_at = {now}, updated_at = {now} "
                f"WHERE order_id = %(o)s AND token = %(t)s AND state = 'claimed'")

    def run(order_id: str) -> None:
        token = uuid.uuid4().hex
        won = conn.execute(claim, {"o": order_id, "t": token}).fetchone()
        assert won is not None
        assert conn.execute(complete, {"o": order_id, "t": token, "h": "h"}).rowcount == 1

    return run, conn.close


def lean_redis(prefix: str) -> tuple[Callable[[str], Any], Callable[[], None]]:
    """A fenced key and nothing else: ``SET NX PX`` to claim, a three-line script to
    complete (no record fields, no state indexes, no retention)."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    complete = client.register_script(
        "if redis.call('GET', KEYS[1]) == ARGV[1] then "
        "return redis.call('SET', KEYS[1], 'delivered') end return false")

    def run(order_id: str) -> None:
        token = uuid.uuid4().hex
        key = f"{prefix}lean:{order_id}"
        assert client.set(key, token, nx=True, px=60_000)
        assert complete(keys=[key], args=[token])

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

    pg_lean, pg_lean_close = lean_postgres(table)
    redis_lean, redis_lean_close = lean_redis(prefix)
    LEAN["PostgreSQL"], LEAN["Redis"] = pg_lean, redis_lean

    def drop_pg_all() -> None:
        pg_lean_close()
        drop_pg()

    def drop_redis_all() -> None:
        redis_lean_close()
        drop_redis()

    return {
        "PostgreSQL": (pg, pg_raw, drop_pg_all),
        "Redis": (RedisDedupStore(REDIS_URL, key_prefix=prefix), redis_raw, drop_redis_all),
        "SQLite": (sqlite_store, sqlite_raw, sqlite_close),
    }


#: Per backend, the lean hand-written sequence, where there is one.
LEAN: dict[str, Callable[[str], Any]] = {}


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
                  f"{'foxpoll / it':>14}")
            for name, (store, raw, _) in backends.items():
                def fox(i: str, s: DedupStore = store) -> Any:
                    return deliver_once(order(i), lambda o: None, s)

                sides = {"raw": raw, "lean": LEAN.get(name), "foxpoll": fox}
                runs = {side: run for side, run in sides.items() if run is not None}
                for run in runs.values():
                    timed(run, 100)  # warm up: connections, prepared statements, scripts
                times = interleaved_all(list(runs.values()), args.ops)
                stats = {side: summary(t) for side, t in zip(runs, times, strict=True)}
                for side, (median, p99, rate) in stats.items():
                    ratio = "" if side == "foxpoll" else f"{stats['foxpoll'][0] / median:.2f}x"
                    print(f"{name:<11}{side:<9}{median * 1e3:>8.3f}ms{p99 * 1e3:>8.3f}ms"
                          f"{rate:>9.0f}{ratio:>14}")
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
