"""Buy several orders and wait for all of them in one loop, with the async client.

Runs on the in-process simulator (virtual time): python examples/quickstart_async.py
"""

from __future__ import annotations

import asyncio

from foxpoll import OrderStalled
from foxpoll.testing import FakeFoxReload, OrderScript


async def main() -> None:
    sim = FakeFoxReload()
    sim.script_next(OrderScript.complete(after=8), OrderScript.fail(after=20),
                    OrderScript.complete(after=40), OrderScript.stall())
    items = [("product_steam_10", None), ("product_esim_eu_5gb", None),
             ("product_pubg_660", {"player_id": "5123"}), ("product_steam_50", None)]
    async with sim.async_client() as client:
        ids = []
        for item_id, note in items:
            order = await client.orders.create(items=[{"itemId": item_id, "note": note}])
            await client.orders.pay(order.id)
            ids.append(order.id)
        async for result in client.wait_many(ids, max_requests_per_minute=100):
            if result.ok:
                print(f"{result.order_id}: completed, {len(result.unwrap().codes)} code(s)")
            elif isinstance(result.error, OrderStalled):
                print(f"{result.order_id}: stalled, hand it to the recovery queue")
            else:
                print(f"{result.order_id}: {result.error}")


if __name__ == "__main__":
    asyncio.run(main())
