"""Create, pay and read an order with the blocking client, on the in-process simulator.

Run: python examples/quickstart_sync.py
"""

from __future__ import annotations

from foxpoll import AmbiguousOrderError, OrderStatus
from foxpoll.testing import FakeFoxReload, OrderScript


def main() -> None:
    sim = FakeFoxReload()  # virtual time: nothing here really sleeps
    sim.script_next(OrderScript.complete(after=12))
    with sim.client() as client:
        product = client.products.list(category="steam", limit=1).items[0]
        print(f"buying {product.name} for {product.price} {product.currency}")
        try:
            order = client.orders.create(items=[{"itemId": product.id, "quantity": 1}])
        except AmbiguousOrderError as exc:
            # Never retry a create blindly: it may have bought the goods already.
            print("outcome unknown; reconcile", exc.request_body)
            raise
        order = client.orders.pay(order.id)
        while not order.is_terminal:
            client.clock.sleep(5)  # wait_for_completion does this with proper backoff
            order = client.orders.get(order.id)
            print(f"  {order.status}")
        assert order.status is OrderStatus.COMPLETED
        print(f"order {order.id}: {len(order.codes)} code(s) delivered")


if __name__ == "__main__":
    main()
