"""End to end: wait, deliver once, recover a stalled order, fan events out to consumers.

Four orders are bought from the in-process simulator (virtual time): two complete, one
fails, one stalls at the supplier. Waiting ends with the stalled one in the recovery queue
(the client is configured with it). The codes of completed orders are delivered exactly
once, and each terminal order publishes one event to a Redis stream. A recovery worker
re-checks the stalled order until it completes, delivers it, and publishes its event.
Two consumer groups, "telegram" and "email", each receive every event.

Needs Redis on localhost (REDIS_URL to change it). Run: python examples/recovery_and_events.py
"""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

import redis

from foxpoll import Order, WaitPolicy, deliver_once
from foxpoll.dedup import SQLiteDedupStore
from foxpoll.events import OrderEvent, RedisStreamConsumer, RedisStreamPublisher
from foxpoll.recovery import RecoveryWorker, SQLiteRecoveryQueue
from foxpoll.testing import FakeFoxReload, OrderScript

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


def main() -> None:
    prefix = f"foxpoll-example-{uuid.uuid4().hex[:8]}:"
    sim = FakeFoxReload()  # virtual time: the recovery's minutes pass at once
    clock = sim.clock
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteDedupStore(Path(tmp) / "foxpoll.db", clock=clock)
        queue = SQLiteRecoveryQueue(Path(tmp) / "foxpoll.db", clock=clock)
        publisher = RedisStreamPublisher(REDIS_URL, key_prefix=prefix)
        sent: list[str] = []

        def send_codes(order: Order) -> str:
            """Deliver, then publish, inside the claim: neither is lost to a crash."""
            sent.append(order.id)
            publisher.publish(OrderEvent.from_order(order, now=clock.time()))
            return f"mail-{len(sent)}"

        consumers = {
            group: RedisStreamConsumer(
                REDIS_URL, key_prefix=prefix, group=group, consumer=f"{group}-1", block=None,
                handler=lambda event, g=group: print(
                    f"  [{g}] order {event.order_id[:8]} {event.status}, "
                    f"{len(event.codes)} code(s)"),
            )
            for group in ("telegram", "email")
        }
        for consumer in consumers.values():
            consumer.ensure_group()

        sim.script_next(OrderScript.complete(after=20), OrderScript.complete(after=75),
                        OrderScript.fail(after=30), OrderScript.stall())
        with sim.client(recovery_queue=queue) as client:
            ids = []
            for _ in range(4):
                order = client.orders.create(items=[{"itemId": "product_steam_10"}])
                client.orders.pay(order.id)
                ids.append(order.id)

            print("waiting for 4 orders...")
            for result in client.wait_many(ids, policy=WaitPolicy.after_payment(max_attempts=15)):
                if result.ok:
                    deliver_once(result.unwrap(), send_codes, store)
                    print(f"  {result.order_id[:8]} completed after {result.elapsed:.0f}s")
                elif result.stalled:
                    print(f"  {result.order_id[:8]} stalled: queued for recovery")
                else:
                    assert result.order is not None
                    publisher.publish(OrderEvent.from_order(result.order, now=clock.time()))
                    print(f"  {result.order_id[:8]} {result.order.status}")

            stalled = ids[3]
            sim.settle(stalled, after=1800)  # FoxReload finishes it half an hour later
            worker = RecoveryWorker(client, queue, store, on_completed=send_codes)
            checks = 0
            while (due := queue.next_due()) is not None:
                clock.advance(max(0.0, due - clock.time()))
                checks += worker.run_pending()
            print(f"recovery: {checks} re-checks, then delivered {stalled[:8]}")

        print("consumers:")
        for consumer in consumers.values():
            while consumer.consume():
                pass
        print(f"codes sent {len(sent)} times for {len(set(sent))} orders; "
              f"dead letters: {len(queue.list_dead())}")
        assert sorted(sent) == sorted({ids[0], ids[1], ids[3]})
        for consumer in consumers.values():
            consumer.close()
        publisher.close()
        client_redis = redis.Redis.from_url(REDIS_URL)
        client_redis.delete(f"{prefix}orders", f"{prefix}orders:dead")
        client_redis.close()
        store.close()
        queue.close()


if __name__ == "__main__":
    main()
