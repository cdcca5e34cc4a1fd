"""Polling throughput and memory: foxpoll's wait_many beside a raw aiohttp loop, one run.

The simulator runs in its own process behind an aiohttp server on loopback, so the client
under test has a core to itself. For N in-flight orders (all stalled in ``processing``, so
no wait ends early), each variant polls for the same number of seconds with the same
concurrency:

- raw aiohttp: a bare loop of ``session.get`` + ``json()`` over the order ids, with no
  retries, parsing, schedules or hooks: the floor for one Python process.
- raw httpx, raw httpx (fast): the same bare loop through an ``httpx.AsyncClient`` with
  its default transport, and with the aiohttp transport: the floor under foxpoll, which
  sends through httpx.
- foxpoll (httpx): ``AsyncFoxReload.wait_many`` with its default httpx transport.
- foxpoll (httpx-aiohttp): the same, with ``httpx_aiohttp.AiohttpTransport``.
- foxpoll (fast): the same, with ``AsyncFoxReload(transport=AiohttpTransport())`` (the
  ``fast`` extra): requests go straight to foxpoll's lean aiohttp transport, without an
  ``httpx.AsyncClient`` in between.
- foxpoll, a task per wait (default / fast): N tasks, each awaiting
  ``wait_for_completion`` on one **default** ``AsyncFoxReload`` (its own httpx client,
  ``max_in_flight`` 100), the way most code is written; then the same on the fast
  transport. Requests beyond the client's slots queue in foxpoll, not in httpx's pool.

Printed: polls per second, CPU seconds per 1,000 polls (the client process only), and the
ratio of each rate to raw aiohttp measured in the same run. Memory per waiting order is
measured separately, in process, with tracemalloc: the growth while N waits sit between
polls, divided by N.

Run: ``nox -s bench`` or ``python benchmarks/throughput.py [--sizes 100,1000,10000]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import httpx

from foxpoll import AsyncFoxReload, OrderStalled, PollAttempt
from foxpoll.backoff import Fixed
from foxpoll.polling import Listener, WaitPolicy
from foxpoll.testing import FakeClock, FakeFoxReload, OrderScript

API_KEY = "test-key"
NEVER_DONE = WaitPolicy(backoff=Fixed(0), max_attempts=10**9)


class OnPoll(Listener):
    """Calls ``fn`` with each poll."""

    def __init__(self, fn: Callable[[PollAttempt], None]) -> None:
        self.fn = fn

    def on_poll(self, attempt: PollAttempt) -> None:
        self.fn(attempt)


class Server:
    def __init__(self, orders: int) -> None:
        script = Path(__file__).with_name("_sim_server.py")
        self.process = subprocess.Popen(
            [sys.executable, str(script), "--orders", str(orders)],
            stdout=subprocess.PIPE, text=True,
        )
        assert self.process.stdout is not None
        ready = json.loads(self.process.stdout.readline())
        self.url: str = ready["url"]
        self.order_ids: list[str] = ready["order_ids"]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


async def raw_aiohttp(url: str, ids: list[str], seconds: float, concurrency: int) -> int:
    polls = 0
    deadline = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector,
                                     headers={"X-API-Key": API_KEY}) as session:
        async def worker(offset: int) -> None:
            nonlocal polls
            index = offset
            while time.monotonic() < deadline:
                async with session.get(f"{url}/api/orders/{ids[index % len(ids)]}") as resp:
                    await resp.json()
                polls += 1
                index += concurrency

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return polls


async def raw_httpx(url: str, ids: list[str], seconds: float, concurrency: int,
                    http: httpx.AsyncClient) -> int:
    """The same bare loop as raw_aiohttp, through an httpx client: the floor under foxpoll."""
    polls = 0
    deadline = time.monotonic() + seconds
    headers = {"X-API-Key": API_KEY}
    async with http:
        async def worker(offset: int) -> None:
            nonlocal polls
            index = offset
            while time.monotonic() < deadline:
                response = await http.get(f"{url}/api/orders/{ids[index % len(ids)]}",
                                          headers=headers)
                response.json()
                polls += 1
                index += concurrency

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return polls


async def foxpoll_wait_many(url: str, ids: list[str], seconds: float, concurrency: int,
                            http: httpx.AsyncClient | None = None,
                            transport: httpx.AsyncBaseTransport | None = None) -> int:
    polls = 0

    def count(attempt: PollAttempt) -> None:
        nonlocal polls
        polls += 1

    async with AsyncFoxReload(API_KEY, base_url=url, http_client=http,
                              transport=transport) as client:
        async for _ in client.wait_many(ids, policy=NEVER_DONE, timeout=seconds,
                                        max_in_flight=concurrency, listener=OnPoll(count)):
            pass
    if http is not None:
        await http.aclose()
    return polls


async def foxpoll_tasks(url: str, ids: list[str], seconds: float, concurrency: int,
                        transport: httpx.AsyncBaseTransport | None = None) -> int:
    """One task per wait on a default client; ``concurrency`` is not used: the client's
    own ``max_in_flight`` decides."""
    polls = 0

    def count(attempt: PollAttempt) -> None:
        nonlocal polls
        polls += 1

    async with AsyncFoxReload(API_KEY, base_url=url, transport=transport) as client:

        async def wait(order_id: str) -> None:
            with contextlib.suppress(OrderStalled):
                await client.wait_for_completion(order_id, policy=NEVER_DONE, timeout=seconds,
                                                 listener=OnPoll(count))

        await asyncio.gather(*(wait(order_id) for order_id in ids))
    return polls


def fast_client(concurrency: int) -> httpx.AsyncClient:
    from foxpoll.transports import fast_http_client

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    return fast_http_client(limits=limits)


def fast_transport(concurrency: int) -> httpx.AsyncBaseTransport:
    from foxpoll.transports import AiohttpTransport

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    return AiohttpTransport(limits=limits)


def httpx_aiohttp_client(concurrency: int) -> httpx.AsyncClient:
    from httpx_aiohttp import AiohttpTransport

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    return httpx.AsyncClient(transport=AiohttpTransport(limits=limits))


def httpx_client(concurrency: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    return httpx.AsyncClient(limits=limits)


def variants(
    url: str, ids: list[str], secs: float, c: int
) -> dict[str, Callable[[], Awaitable[int]]]:
    return {
        "raw aiohttp": lambda: raw_aiohttp(url, ids, secs, c),
        "raw httpx": lambda: raw_httpx(url, ids, secs, c, httpx_client(c)),
        "foxpoll (httpx)": lambda: foxpoll_wait_many(url, ids, secs, c, httpx_client(c)),
        "raw httpx (fast)": lambda: raw_httpx(url, ids, secs, c, fast_client(c)),
        "foxpoll (httpx-aiohttp)": lambda: foxpoll_wait_many(
            url, ids, secs, c, httpx_aiohttp_client(c)
        ),
        "foxpoll (fast)": lambda: foxpoll_wait_many(
            url, ids, secs, c, transport=fast_transport(c)
        ),
        "foxpoll, task per wait": lambda: foxpoll_tasks(url, ids, secs, c),
        "foxpoll, task/wait, fast": lambda: foxpoll_tasks(
            url, ids, secs, c, transport=fast_transport(100)
        ),
    }


def measure(run: Callable[[], Awaitable[int]]) -> tuple[float, float]:
    """(polls per second, CPU seconds per 1,000 polls) of one variant."""
    gc.collect()
    cpu, wall = time.process_time(), time.perf_counter()
    polls = asyncio.run(run())  # type: ignore[arg-type]
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return polls / wall, 1000 * cpu / max(1, polls)


def memory_per_waiting_order(n: int) -> float:
    """Bytes of growth per order while n waits sit between polls (in process, tracemalloc)."""
    sim = FakeFoxReload(clock=FakeClock(), default_script=OrderScript.stall(),
                        record_requests=False)
    ids = []
    for _ in range(n):
        request = httpx.Request("POST", f"{sim.base_url}/api/orders/",
                                headers={"X-API-Key": sim.api_key},
                                json={"items": [{"itemId": "product_steam_10"}]})
        ids.append(sim.handle(request).json()["id"])

    class AllWaiting(Exception):
        pass

    async def run() -> float:
        async with sim.async_client() as client:
            seen = 0
            peak = 0.0

            def probe(attempt: PollAttempt) -> None:
                nonlocal seen, peak
                seen += 1
                if seen == n:  # every order polled once and scheduled for an hour from now
                    current, _ = tracemalloc.get_traced_memory()
                    peak = float(current)
                    raise AllWaiting

            gc.collect()
            tracemalloc.start()
            before, _ = tracemalloc.get_traced_memory()
            try:
                async for _ in client.wait_many(ids, policy=WaitPolicy(backoff=Fixed(3600)),
                                                max_in_flight=64, listener=OnPoll(probe)):
                    pass
            except AllWaiting:
                pass
            finally:
                tracemalloc.stop()
            return (peak - before) / n

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100,1000,10000")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"{args.seconds:.0f}s per variant, {args.concurrency} requests in flight, "
          f"{os.cpu_count()} CPUs; server in its own process\n")
    print(f"{'orders':>7}  {'variant':<24}{'polls/s':>9}{'CPU s/1k polls':>16}"
          f"{'vs raw aiohttp':>16}")
    for n in sizes:
        server = Server(n)
        try:
            runs = variants(server.url, server.order_ids, args.seconds, args.concurrency)
            results = {name: measure(run) for name, run in runs.items()}
        finally:
            server.stop()
        raw_rate = results["raw aiohttp"][0]
        for name, (rate, cpu) in results.items():
            print(f"{n:>7}  {name:<24}{rate:>9.0f}{cpu:>16.3f}{rate / raw_rate:>15.2f}x")
    print(f"\n{'orders':>7}  memory per waiting order (target < 10 KB)")
    for n in sizes:
        print(f"{n:>7}  {memory_per_waiting_order(n) / 1024:.2f} KB")


if __name__ == "__main__":
    main()
