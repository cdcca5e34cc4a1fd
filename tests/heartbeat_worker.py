"""A buyer of the heartbeat test: pays its orders, then waits for them on the client's
default schedule and the queue's default policy, until its waits end or it is killed.

Usage: python heartbeat_worker.py CONFIG_JSON
Touches the config's ``marker`` file once every order is paid.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from foxpoll import FoxReload


def make_queue(config: dict[str, Any]) -> Any:
    if config["engine"] == "sqlite":
        from foxpoll.recovery import SQLiteRecoveryQueue

        return SQLiteRecoveryQueue(config["sqlite_path"])
    if config["engine"] == "procrastinate":  # the buyers only write and renew watches
        from foxpoll.recovery import ProcrastinateRecoveryQueue

        return ProcrastinateRecoveryQueue(config["db"], table=config["table"])
    from foxpoll.recovery import PostgresRecoveryQueue

    return PostgresRecoveryQueue(config["db"], table=config["table"])


def buy(config: dict[str, Any]) -> None:
    with make_queue(config) as queue, FoxReload(config["api_key"], base_url=config["sim_url"],
                                                recovery_queue=queue) as client:
        for order_id in config["orders"]:
            client.orders.pay(order_id)
        Path(config["marker"]).touch()  # paid: now waiting
        for _ in client.wait_many(config["orders"]):
            pass


if __name__ == "__main__":
    with open(sys.argv[1]) as file:
        buy(json.load(file))
