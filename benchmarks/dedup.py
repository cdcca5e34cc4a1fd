"""deliver_once against the driver's own two statements, per backend, in one run.

The budget: ``deliver_once`` costs at most **2x** the driver's own two statements on one
pooled connection. That is the *raw* side here: the driver sends exactly what foxpoll's
happy path sends (the claim, then the complete), on the same server and table, through
the driver's own pool: on PostgreSQL one ``psycopg_pool`` connection taken for the
delivery and given back after its two statements; on Redis the two scripts as redis-py's
``register_script`` sends them, each on the connection its client's pool lends; on
SQLite (which has no pool) one connection, each statement in ``BEGIN IMMEDIATE`` as the
store runs it. foxpoll runs ``deliver_once`` with a no-op deliver, with its defaults
(renewal included).

On PostgreSQL and Redis a *lean* side shows what a careful hand-written version would
send: two round trips that read nothing back but a flag (``RETURNING 1`` and a row count;
two small scripts on one fenced key), with no record, index or retention; on Redis a
``set-nx`` side is leaner still (a plain ``SET NX PX``, then a script). They are for
reading, not part of the budget.

Every side gets a fresh completed order, built before its timer starts. The sides take
turns, op by op, so a machine's drift affects all alike. Printed: each side's median and
p99 latency and operations per second, then per backend foxpoll's median over the raw
side's, against the budget. The run exits with status 1 when a backend is over it.

Then the contention case: 64 worker threads share a queue in which each of 1,000 orders
appears 4 times; every worker delivers what it takes. Every order must be delivered
exactly once.

Needs PostgreSQL and Redis on localhost (as in the tests). Run: ``nox -s bench`` or
``python benchmarks/dedup.py [--ops 4000] [--only NAME] [--no-contention]``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import random
import statistics
import sys
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


Side = Callable[[Order], Any]


def timed(operation: Side, count: int) -> list[float]:
    """Latencies of ``operation`` on fresh completed orders, each built before its timer."""
    latencies = []
    for _ in range(count):
        subject = order(str(uuid.uuid4()))
        start = time.perf_counter()
        operation(subject)
        latencies.append(time.perf_counter() - start)
    return latencies


def interleaved_all(sides: list[Side], count: int) -> list[list[float]]:
    """Time the sides in turn, op by op, so drift on a busy machine hits all alike; in a
    shuffled order each round, so that no side always runs after the same one (what ran
    just before changes a round trip by tens of microseconds here)."""
    times: list[list[float]] = [[] for _ in sides]
    rounds = random.Random(0)
    order_of_turns = list(range(len(sides)))
    for _ in range(count):
        rounds.shuffle(order_of_turns)
        for index in order_of_turns:
            times[index] += timed(sides[index], 1)
    return times


def summary(latencies: list[float]) -> tuple[float, float, float]:
    ordered = sorted(latencies)
    median = statistics.median(ordered)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return median, p99, len(ordered) / sum(ordered)


# -- the raw sequences: the same two statements, through the same drivers --------------


def postgres_pool() -> Any:
    """A pool like the store's: autocommit connections, one kept open."""
    from psycopg_pool import ConnectionPool

    return ConnectionPool(POSTGRES_URL, min_size=1, max_size=4, kwargs={"autocommit": True})


def raw_postgres(table: str) -> tuple[Side, Callable[[], None]]:
    """foxpoll's claim and complete, on one connection from the pool per delivery."""
    sql = POSTGRES.statements(table)
    pool = postgres_pool()

    def run(subject: Order) -> None:
        order_id = subject.id
        token = uuid.uuid4().hex
        with pool.connection() as conn:
            conn.execute(sql.claim, {"order_id": order_id, "token": token, "lease": 60}
                         ).fetchall()
            conn.execute(sql.complete, {"order_id": order_id, "token": token,
                                        "payload_hash": "h", "receipt": None}).fetchall()

    return run, pool.close


def raw_sqlite(path: str, table: str) -> tuple[Side, Callable[[], None]]:
    import sqlite3

    sql = SQLITE.statements(table)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)

    def run(subject: Order) -> None:
        order_id = subject.id
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


def raw_redis(prefix: str) -> tuple[Side, Callable[[], None]]:
    import redis

    from foxpoll.dedup.redis import _CLAIM, _COMPLETE, THIRTY_DAYS

    client = redis.Redis.from_url(REDIS_URL)
    claim, complete = client.register_script(_CLAIM), client.register_script(_COMPLETE)

    def keys(order_id: str) -> list[str]:
        return [f"{prefix}delivery:{order_id}", *(f"{prefix}deliveries:{s}" for s in
                                                  ("claimed", "released", "delivered"))]

    def run(subject: Order) -> None:
        order_id = subject.id
        token = uuid.uuid4().hex
        claim(keys=keys(order_id), args=[order_id, token, 60, THIRTY_DAYS])
        complete(keys=keys(order_id), args=[order_id, token, "h", "", THIRTY_DAYS])

    return run, client.close


# -- the lean sequences: what a careful hand-written claim-then-complete would send -----


def lean_postgres(table: str) -> tuple[Side, Callable[[], None]]:
    """The same table and pooling, but nothing read back: a claim that returns one
    column, a complete judged by its row count."""
    pool = postgres_pool()
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

    def run(subject: Order) -> None:
        order_id = subject.id
        token = uuid.uuid4().hex
        with pool.connection() as conn:
            won = conn.execute(claim, {"o": order_id, "t": token}).fetchone()
            assert won is not None
            assert conn.execute(complete, {"o": order_id, "t": token, "h": "h"}).rowcount == 1

    return run, pool.close


