"""Poll schedules compared on simulated workloads: requests per order against detection delay.

Every order is bought from the simulator and waited for with the real
``wait_for_completion`` on virtual time, so what is measured is what foxpoll does.

Workloads (seconds from payment to the terminal status; see FOXRELOAD_API.md):

- typical: 85 % log-normal around 12 s within 1-60 s; 12 % a tail of 1-5 minutes;
  3 % stall at the supplier (never finish while watched).
- fast: gift cards from stock: 95 % log-normal around 3 s within 1-15 s; 5 % 15-60 s.
- slow eSIM: log-normal around 90 s within 20-600 s; 2 % stall.

Every schedule polls once at once and then waits, as partner loops do (``get``, then
``sleep``), except ``ExponentialJitter(poll_at_start=False)``, which waits first, and
``Adaptive``, which learns whether a poll at once is worth it, and
``WaitPolicy.fleet()``, which learns, aims at fewer polls for a longer delay (a key's
budget is what a fleet runs out of) and gives up after 10 minutes.

The recommended schedule, ``Adaptive()``, must use at most 0.75x the vendor schedule's
requests at no longer a mean delay, at most 1.1x its p95 delay and no more give-ups: a
line under each workload says whether it does.

Columns: requests per order (stalled orders included: they cost a full watch), mean and p95
detection delay (completion to the poll that saw it, over orders that finished while
watched), and "gave up": finishing orders declared stalled first (40 attempts, or the
fleet preset's 10 minutes, ran out).

Run: ``nox -s bench`` or ``python benchmarks/schedules.py [--orders 2000]``.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from collections.abc import Callable

from foxpoll import OrderStalled
from foxpoll.backoff import Adaptive, BackoffPolicy, ExponentialJitter, Fixed, Schedule, Step
from foxpoll.polling import WaitPolicy
from foxpoll.testing import FakeFoxReload, OrderScript

Workload = Callable[[random.Random], float]  # seconds to finish; inf for a stall


def typical(rng: random.Random) -> float:
    roll = rng.random()
    if roll < 0.03:
        return math.inf
    if roll < 0.15:
        return rng.uniform(60, 300)
    return min(60.0, max(1.0, rng.lognormvariate(math.log(12), 0.7)))


def fast(rng: random.Random) -> float:
    if rng.random() < 0.05:
        return rng.uniform(15, 60)
    return min(15.0, max(1.0, rng.lognormvariate(math.log(3), 0.5)))


def slow_esim(rng: random.Random) -> float:
    if rng.random() < 0.02:
        return math.inf
    return min(600.0, max(20.0, rng.lognormvariate(math.log(90), 0.6)))


WORKLOADS: dict[str, Workload] = {"typical": typical, "fast": fast, "slow eSIM": slow_esim}


def policies() -> dict[str, Callable[[], BackoffPolicy | WaitPolicy]]:
    return {
        "fixed 5 s": lambda: Fixed(5.0),
        "vendor exponential": lambda: ExponentialJitter(5.0, 1.5, 30.0, 0.3),

        "vendor stepped": lambda: Schedule([Step(5.0, times=12), Step((15.0, 30.0))]),
        "foxpoll default": lambda: ExponentialJitter(),
        "foxpoll ExponentialJitter(poll_at_start=False)": lambda: ExponentialJitter(
            poll_at_start=False
        ),
        "foxpoll Adaptive()": lambda: Adaptive(),
        "foxpoll WaitPolicy.fleet()": lambda: WaitPolicy.fleet(),
    }


def run(workload: Workload, make_policy: Callable[[], BackoffPolicy | WaitPolicy],
        orders: int, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    sim = FakeFoxReload(seed=seed)
    made = make_policy()  # one instance for the whole run: Adaptive learns across orders
    policy = made if isinstance(made, WaitPolicy) else WaitPolicy(backoff=made)
    delays: list[float] = []
    gave_up = 0
    with sim.client(rng=random.Random(seed + 1)) as client:
        for _ in range(orders):
            settle = workload(rng)
            script = (OrderScript.stall(paid_for=1.0) if math.isinf(settle)
                      else OrderScript.complete(after=settle))
            sim.script_next(script)
            order = client.orders.create(items=[{"itemId": "product_steam_10"}])
            client.orders.pay(order.id)
            paid_at = sim.clock.monotonic()
            try:
                client.wait_for_completion(order.id, policy=policy)
            except OrderStalled:
                if not math.isinf(settle):
                    gave_up += 1
                continue
            delays.append(sim.clock.monotonic() - paid_at - settle)
    gets = sim.count("GET")
    delays.sort()
    return {
        "requests": gets / orders,
        "mean": statistics.fmean(delays),
        "p95": delays[min(len(delays) - 1, int(0.95 * len(delays)))],
        "gave_up": 100.0 * gave_up / orders,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--orders", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    print(f"{args.orders} orders per workload and schedule, seed {args.seed}\n")
    for name, workload in WORKLOADS.items():
        print(f"workload: {name}")
        header = (f"  {'schedule':<48}{'req/order':>10}{'mean delay':>12}{'p95 delay':>11}"
                  f"{'gave up':>9}{'vs vendor exp':>15}")
        print(header)
        results = {}
        started = time.perf_counter()
        for label, make in policies().items():
            results[label] = run(workload, make, args.orders, args.seed)
        vendor = results["vendor exponential"]
        for label, r in results.items():
            ratio = r["requests"] / vendor["requests"]
            print(f"  {label:<48}{r['requests']:>10.2f}{r['mean']:>11.1f}s{r['p95']:>10.1f}s"
                  f"{r['gave_up']:>8.1f}%{ratio:>14.2f}x")
        print(f"  {verdict(results[RECOMMENDED], vendor)}")
        print(f"  ({time.perf_counter() - started:.1f}s of real time)\n")


RECOMMENDED = "foxpoll Adaptive()"


def verdict(r: dict[str, float], vendor: dict[str, float]) -> str:
    """Whether the recommended schedule keeps its promise against the vendor's: at most
    0.75x the requests, no longer a mean delay, at most 1.1x the p95, no more give-ups."""
    misses = [what for what, ok in (
        ("requests", r["requests"] <= 0.75 * vendor["requests"]),
        ("mean delay", r["mean"] <= vendor["mean"]),
        ("p95 delay", r["p95"] <= 1.1 * vendor["p95"]),
        ("gave up", r["gave_up"] <= vendor["gave_up"])) if not ok]
    return (f"{RECOMMENDED}: " + ("within every bound" if not misses
                                  else "misses " + ", ".join(misses)))


if __name__ == "__main__":
    main()
