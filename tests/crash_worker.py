"""A worker that claims an order and hangs inside deliver(), to be killed with SIGKILL.

Usage: python crash_worker.py BACKEND TARGET ORDER_ID LEASE
Prints "delivering" (flushed) once inside deliver(), then sleeps until killed.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from foxpoll import Order, OrderStatus, deliver_once
from foxpoll.models import OrderItem


def make_store(backend: str, target: str) -> Any:
    if backend == "sqlite":
        from foxpoll.dedup import SQLiteDedupStore

        return SQLiteDedupStore(target)
    if backend == "postgres":
        from foxpoll.dedup import PostgresDedupStore

        url, table = target.split("#")
        return PostgresDedupStore(url, table=table)
    if backend == "redis":
        from foxpoll.dedup import RedisDedupStore

        url, prefix = target.split("#")
        return RedisDedupStore(url, key_prefix=prefix)
    if backend == "dynamodb":
        import boto3

        from foxpoll.dedup import DynamoDBDedupStore

        url, table = target.split("#")
        return DynamoDBDedupStore(table, client=boto3.client("dynamodb", endpoint_url=url))
    raise SystemExit(f"unknown backend {backend}")


def order(order_id: str) -> Order:
    return Order(id=order_id, status=OrderStatus.COMPLETED,
                 items=(OrderItem("p", 1, external_data=("CODE-1",)),))


def hang(o: Order) -> None:
    print("delivering", flush=True)
    time.sleep(3600)


if __name__ == "__main__":
    backend, target, order_id, lease = sys.argv[1:5]
    deliver_once(order(order_id), hang, make_store(backend, target), lease=float(lease))
