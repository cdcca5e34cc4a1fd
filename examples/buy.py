"""The whole job in one call: ``client.buy()`` creates, pays, waits and delivers, once.

On the in-process simulator and virtual time, with a SQLite dedup store and recovery
queue. The second purchase meets a create whose answer is lost: that order, if it was
made, is never paid and expires, and ``buy`` creates a fresh one.

Run: python examples/buy.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from foxpoll import Order, PurchaseOutcome, WaitPolicy
from foxpoll.dedup import SQLiteDedupStore
from foxpoll.recovery import SQLiteRecoveryQueue
from foxpoll.testing import FakeFoxReload, Fault, OrderScript


def send_to_customer(order: Order) -> None:  # yours: mail, bot, your own API
    print(f"  sent {len(order.codes)} code(s) of order {order.id}")


def main() -> None:
    sim = FakeFoxReload()  # virtual time: nothing here really sleeps
    sim.script_next(OrderScript.complete(after=12), OrderScript.complete(after=20),
                    OrderScript.complete(after=20), OrderScript.fail(after=8))
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "foxpoll.db"
        with SQLiteDedupStore(db) as store, \
                SQLiteRecoveryQueue(db, clock=sim.clock) as queue, \
                sim.client(recovery_queue=queue,
                           wait_policy=WaitPolicy.after_payment(timeout=600)) as client:
            purchase = client.buy([{"itemId": "product_steam_10"}],
                                  deliver=send_to_customer, store=store)
            print(f"1. {purchase.outcome.value}: order {purchase.order_id}")
            assert purchase.outcome is PurchaseOutcome.DELIVERED

            sim.inject(Fault.server_error_after_create())  # the create's answer is lost
            purchase = client.buy([{"itemId": "product_pubg_660"}], note={"player_id": "77"},
                                  deliver=send_to_customer, store=store)
            orphan = sim.order_ids()[1]
            print(f"2. {purchase.outcome.value}: order {purchase.order_id}, after a create "
                  f"of unknown outcome (order {orphan}: {sim.status_of(orphan)}, never paid)")
            assert purchase.ok
            assert len(purchase.possible_orphans) == 1

            purchase = client.buy([{"itemId": "product_steam_50"}],
                                  deliver=send_to_customer, store=store)
            print(f"3. {purchase.outcome.value}: {purchase.reason}")
            assert purchase.outcome is PurchaseOutcome.FAILED

            sim.clock.advance(900)  # the payment window: the orphan expires, unpaid
            print(f"order {orphan} is now {sim.status_of(orphan)}: nothing paid, "
                  "nothing delivered")


if __name__ == "__main__":
    main()
