"""FastAPI-style background waiting: answer the buyer at once, wait and deliver behind.

A web handler must not hold a request open for the minutes an order can take. It creates
and pays the order, hands the wait to a background task, and answers 202 with the order
id. The task waits, delivers the codes exactly once, and the buyer's next request (or a
push) finds them. In FastAPI the handler would be::

    @app.post("/buy", status_code=202)
    async def buy(item_id: str, background: BackgroundTasks):
        order = await client.orders.create(items=[{"itemId": item_id}])
        await client.orders.pay(order.id)
        background.add_task(wait_and_deliver, order.id)
        return {"order_id": order.id}

This file runs the same flow with plain asyncio against the simulator:
python examples/background_waiting.py
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from foxpoll import (
    AsyncFoxReload,
    Order,
    OrderFailed,
    OrderStalled,
    WaitPolicy,
    adeliver_once,
)
from foxpoll.dedup import AsyncSQLiteDedupStore
from foxpoll.testing import FakeFoxReload, OrderScript

inbox: dict[str, list[str]] = {}  # what each buyer has received


async def deliver_to_buyer(order: Order) -> str:
    inbox.setdefault(order.id, []).extend(str(code) for code in order.codes)
    return "inbox"


async def wait_and_deliver(client: AsyncFoxReload, store: AsyncSQLiteDedupStore,
                           order_id: str) -> None:
    """The background task: never raises into the web framework, always records an outcome."""
    try:
        order = await client.wait_for_completion(order_id)
        await adeliver_once(order, deliver_to_buyer, store)
        print(f"  background: {order_id[:8]} delivered")
    except OrderFailed as exc:
        print(f"  background: {order_id[:8]} failed ({exc.order.items[0].error}); refund it")
    except OrderStalled:
        print(f"  background: {order_id[:8]} stalled; the recovery queue takes it from here")


async def buy(client: AsyncFoxReload, store: AsyncSQLiteDedupStore, item_id: str,
              background: set[asyncio.Task[None]]) -> dict[str, str]:
    """The request handler: returns at once (202) with the order id."""
    order = await client.orders.create(items=[{"itemId": item_id}])
    await client.orders.pay(order.id)
    task = asyncio.create_task(wait_and_deliver(client, store, order.id))
    background.add(task)
    task.add_done_callback(background.discard)
    return {"order_id": order.id, "status": "accepted"}


async def main() -> None:
    sim = FakeFoxReload()
    sim.script_next(OrderScript.complete(after=12), OrderScript.complete(after=40),
                    OrderScript.fail(after=8))
    background: set[asyncio.Task[None]] = set()
    with tempfile.TemporaryDirectory() as tmp:
        store = AsyncSQLiteDedupStore(Path(tmp) / "deliveries.db")
        # Every wait starts right after a payment: the schedule for that, as the default.
        async with sim.async_client(wait_policy=WaitPolicy.after_payment()) as client:
            answers = [await buy(client, store, item, background)
                       for item in ("product_steam_10", "product_esim_eu_5gb",
                                    "product_steam_50")]
            for answer in answers:
                print(f"202 Accepted {answer}")
            await asyncio.gather(*background)
        await store.aclose()
    delivered = {order_id[:8]: len(codes) for order_id, codes in inbox.items()}
    print(f"buyers' inboxes: {delivered}")
    assert len(inbox) == 2


if __name__ == "__main__":
    asyncio.run(main())
