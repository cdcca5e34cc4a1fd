"""Create, pay and read an order with the blocking client, on the in-process simulator.

Run: python examples/quickstart_sync.py
"""

from __future__ import annotations

from foxpoll import AmbiguousOrderError, OrderStatus
from foxpoll.backoff import ExponentialJitter
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
        client.orders.pay(order.id)
        order = client.wait_for_completion(
            order.id,
            backoff=ExponentialJitter(poll_at_start=False),  # just paid: nothing to see yet
            on_status_change=lambda change: print(f"  {change.previous} -> {change.order.status}"
                                                  f" after {change.elapsed:.0f}s"),
        )
        assert order.status is OrderStatus.COMPLETED
        print(f"order {order.id}: {len(order.codes)} code(s) delivered")


if __name__ == "__main__":
    main()
