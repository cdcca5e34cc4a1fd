"""One key, several processes, one budget: no shared limit beside each backend, one run.

A local server plays FoxReload behind a per-key token bucket (``--per-minute`` refilled
evenly, one second's worth of burst; past it, 429 with the ``Retry-After`` until the next
token). ``--processes`` processes share the key. Each buys ``--buys`` orders a second for
``--seconds`` seconds (create, then pay) and waits for every order with
``wait_for_completion`` in its own task; orders complete 2-8 s after payment. Together
they ask for more than the key allows, so permits are short.

The same load runs once per variant: no rate limit (every process spends blindly), each
process with its own ``RateLimit`` of an equal share, and the shared ``SQLiteRateLimit``
and ``RedisRateLimit`` (fixed at the key's limit, then learned from 429s). Printed per
variant: the share of requests answered 429, buys answered 429, the buy latency's p95
(create + pay) and its ratio to the no-limit baseline of the same run, the mean detection
delay (completion to the wait's return) and the completed orders given up on (a wait that
failed, or stalled within a minute).

Needs Redis on localhost for its rows. Run: ``nox -s bench`` or
``python benchmarks/rate_limit.py [--processes 3 --per-minute 600 --seconds 20]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from _fleet import TokenBucketAPI, completion_times, p95

from foxpoll import AsyncFoxReload, SystemClock
from foxpoll.backoff import ExponentialJitter
from foxpoll.polling import WaitPolicy
from foxpoll.testing import FakeFoxReload, OrderScript, SimulatorServer

REDIS_URL = "redis://127.0.0.1:6379/0"
BACKOFF = ExponentialJitter(base=1.0, factor=1.5, cap=4.0, poll_at_start=False)
GIVE_UP = 60.0  # seconds: a wait that has not seen its order complete by then gives up


async def spend(config: dict[str, Any]) -> None:
    """One process of the fleet (run as a child): buy, wait, report."""
    from foxpoll.ratelimit import RateLimit, RedisRateLimit, SQLiteRateLimit

    variant, per_minute = config["variant"], config["per_minute"]
    limit: Any = None
    if variant == "own share":
        limit = RateLimit(per_minute / config["processes"])
    elif variant == "SQLiteRateLimit":
        limit = SQLiteRateLimit(config["sqlite"], per_minute, key=config["key"])
    elif variant == "RedisRateLimit":
        limit = RedisRateLimit(REDIS_URL, per_minute, key_prefix=f"{config['key']}:")
    elif variant == "RedisRateLimit, learned":
        limit = RedisRateLimit(REDIS_URL, None, key_prefix=f"{config['key']}:")
    buys: list[float] = []
    buy_errors = 0
    waits: list[dict[str, Any]] = []
    async with AsyncFoxReload(config["api_key"], base_url=config["url"],
                              rate_limit=limit) as client:

        async def wait(order_id: str) -> None:
            try:
                await client.wait_for_completion(order_id, policy=WaitPolicy(backoff=BACKOFF),
                                                 timeout=GIVE_UP)
                waits.append({"id": order_id, "at": time.monotonic(), "ok": True})
            except Exception as exc:
                waits.append({"id": order_id, "at": time.monotonic(), "ok": False,
                              "error": type(exc).__name__})

        async def buy() -> None:
            nonlocal buy_errors
            started = time.monotonic()
            try:
                order = await client.orders.create(items=[{"itemId": "product_steam_10"}])
                await client.orders.pay(order.id)
            except Exception:
                buy_errors += 1
                return
            buys.append(time.monotonic() - started)
            tasks.append(asyncio.ensure_future(wait(order.id)))

        tasks: list[asyncio.Future[None]] = []
        buyers = []
        deadline = time.monotonic() + config["seconds"]
        while time.monotonic() < deadline:
            buyers.append(asyncio.ensure_future(buy()))
            await asyncio.sleep(1.0 / config["buys"])
        await asyncio.gather(*buyers)
        await asyncio.gather(*tasks)
    if limit is not None:
        await limit.aclose()
    print(json.dumps({"buys": buys, "buy_errors": buy_errors, "waits": waits}))


def run_variant(variant: str, args: argparse.Namespace, tmp: str) -> dict[str, Any]:
    sim = FakeFoxReload(clock=SystemClock(), record_requests=False)
    sim.balance = 10**12
    rng = __import__("random").Random(7)
    sim.script_next(*(OrderScript.complete(after=rng.uniform(2, 8)) for _ in range(100_000)))
    api = TokenBucketAPI(sim, args.per_minute)
    with SimulatorServer(api) as server:  # type: ignore[arg-type]
        config = {"variant": variant, "per_minute": args.per_minute,
                  "processes": args.processes, "url": server.url, "api_key": sim.api_key,
                  "seconds": args.seconds, "buys": args.buys,
                  "sqlite": str(Path(tmp) / f"{uuid.uuid4().hex}.db"),
                  "key": f"foxpoll-bench:{uuid.uuid4().hex[:8]}"}
        children = [subprocess.Popen([sys.executable, __file__, "--child", json.dumps(config)],
                                     stdout=subprocess.PIPE, text=True)
                    for _ in range(args.processes)]
        reports = [json.loads(child.communicate(timeout=args.seconds * 5)[0])
                   for child in children]
    completed_at = completion_times(sim)
    waits = [w for r in reports for w in r["waits"]]
    delays = [w["at"] - completed_at[w["id"]] for w in waits if w["ok"]]
    log = api.log
    return {
        "requests": len(log),
        "throttled": sum(1 for _, _, status in log if status == 429) / max(1, len(log)),
        "buys throttled": sum(1 for _, kind, status in log if kind == "buy" and status == 429),
        "buys": sum(len(r["buys"]) for r in reports),
        "buys failed": sum(r["buy_errors"] for r in reports),
        "buy p95": p95([b for r in reports for b in r["buys"]]),
        "delay": statistics.fmean(delays) if delays else math.nan,
        "given up": sum(1 for w in waits if not w["ok"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--per-minute", type=float, default=600)
    parser.add_argument("--buys", type=float, default=1.0, help="per second, per process")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        asyncio.run(spend(json.loads(args.child)))
        return
    print(f"{args.processes} processes on one key of {args.per_minute:.0f} requests/min, "
          f"each buying {args.buys:g} orders/s for {args.seconds:.0f}s and polling them; "
          f"{os.cpu_count()} CPUs\n")
    header = (f"{'variant':<26}{'requests':>9}{'429s':>8}{'buys 429':>9}{'buys':>6}"
              f"{'failed':>7}{'buy p95':>9}{'vs none':>8}{'delay':>8}{'given up':>9}")
    print(header)
    variants = ["no rate limit", "own share", "SQLiteRateLimit", "RedisRateLimit",
                "RedisRateLimit, learned"]
    baseline: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in variants:
            r = run_variant(variant, args, tmp)
            baseline = baseline or r  # the first variant, with no limit, is the baseline
            print(f"{variant:<26}{r['requests']:>9}{r['throttled']:>8.1%}"
                  f"{r['buys throttled']:>9}{r['buys']:>6}{r['buys failed']:>7}"
                  f"{r['buy p95']:>8.2f}s{r['buy p95'] / baseline['buy p95']:>7.2f}x"
                  f"{r['delay']:>7.2f}s{r['given up']:>9}")


if __name__ == "__main__":
    main()
