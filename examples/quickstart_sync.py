"""Create, pay and read an order with the blocking client, on the in-process simulator.

Run: python examples/quickstart_sync.py
"""

from __future__ import annotations

from foxpoll import AmbiguousOrderError, Listener, OrderStatus, StatusChange, WaitPolicy
from foxpoll.testing import FakeFoxReload, OrderScript


class ShowProgress(Listener):
    """Told of every wait's events; this one prints each status change."""

    def on_status_change(self, change: StatusChange) -> None:
        print(f"  {change.previous} -> {change.order.status} after {change.elapsed:.0f}s")


def main() -> None:
    sim = FakeFoxReload()  # virtual time: nothing here really sleeps
    sim.script_next(OrderScript.complete(after=12))
    # Every wait of this client: just paid, so nothing to see at once; at most 10 minutes.
    with sim.client(wait_policy=WaitPolicy.after_payment(timeout=600),
                    listeners=[ShowProgress()]) as client:
        product = client.products.list(category="steam", limit=1).items[0]
        print(f"buying {product.name} for {product.price} {product.currency}")
        try:
            order = client.orders.create(items=[{"itemId": product.id, "quantity": 1}])
        except AmbiguousOrderError as exc:
            # Never retry a create blindly: it may have bought the goods already.
            print("outcome unknown; reconcile", exc.request_body)
            raise
        client.orders.pay(order.id)
        order = client.wait_for_completion(order.id)
        assert order.status is OrderStatus.COMPLETED
        print(f"order {order.id}: {len(order.codes)} code(s) delivered")


if __name__ == "__main__":
    main()
