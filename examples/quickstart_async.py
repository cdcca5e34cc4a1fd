"""Buy three orders concurrently with the async client, on the in-process simulator.

Run: python examples/quickstart_async.py
"""

from __future__ import annotations

import asyncio

from foxpoll import AsyncFoxReload, Order, OrderFailed
from foxpoll.testing import FakeFoxReload, OrderScript


async def buy(client: AsyncFoxReload, item_id: str, note: dict[str, str] | None) -> Order:
    order = await client.orders.create(items=[{"itemId": item_id, "note": note}])
    order = await client.orders.pay(order.id)
    while not order.is_terminal:
        await client.clock.asleep(5)
        order = await client.orders.get(order.id)
    if order.status == "failed":
        raise OrderFailed(order)
    return order


async def main() -> None:
    sim = FakeFoxReload()
    sim.script_next(OrderScript.complete(after=8), OrderScript.fail(after=20),
                    OrderScript.complete(after=40))
    async with sim.async_client() as client:
        results = await asyncio.gather(
            buy(client, "product_steam_10", None),
            buy(client, "product_esim_eu_5gb", None),
            buy(client, "product_pubg_660", {"player_id": "5123"}),
            return_exceptions=True,
        )
    for result in results:
        if isinstance(result, Order):
            print(f"{result.id}: completed with {len(result.codes)} code(s)")
        else:
            print(f"failed: {result}")


if __name__ == "__main__":
    asyncio.run(main())
