"""Orders a minute per API key: the vendor's loop against foxpoll's fleet setting, one run.

A local server plays FoxReload behind one key metered at ``--per-minute`` (100, the
standard tier): a token bucket holding ``--burst-seconds`` of it, 429 with a
``Retry-After`` past it. ``--processes`` processes (3) share the key. Time is compressed
``--speed`` times (every process, the server and the budget read one scaled clock), so
the numbers below are in virtual seconds and minutes.

Each process buys orders (create, then pay) as a Poisson stream and waits for each in a
task of its own; orders settle as the *typical* mix of ``schedules.py`` (85 % within a
minute, 12 % in 1-5 minutes, 3 % stall). The offered rate climbs a ladder, one step of
``--step-minutes`` (or ``--orders`` orders, when that is longer) at a time, with no
restart in between (a fleet that has been running; it starts with ``--warmup-minutes``
at the first rate, not measured, so that what a fleet learns is learned). The orders
bought in a step, after its first ``--settle-minutes``, are its sample. A step **holds**
when none of its buys failed or was answered 429, the buys' p95 is under 5 s, at most 1
% of the step's requests were answered 429, the mean detection lag (completion to the
wait's return) is at most 12 s, and no completed order was given up (a wait that ended,
or an order still unseen ``--lost-after`` seconds after it completed). A variant's
capacity is the last step that held before the first that did not. The ladder stops one
step after a failure is known.

Variants:

- ``vendor``: the vendor article's loop: its schedule (``ExponentialJitter()``, a poll at
  once), no shared budget; each process spends the key blindly.
- ``fleet``: foxpoll's recommended fleet setting, ``WaitPolicy.fleet()`` on a
  shared ``SQLiteRateLimit`` (the processes of one host; a fleet on many machines uses
  ``RedisRateLimit``, whose clock is Redis's and cannot be compressed).
- ``adaptive``: the best setting before it: the shared budget and ``Adaptive()``.

Run: ``nox -s bench`` or ``python benchmarks/capacity.py [--speed 10 --step-minutes 8]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from _fleet import ScaledClock, TokenBucketAPI, completion_times, p95
from schedules import typical

from foxpoll import AsyncFoxReload
from foxpoll.backoff import Adaptive
from foxpoll.polling import WaitPolicy
from foxpoll.testing import FakeFoxReload, OrderScript, SimulatorServer

LIMITS = {"buy p95": 5.0, "throttled": 0.01, "lag": 12.0}


def setting(variant: str, config: dict[str, Any], clock: ScaledClock
            ) -> tuple[Any, WaitPolicy]:
    """The rate limit and wait policy of one process of ``variant``."""
    from foxpoll.ratelimit import SQLiteRateLimit

    if variant == "vendor":
        return None, WaitPolicy()
    budget = SQLiteRateLimit(config["sqlite"], config["per_minute"], clock=clock,
                             burst=config["budget_burst"])
    if variant == "adaptive":
        return budget, WaitPolicy(backoff=Adaptive())
    return budget, WaitPolicy.fleet()


async def fleet_process(config: dict[str, Any]) -> None:
    """One process of the fleet (run as a child): buy on the ladder, wait, tell the parent
    each event as a JSON line."""
    clock = ScaledClock(config["origin"], config["speed"])
    rng = random.Random(config["seed"])
    limit, policy = setting(config["variant"], config, clock)
    rungs = config["rungs"]  # [start, end, orders a minute], in virtual seconds
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # The parent closes this process's stdin to end it (or dies, which closes it too).
    threading.Thread(target=lambda: (sys.stdin.read(), loop.call_soon_threadsafe(stop.set)),
                     daemon=True).start()

    def emit(**event: Any) -> None:
        print(json.dumps(event), flush=True)

    async with AsyncFoxReload(config["api_key"], base_url=config["url"], rate_limit=limit,
                              clock=clock, rng=random.Random(config["seed"] + 1),
                              wait_policy=policy) as client:

        async def wait(order_id: str) -> None:
            try:
                await client.wait_for_completion(order_id)
                emit(kind="seen", id=order_id, at=clock.monotonic())
            except Exception as exc:
                emit(kind="ended", id=order_id, at=clock.monotonic(),
                     error=type(exc).__name__)

        async def buy(started: float) -> None:
            try:
                order = await client.orders.create(items=[{"itemId": "product_steam_10"}])
                await client.orders.pay(order.id)
            except Exception as exc:
                emit(kind="buy", at=started, took=clock.monotonic() - started,
                     error=type(exc).__name__)
                return
            emit(kind="buy", at=started, took=clock.monotonic() - started, id=order.id)
            tasks.add(asyncio.ensure_future(wait(order.id)))

        tasks: set[asyncio.Future[None]] = set()
        at = 0.0
        while not stop.is_set():
            rate = next((r for _, end, r in rungs if at < end), None)
            if rate is None:
                break
            per_second = rate / 60.0 / config["processes"]
            await clock.asleep(at - clock.monotonic())
            tasks.add(asyncio.ensure_future(buy(at)))
            at += rng.expovariate(per_second)
        await stop.wait()
        for task in tasks:  # the client closes its connections as the waits end
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Step:
    """What one step of the ladder measured."""

    def __init__(self, rate: float, start: float, end: float, settle: float) -> None:
        self.rate, self.start, self.end, self.settle = rate, start, end, settle
        self.result: dict[str, Any] | None = None

    def evaluate(self, events: list[dict[str, Any]], completed: dict[str, float],
                 log: list[tuple[float, str, int]], now: float, lost_after: float) -> None:
        sample = [e for e in events if e["kind"] == "buy"
                  and self.start + self.settle <= e["at"] < self.end]
        seen = {e["id"]: e for e in events if e["kind"] in ("seen", "ended")}
        lags: list[float] = []
        given_up = 0
        for buy in sample:
            order_id = buy.get("id")
            finished = completed.get(order_id, math.inf) if order_id else math.inf
            if not math.isfinite(finished):
                continue  # a stall, or a failed buy
            outcome = seen.get(order_id)
            if outcome is not None and outcome["kind"] == "seen":
                lags.append(outcome["at"] - finished)
            elif outcome is not None or now - finished >= lost_after:
                given_up += 1
                lags.append((outcome["at"] if outcome else now) - finished)
        requests = [(status, kind) for at, kind, status in log
                    if self.start <= at < self.end]
        buys = [b["took"] for b in sample if "id" in b]
        self.result = {
            "orders": len(sample),
            "requests/min": len(requests) / ((self.end - self.start) / 60.0),
            "throttled": sum(s == 429 for s, _ in requests) / max(1, len(requests)),
            "buys 429": sum(s == 429 and k == "buy" for s, k in requests),
            "buys failed": sum("error" in b for b in sample),
            "buy p95": p95(buys),
            "lag": statistics.fmean(lags) if lags else math.nan,
            "lag p95": p95(lags),
            "given up": given_up,
        }

    def ready(self, now: float, lost_after: float) -> bool:
        """Every non-stalled order of the sample has completed and been seen or lost."""
        return now >= self.end + 300.0 + lost_after

    @property
    def failures(self) -> list[str]:
        r = self.result
        assert r is not None
        reasons = []
        if r["buys failed"]:
            reasons.append(f"{r['buys failed']} buys failed")
        if r["buys 429"]:
            reasons.append(f"{r['buys 429']} buys answered 429")
        if not r["buy p95"] < LIMITS["buy p95"]:
            reasons.append(f"buy p95 {r['buy p95']:.1f} s")
        if r["throttled"] > LIMITS["throttled"]:
            reasons.append(f"{r['throttled']:.1%} of requests answered 429")
        if not r["lag"] <= LIMITS["lag"]:
            reasons.append(f"mean lag {r['lag']:.1f} s")
        if r["given up"]:
            reasons.append(f"{r['given up']} completed orders given up")
        return reasons


def run_variant(variant: str, args: argparse.Namespace, tmp: str) -> list[Step]:
    """Climb the ladder with ``variant``'s fleet until a step fails; the steps measured."""
    rates = [args.start + i * args.increment
             for i in range(int((args.top - args.start) / args.increment) + 1)]
    settle_s = args.settle_minutes * 60.0
    rungs = [(0.0, args.warmup_minutes * 60.0, args.start)]  # the warm-up: not measured
    for rate in rates:  # long enough for --orders in the sample, or --step-minutes
        counted = max(args.step_minutes * 60.0 - settle_s, args.orders / rate * 60.0)
        rungs.append((rungs[-1][1], rungs[-1][1] + settle_s + counted, rate))
    origin = time.monotonic() + 2.0  # the children start before the ladder does
    clock = ScaledClock(origin, args.speed)
    sim = FakeFoxReload(clock=clock, record_requests=False, seed=args.seed)
    sim.balance = 10**12
    rng = random.Random(args.seed)
    scripts = []
    for _ in range(int(sum(rate * (end - start) / 60.0 for start, end, rate in rungs)) * 2
                   + 1000):
        settles = typical(rng)
        scripts.append(OrderScript.stall(paid_for=1.0) if math.isinf(settles)
                       else OrderScript.complete(after=settles))
    sim.script_next(*scripts)
    api = TokenBucketAPI(sim, args.per_minute, burst_seconds=args.burst_seconds, clock=clock)
    steps = [Step(rate, start, end, settle_s) for start, end, rate in rungs[1:]]
    events: list[dict[str, Any]] = []
    with SimulatorServer(api) as server:  # type: ignore[arg-type]
        config = {"variant": variant, "per_minute": args.per_minute, "url": server.url,
                  "api_key": sim.api_key, "processes": args.processes, "origin": origin,
                  "speed": args.speed, "rungs": rungs, "budget_burst": args.budget_burst,
                  "sqlite": str(Path(tmp) / f"{uuid.uuid4().hex}.db")}
        children = [subprocess.Popen(
            [sys.executable, __file__, "--child", json.dumps({**config, "seed": args.seed
                                                              + 100 * (n + 1)})],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            for n in range(args.processes)]

        def read(child: subprocess.Popen[str]) -> None:
            assert child.stdout is not None
            for line in child.stdout:
                events.append(json.loads(line))

        readers = [threading.Thread(target=read, args=(c,), daemon=True) for c in children]
        for reader in readers:
            reader.start()
        try:
            evaluated = 0
            while evaluated < len(steps):
                time.sleep(0.5)
                now = clock.monotonic()
                if any(c.poll() is not None for c in children):
                    raise RuntimeError(f"a {variant} process ended early")
                step = steps[evaluated]
                if not step.ready(now, args.lost_after):
                    continue
                step.evaluate(list(events), completion_times(sim), list(api.log), now,
                              args.lost_after)
                report(variant, step)
                evaluated += 1
                if step.failures:
                    break
        finally:
            for child in children:
                assert child.stdin is not None
                child.stdin.close()  # the child stops buying and closes its client
            for child in children:
                try:
                    child.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
    return [s for s in steps if s.result is not None]


def report(variant: str, step: Step) -> None:
    r = step.result
    assert r is not None
    verdict = "holds" if not step.failures else "fails: " + "; ".join(step.failures)
    print(f"{variant:<9}{step.rate:>6g}{r['orders']:>7}{r['requests/min']:>9.1f}"
          f"{r['throttled']:>7.1%}{r['buys 429']:>9}{r['buys failed']:>7}"
          f"{r['buy p95']:>8.2f}s{r['lag']:>7.1f}s{r['lag p95']:>8.1f}s{r['given up']:>9}"
          f"  {verdict}", flush=True)


def ideal(per_minute: float, lag: float, seed: int) -> tuple[float, float]:
    """The polls per order of the best plan for the typical mix with a mean lag within
    ``lag`` (stalled orders polled to its end, requests and queueing free), and the
    orders a minute ``per_minute`` carries at that cost: what no poll schedule beats."""
    from foxpoll.backoff import _candidates, _solve, mean_delay

    rng = random.Random(seed)
    drawn = [typical(rng) for _ in range(20_000)]
    done = sorted(t for t in drawn if math.isfinite(t))
    weights = [1.0 / len(drawn)] * len(done)  # the stalls' mass is never done
    stalled = 1.0 - len(done) / len(drawn)
    candidates = _candidates(done, weights, 240, math.inf)
    best = math.inf
    low, high = 0.0, 10.0
    for _ in range(30):  # the cheapest plan within the lag: bisect the price of a second
        price = (low + high) / 2
        plan, _ = _solve(done, weights, candidates, price, math.inf)
        delay, polls = mean_delay(done, plan)
        if delay <= lag:
            best = min(best, polls * (1.0 - stalled) + stalled * len(plan))
            high = price
        else:
            low = price
    return best, per_minute / (2.0 + best)


def capacity(steps: list[Step]) -> float:
    held = 0.0
    for step in steps:
        if step.failures:
            break
        held = step.rate
    return held


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default="vendor,fleet")
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--per-minute", type=float, default=100)
    parser.add_argument("--burst-seconds", type=float, default=10.0,
                        help="the server's bucket, in seconds of its rate")
    parser.add_argument("--budget-burst", type=int, default=None,
                        help="the shared budget's burst= (foxpoll's default when unset)")
    parser.add_argument("--speed", type=float, default=10.0)
    parser.add_argument("--start", type=float, default=6.0, help="orders a minute")
    parser.add_argument("--increment", type=float, default=3.0)
    parser.add_argument("--top", type=float, default=33.0)
    parser.add_argument("--step-minutes", type=float, default=6.0, help="at least")
    parser.add_argument("--orders", type=int, default=150,
                        help="orders in each step's sample, at least")
    parser.add_argument("--settle-minutes", type=float, default=2.0)
    parser.add_argument("--warmup-minutes", type=float, default=12.0,
                        help="at the first rate, not measured: a fleet that has run")
    parser.add_argument("--lost-after", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        logging.getLogger("foxpoll").setLevel(logging.ERROR)  # stalls are expected here
        asyncio.run(fleet_process(json.loads(args.child)))
        return
    print(f"{args.processes} processes on one key of {args.per_minute:g} requests/min "
          f"(a bucket of {args.burst_seconds:g} s), {args.speed:g}x compressed; steps of "
          f"{args.step_minutes:g} min or {args.orders} orders, whichever is longer, less "
          f"their first {args.settle_minutes:g} min, after {args.warmup_minutes:g} min of "
          f"warm-up; {os.cpu_count()} CPUs\n")
    print(f"{'variant':<9}{'/min':>6}{'orders':>7}{'req/min':>9}{'429s':>7}{'buys 429':>9}"
          f"{'failed':>7}{'buy p95':>9}{'lag':>8}{'lag p95':>9}{'given up':>9}")
    capacities = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants.split(","):
            capacities[variant] = capacity(run_variant(variant, args, tmp))
    print()
    polls, carried = ideal(args.per_minute, LIMITS["lag"], args.seed)
    print(f"bound: the best plan for the mix within {LIMITS['lag']:g} s of mean lag makes "
          f"{polls:.2f} polls an order, so the key carries at most {carried:.1f} "
          "orders/min at full use")
    for variant, held in capacities.items():
        print(f"capacity, {variant}: " + (f"{held:g} orders/min" if held else
              f"below {args.start:g} orders/min: the first step failed; start lower"))
    if "vendor" in capacities and len(capacities) > 1:
        for variant, held in capacities.items():
            if variant != "vendor" and capacities["vendor"]:
                print(f"{variant} / vendor: {held / capacities['vendor']:.2f}x")
            elif variant != "vendor":
                print(f"{variant} / vendor: not measured (the vendor loop failed the "
                      "ladder's first step)")


if __name__ == "__main__":
    main()
