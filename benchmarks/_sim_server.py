"""The simulator behind an aiohttp server, for load tests; run by throughput.py.

Prints one JSON line ``{"url": ..., "order_ids": [...]}`` once it accepts connections.
Every order is paid and stalls in ``processing``, so each poll does the full work.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

import httpx
from aiohttp import web

from foxpoll import SystemClock
from foxpoll.testing import FakeFoxReload, OrderScript


def make_sim(orders: int) -> tuple[FakeFoxReload, list[str]]:
    sim = FakeFoxReload(clock=SystemClock(), default_script=OrderScript.stall(),
                        record_requests=False)
    headers = {"X-API-Key": sim.api_key}
    ids = []
    for _ in range(orders):
        create = httpx.Request("POST", f"{sim.base_url}/api/orders/", headers=headers,
                               json={"items": [{"itemId": "product_steam_10"}]})
        order_id = sim.handle(create).json()["id"]
        pay = httpx.Request("POST", f"{sim.base_url}/api/orders/{order_id}/pay",
                            headers=headers, json={"paymentProvider": None})
        sim.handle(pay)
        ids.append(order_id)
    return sim, ids


async def serve(orders: int, port: int) -> None:
    sim, ids = make_sim(orders)

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        answer = sim.handle(httpx.Request(request.method, str(request.url),
                                          headers=dict(request.headers), content=body))
        return web.Response(status=answer.status_code, body=answer.content,
                            content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=1024)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(json.dumps({"url": f"http://127.0.0.1:{bound}", "order_ids": ids}), flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--orders", type=int, required=True)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    try:
        asyncio.run(serve(args.orders, args.port))
    except KeyboardInterrupt:
        sys.exit(0)
