"""What the order-history sweep saves: requests per order and detection delay, with and
without ``WaitPolicy(sweep=Sweep())``, at 10, 100 and 1,000 orders in flight.

Each run buys N orders from the simulator at once (the *typical* workload of
``benchmarks/schedules.py``: 85 % log-normal around 12 s within 1-60 s, 12 % 1-5 minutes,
3 % stall) and waits for all of them with one real ``wait_many`` on virtual time, so what
is measured is what foxpoll does. The simulator lists orders newest first, with
``status``, ``limit`` and ``offset``, as the sweep's defaults expect.

Columns: GET requests per order (polls and listing pages; the two buy requests are left
out; stalled orders included: they cost a full wait), of which listing pages; mean and
p95 detection delay (completion to the poll that saw it, over the orders that finished
while watched); "gave up": finishing orders declared stalled first; and the requests
against the same policy without the sweep.

Run: ``python benchmarks/sweep.py [--runs 3] [--seed 7]``.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from collections.abc import Callable

import attrs
from schedules import typical

from foxpoll import Sweep, WaitPolicy
from foxpoll.testing import FakeFoxReload, OrderScript


def run(in_flight: int, policy: WaitPolicy, seed: int) -> dict[str, float]:
    """Buy ``in_flight`` orders at once and wait for them all with ``policy``."""
    rng = random.Random(seed)
    sim = FakeFoxReload(seed=seed, record_requests=True)
    settles: dict[str, float] = {}
    with sim.client(rng=random.Random(seed + 1)) as client:
        for _ in range(in_flight):
            settle = typical(rng)
            sim.script_next(OrderScript.stall(paid_for=1.0) if math.isinf(settle)
                            else OrderScript.complete(after=settle))
            order = client.orders.create(items=[{"itemId": "product_steam_10"}])
            client.orders.pay(order.id)
            settles[order.id] = settle
        bought = len(sim.requests)
        delays: list[float] = []
        gave_up = 0
        for result in client.wait_many(list(settles), policy=policy):
            settle = settles[result.order_id]
            if result.stalled:
                gave_up += not math.isinf(settle)
                continue
            delays.append(result.elapsed - settle)
    gets = [r for r in sim.requests[bought:] if r.method == "GET"]
    pages = sum(r.path.rstrip("/") == "/api/orders" for r in gets)
    delays.sort()
    return {
        "requests": len(gets) / in_flight,
        "pages": pages / in_flight,
        "mean": statistics.fmean(delays),
        "p95": delays[min(len(delays) - 1, int(0.95 * len(delays)))],
        "gave_up": 100.0 * gave_up / in_flight,
    }


# Factories: a fresh Sweep each run, so that a switch-off never carries over.
POLICIES: dict[str, Callable[[], WaitPolicy]] = {
    "no sweep": lambda: WaitPolicy(),
    "Sweep()": lambda: WaitPolicy(sweep=Sweep()),
    "after_payment()": lambda: WaitPolicy.after_payment(),
    "after_payment() + Sweep()": lambda: attrs.evolve(WaitPolicy.after_payment(),
                                                      sweep=Sweep()),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="seeds per cell, averaged")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--sizes", type=int, nargs="*", default=[10, 100, 1000])
    args = parser.parse_args()
    print(f"typical workload, {args.runs} runs per cell from seed {args.seed}\n")
    print(f"{'in flight':>9}  {'policy':<26}{'req/order':>10}{'of them pages':>14}"
          f"{'mean delay':>12}{'p95 delay':>11}{'gave up':>9}{'vs no sweep':>13}")
    for size in args.sizes:
        started = time.perf_counter()
        rows: dict[str, dict[str, float]] = {}
        for label, policy in POLICIES.items():
            runs = []
            for k in range(args.runs):
                runs.append(run(size, policy(), args.seed + 1000 * k))
            rows[label] = {key: statistics.fmean(r[key] for r in runs) for key in runs[0]}
        for label, r in rows.items():
            base = rows["after_payment()" if label.startswith("after") else "no sweep"][
                "requests"]
            print(f"{size:>9}  {label:<26}{r['requests']:>10.2f}{r['pages']:>14.2f}"
                  f"{r['mean']:>11.1f}s{r['p95']:>10.1f}s{r['gave_up']:>8.1f}%"
                  f"{r['requests'] / base:>12.2f}x")
        print(f"  ({time.perf_counter() - started:.1f}s of real time)")


if __name__ == "__main__":
    main()
