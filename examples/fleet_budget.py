"""Three processes, one API key, one budget.

This script serves the FoxReload simulator over HTTP with a per-key limit of 120 requests
a minute, then starts three worker processes that share the key. Each buys orders and
waits for them, every request taking a permit from one ``SQLiteRateLimit`` file, so
together they stay inside the key's limit: no request is refused. (On many machines, use
``RedisRateLimit("redis://...")`` the same way.)

Run: python examples/fleet_budget.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from foxpoll import ExponentialJitter, FoxReload, SystemClock, WaitPolicy
from foxpoll.ratelimit import SQLiteRateLimit
from foxpoll.testing import FakeFoxReload, OrderScript, SimulatorServer

KEY_LIMIT = 120  # what the (simulated) API enforces, per minute and key
BUDGET = 100  # what the fleet allows itself: leave the server some headroom
WORKERS, ORDERS_EACH = 3, 4


def worker(sim_url: str, api_key: str, budget_file: str) -> None:
    """One process of the fleet: buy, wait, report what the budget saw."""
    budget = SQLiteRateLimit(budget_file, per_minute=BUDGET)
    policy = WaitPolicy(ExponentialJitter(base=0.5, factor=1.5, cap=2.0, poll_at_start=False))
    with FoxReload(api_key, base_url=sim_url, rate_limit=budget, wait_policy=policy) as client:
        ids = []
        for _ in range(ORDERS_EACH):
            order = client.orders.create(items=[{"itemId": "product_steam_10"}])
            client.orders.pay(order.id)
            ids.append(order.id)
        done = sum(result.ok for result in client.wait_many(ids))
    print(json.dumps({"completed": done, "429s": budget.throttles, "waits": budget.waits}))


def main() -> None:
    sim = FakeFoxReload(clock=SystemClock(), rate_limit_per_minute=KEY_LIMIT,
                        default_script=OrderScript.complete(after=2))
    with tempfile.TemporaryDirectory() as tmp, SimulatorServer(sim) as server:
        budget_file = str(Path(tmp) / "budget.db")
        workers = [subprocess.Popen(  # noqa: S603 - this very script
            [sys.executable, __file__, "worker", server.url, sim.api_key, budget_file],
            stdout=subprocess.PIPE, text=True) for _ in range(WORKERS)]
        reports = [json.loads(w.communicate(timeout=120)[0]) for w in workers]
    for n, report in enumerate(reports):
        print(f"worker {n}: {report['completed']} orders completed, {report['429s']} x 429, "
              f"{report['waits']} waits for a permit")
    refused = sum(r["429s"] for r in reports)
    print(f"{sim.count()} requests on one key of {KEY_LIMIT}/min; {refused} refused")
    assert refused == 0
    assert sum(r["completed"] for r in reports) == WORKERS * ORDERS_EACH


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        worker(*sys.argv[2:5])
    else:
        main()
