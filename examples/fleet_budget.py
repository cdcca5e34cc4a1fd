"""Three processes, one API key, one budget; in each, threads sharing one client.

This script serves the FoxReload simulator over HTTP with a per-key limit of 120 requests
a minute, then starts three worker processes that share the key. Each buys orders and
waits for them, every request taking a permit from one ``SQLiteRateLimit`` file, so
together they stay inside the key's limit: no request is refused. (On many machines, use
``RedisRateLimit("redis://...")`` the same way.)

Inside a process, several threads share one ``FoxReload``, one budget and one dedup
store, each object built once when the process starts (docs/sharing.md says which
objects may be shared, and how): each thread buys, waits and delivers its own orders,
and every order is delivered exactly once.

Run: python examples/fleet_budget.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from foxpoll import (
    ExponentialJitter,
    FoxReload,
    Order,
    SystemClock,
    WaitPolicy,
    deliver_once,
)
from foxpoll.dedup import SQLiteDedupStore
from foxpoll.ratelimit import SQLiteRateLimit
from foxpoll.testing import FakeFoxReload, OrderScript, SimulatorServer

KEY_LIMIT = 120  # what the (simulated) API enforces, per minute and key
BUDGET = 100  # what the fleet allows itself: leave the server some headroom
WORKERS, THREADS, ORDERS_EACH = 3, 2, 2  # processes, threads in each, orders per thread


def send_codes(order: Order) -> None:
    """Hand the codes to the customer (here: nowhere; never print or log them)."""


def worker(sim_url: str, api_key: str, tmp: str) -> None:
    """One process of the fleet: threads buy, wait and deliver; report what the budget saw."""
    # Built once per process, after it started (never inherited across a fork), and shared
    # by all its threads: see docs/sharing.md.
    budget = SQLiteRateLimit(Path(tmp) / "budget.db", per_minute=BUDGET)
    store = SQLiteDedupStore(Path(tmp) / "dedup.db")
    policy = WaitPolicy(ExponentialJitter(base=0.5, factor=1.5, cap=2.0, poll_at_start=False))
    with FoxReload(api_key, base_url=sim_url, rate_limit=budget, wait_policy=policy) as client:

        def buy_wait_deliver(_: int) -> int:
            ids = []
            for _ in range(ORDERS_EACH):
                order = client.orders.create(items=[{"itemId": "product_steam_10"}])
                client.orders.pay(order.id)
                ids.append(order.id)
            results = list(client.wait_many(ids))
            return sum(deliver_once(r.order, send_codes, store).delivered
                       for r in results if r.ok and r.order is not None)

        with ThreadPoolExecutor(THREADS) as pool:
            delivered = sum(pool.map(buy_wait_deliver, range(THREADS)))
    store.close()
    budget.close()
    print(json.dumps({"delivered": delivered, "429s": budget.throttles, "waits": budget.waits}))


def main() -> None:
    sim = FakeFoxReload(clock=SystemClock(), rate_limit_per_minute=KEY_LIMIT,
                        default_script=OrderScript.complete(after=2))
    with tempfile.TemporaryDirectory() as tmp, SimulatorServer(sim) as server:
        workers = [subprocess.Popen(  # noqa: S603 - this very script
            [sys.executable, __file__, "worker", server.url, sim.api_key, tmp],
            stdout=subprocess.PIPE, text=True) for _ in range(WORKERS)]
        reports = [json.loads(w.communicate(timeout=120)[0]) for w in workers]
    for n, report in enumerate(reports):
        print(f"worker {n}: {report['delivered']} orders delivered by {THREADS} threads, "
              f"{report['429s']} x 429, "
              f"{report['waits']} waits for a permit")
    refused = sum(r["429s"] for r in reports)
    print(f"{sim.count()} requests on one key of {KEY_LIMIT}/min; {refused} refused")
    assert refused == 0
    assert sum(r["delivered"] for r in reports) == WORKERS * THREADS * ORDERS_EACH


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        worker(*sys.argv[2:5])
    else:
        main()
