"""A process that buys one order with ``FoxReload.buy`` and stops at a stage, to be
SIGKILLed there.

Usage: python buy_worker.py CONFIG_JSON. The config names the stage, the simulator
served over HTTP (it outlives this process), the engine (``sqlite`` or ``postgres``)
and where its recovery queue, dedup store and shared budget live, and the file that
records deliveries.

At its stage the process prints the stage's name (flushed) and sleeps until killed:

``before_create``  the create request is about to be sent
``after_create``   the create was answered: an order exists, unpaid
``pay_sending``    the watch is written and the payment is about to be sent
``pay_answered``   the payment was taken and answered; ``buy`` has not seen it yet
``waiting``        the wait is about to poll
``delivering``     inside ``deliver``, holding the claim, before anything is sent
``none``           no stop: prints ``done OUTCOME`` once ``buy`` returns
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import httpx

from foxpoll import Fixed, FoxReload, Order, WaitPolicy
from foxpoll.recovery import RecoveryPolicy

#: Short times, so that the test's recovery runs in seconds; the defaults are minutes.
WAIT = WaitPolicy(backoff=Fixed(0.2), max_attempts=50)
POLICY = RecoveryPolicy(max_attempts=60, backoff=Fixed(0.3), watch_margin=1.0,
                        watch_lease=1.5, delivery_grace=0.5)
LEASE = 1.0  # the delivery claim's, so that a killed deliverer's claim expires soon


def parts(config: dict[str, Any]) -> tuple[Any, Any, Any]:
    """The recovery queue, the dedup store and the shared budget the config names."""
    if config["engine"] == "sqlite":
        from foxpoll.dedup import SQLiteDedupStore
        from foxpoll.ratelimit import SQLiteRateLimit
        from foxpoll.recovery import SQLiteRecoveryQueue

        return (SQLiteRecoveryQueue(config["queue"], policy=POLICY),
                SQLiteDedupStore(config["store"]),
                SQLiteRateLimit(config["budget"], per_minute=6000))
    from foxpoll.dedup import PostgresDedupStore
    from foxpoll.ratelimit import RedisRateLimit
    from foxpoll.recovery import PostgresRecoveryQueue

    return (PostgresRecoveryQueue(config["db"], table=config["queue"], policy=POLICY),
            PostgresDedupStore(config["db"], table=config["store"]),
            RedisRateLimit(config["redis"], per_minute=6000, key_prefix=config["budget"]))


def recorder(path: str, who: str) -> Any:
    """A ``deliver`` that appends ``ORDER_ID WHO`` to ``path``: the customer's inbox."""

    def deliver(order: Order) -> None:
        with open(path, "a") as inbox:
            inbox.write(f"{order.id} {who}\n")

    return deliver


def stop(stage: str) -> None:
    print(stage, flush=True)
    time.sleep(3600)


def main(config: dict[str, Any]) -> None:
    stage = config["stage"]

    def on_request(request: httpx.Request) -> None:
        path = request.url.path
        if request.method == "POST" and path == "/api/orders/" and stage == "before_create":
            stop(stage)
        if request.method == "POST" and path.endswith("/pay") and stage == "pay_sending":
            stop(stage)
        if request.method == "GET" and stage == "waiting":
            stop(stage)

    def on_response(response: httpx.Response) -> None:
        request = response.request
        if request.method == "POST" and request.url.path == "/api/orders/" \
                and stage == "after_create":
            stop(stage)
        if request.method == "POST" and request.url.path.endswith("/pay") \
                and stage == "pay_answered":
            stop(stage)

    deliver = recorder(config["inbox"], "buyer")

    def deliver_or_stop(order: Order) -> None:
        if stage == "delivering":
            stop(stage)
        deliver(order)

    queue, store, budget = parts(config)
    http = httpx.Client(event_hooks={"request": [on_request], "response": [on_response]})
    with FoxReload(config["api_key"], base_url=config["sim_url"], http_client=http,
                   recovery_queue=queue, rate_limit=budget, wait_policy=WAIT) as client:
        purchase = client.buy([{"itemId": "product_steam_10", "note": {"buyer": stage}}],
                              deliver=deliver_or_stop, store=store, lease=LEASE)
    print("done", purchase.outcome.value, flush=True)


if __name__ == "__main__":
    with open(sys.argv[1]) as file:
        settings = json.load(file)
    main(settings)
