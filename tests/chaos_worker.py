"""A process of the chaos test: a waiter (pays some orders, waits for its share, delivers)
or a recovery worker. Both deliver by inserting a row into ``chaos_deliveries`` and then
taking a while, the window in which a SIGKILL leaves a sent delivery unrecorded.

Usage: python chaos_worker.py waiter|recovery CONFIG_JSON
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg

from foxpoll import FoxReload, Order
from foxpoll.backoff import Fixed
from foxpoll.dedup import PostgresDedupStore
from foxpoll.delivery import deliver_once
from foxpoll.errors import DeliveryInProgress
from foxpoll.polling import WaitPolicy
from foxpoll.recovery import RecoveryPolicy, RecoveryWorker

POLICY = RecoveryPolicy(max_attempts=8, backoff=Fixed(1.0), watch_margin=1.0,
                        delivery_grace=2.0, watch_lease=2.0)


def make_queue(config: dict[str, Any]) -> Any:
    if config["engine"] == "sqlite":
        from foxpoll.recovery import SQLiteRecoveryQueue

        return SQLiteRecoveryQueue(config["sqlite_path"], policy=POLICY)
    from foxpoll.recovery import ProcrastinateRecoveryQueue

    return ProcrastinateRecoveryQueue(config["db"], policy=POLICY, dispatch_every=0.3,
                                      stalled_after=1.0)


def deliverer(db: str, kind: str) -> Any:
    conn = psycopg.connect(db, autocommit=True)

    def deliver(order: Order) -> None:
        conn.execute("INSERT INTO chaos_deliveries (order_id, pid, kind) VALUES (%s, %s, %s)",
                     (order.id, os.getpid(), kind))
        time.sleep(0.3)  # the downstream takes its time: a kill here is mid-delivery

    return deliver


def waiter(config: dict[str, Any]) -> None:
    store = PostgresDedupStore(config["db"])
    deliver = deliverer(config["db"], "waiter")
    with make_queue(config) as queue, FoxReload(config["api_key"], base_url=config["sim_url"],
                                                recovery_queue=queue) as client:
        for order_id in config["pay"]:
            client.orders.pay(order_id)
        Path(config["marker"]).touch()  # paid: now waiting
        policy = WaitPolicy(backoff=Fixed(0.5), max_attempts=14)
        for result in client.wait_many(config["wait"], policy=policy):
            if result.ok:
                # DeliveryInProgress: the other owner is delivering it; if that one dies,
                # its claim expires and the settled watch has a worker deliver it.
                with contextlib.suppress(DeliveryInProgress):
                    deliver_once(result.unwrap(), deliver, store, lease=2.0)


def recovery(config: dict[str, Any]) -> None:
    store = PostgresDedupStore(config["db"])
    deliver = deliverer(config["db"], "recovery")
    with make_queue(config) as queue, FoxReload(config["api_key"],
                                                base_url=config["sim_url"]) as client:
        worker = RecoveryWorker(client, queue, store, on_completed=deliver, lease=3.0)
        if config["engine"] == "sqlite":
            worker.run(stop=threading.Event(), idle=0.2)
        else:
            queue.run_worker(worker, concurrency=2, update_heartbeat_interval=0.2,
                             fetch_job_polling_interval=0.3)


if __name__ == "__main__":
    role, path = sys.argv[1:3]
    with open(path) as file:
        settings = json.load(file)
    {"waiter": waiter, "recovery": recovery}[role](settings)