#: The lean completion: the token still owns the key, then the key says delivered.
LEAN_COMPLETE = ("if redis.call('GET', KEYS[1]) == ARGV[1] then "
                 "return redis.call('SET', KEYS[1], 'delivered') end return false")


def lean_redis(prefix: str, *, set_nx: bool = False) -> tuple[Side, Callable[[], None]]:
    """Two small scripts on one fenced key: a claim that takes a free or expired key, a
    completion that checks the token (no record fields, no state indexes, no retention).
    With ``set_nx``, leaner still: the claim a plain ``SET NX PX``."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    script = client.register_script(
        "return redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) and 1 or 0")
    complete = client.register_script(LEAN_COMPLETE)

    def run(subject: Order) -> None:
        token = uuid.uuid4().hex
        key = f"{prefix}lean:{subject.id}"
        assert script(keys=[key], args=[token, 60_000]) == 1
        assert complete(keys=[key], args=[token])

    def run_set_nx(subject: Order) -> None:
        token = uuid.uuid4().hex
        key = f"{prefix}setnx:{subject.id}"
        assert client.set(key, token, nx=True, px=60_000)
        assert complete(keys=[key], args=[token])

    if set_nx:
        return run_set_nx, client.close
    return run, client.close


# -- the stores ------------------------------------------------------------------------


def stores(tmp: Path) -> dict[str, tuple[DedupStore, Side, Callable[[], None]]]:
    import psycopg
    from psycopg_pool import ConnectionPool

    from foxpoll.dedup import PostgresDedupStore, RedisDedupStore, SQLiteDedupStore

    table = f"foxpoll_bench_{uuid.uuid4().hex[:8]}"
    # max_size 64: the contention run's workers each hold a connection for a call
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
    redis_set_nx, redis_set_nx_close = lean_redis(prefix, set_nx=True)
    LEAN["PostgreSQL"] = {"lean": pg_lean}
    LEAN["Redis"] = {"lean": redis_lean, "set-nx": redis_set_nx}

    def drop_pg_all() -> None:
        pg_lean_close()
        drop_pg()

    def drop_redis_all() -> None:
        redis_lean_close()
        redis_set_nx_close()
        drop_redis()

    return {
        "PostgreSQL": (pg, pg_raw, drop_pg_all),
        "Redis": (RedisDedupStore(REDIS_URL, key_prefix=prefix), redis_raw, drop_redis_all),
        "SQLite": (sqlite_store, sqlite_raw, sqlite_close),
    }


#: Per backend, the lean hand-written sequences, by name, where there are some.
LEAN: dict[str, dict[str, Side]] = {}


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


#: deliver_once's median may be at most this many times the raw side's.
BUDGET = 2.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ops", type=int, default=4000)
    parser.add_argument("--only", metavar="NAME", action="append",
                        help="run only this backend (PostgreSQL, Redis, SQLite); repeatable")
    parser.add_argument("--no-contention", action="store_true",
                        help="skip the 64-worker contention run")
    args = parser.parse_args()
    over: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        backends = stores(Path(tmp))
        try:
            load = ", ".join(f"{n:.2f}" for n in os.getloadavg())
            print(f"{args.ops} deliveries per side, sequential, localhost, "
                  f"{os.cpu_count()} CPUs, load average {load}\n")
            print(f"{'backend':<11}{'side':<10}{'median':>10}{'p99':>10}{'ops/s':>9}"
                  f"{'foxpoll / it':>14}")
            chosen = {name: backend for name, backend in backends.items()
                      if not args.only or name in args.only}
            ratios: dict[str, tuple[float, float]] = {}
            for name, (store, raw, _) in chosen.items():
                def fox(subject: Order, s: DedupStore = store) -> Any:
                    return deliver_once(subject, lambda o: None, s)

                runs = {"raw": raw, **LEAN.get(name, {}), "foxpoll": fox}
                for run in runs.values():
                    timed(run, 100)  # warm up: connections, prepared statements, scripts
                times = interleaved_all(list(runs.values()), args.ops)
                stats = {side: summary(t) for side, t in zip(runs, times, strict=True)}
                for side, (median, p99, rate) in stats.items():
                    ratio = "" if side == "foxpoll" else f"{stats['foxpoll'][0] / median:.2f}x"
                    print(f"{name:<11}{side:<10}{median * 1e3:>8.3f}ms{p99 * 1e3:>8.3f}ms"
                          f"{rate:>9.0f}{ratio:>14}")
                ratios[name] = (stats["raw"][0], stats["foxpoll"][0])
            print(f"\nbudget: deliver_once at most {BUDGET:g}x the driver's own two "
                  "statements on one pooled connection (raw)")
            print(f"{'backend':<11}{'raw':>10}{'foxpoll':>10}{'foxpoll / raw':>15}")
            for name, (raw_median, fox_median) in ratios.items():
                ratio = fox_median / raw_median
                verdict = "within budget" if ratio <= BUDGET else "OVER BUDGET"
                if ratio > BUDGET:
                    over.append(name)
                print(f"{name:<11}{raw_median * 1e3:>8.3f}ms{fox_median * 1e3:>8.3f}ms"
                      f"{ratio:>14.2f}x  {verdict}")
            if not args.no_contention:
                print("\ncontention: 64 workers, 1,000 orders, each queued 4 times")
                print(f"{'backend':<11}{'jobs/s':>9}{'delivered twice':>17}{'never':>7}")
                for name, (store, _, _) in chosen.items():
                    rate, twice, never = contention(store)
                    print(f"{name:<11}{rate:>9.0f}{twice:>17}{never:>7}")
        finally:
            for _, _, close in backends.values():
                close()
    if over:
        sys.exit(f"over the {BUDGET:g}x budget: {', '.join(over)}")


if __name__ == "__main__":
    main()
