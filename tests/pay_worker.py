"""A process that pays an order and is killed with SIGKILL before it waits.

Usage: python pay_worker.py QUEUE_PATH WAIT_TIMEOUT, with FOXRELOAD_BASE_URL and
FOXRELOAD_API_KEY naming a simulator served over HTTP (it outlives this process).
Prints the paid order's id (flushed), then sleeps until killed.
"""

from __future__ import annotations

import sys
import time

from foxpoll import FoxReload, WaitPolicy
from foxpoll.recovery import SQLiteRecoveryQueue

if __name__ == "__main__":
    path, timeout = sys.argv[1], float(sys.argv[2])
    with FoxReload(recovery_queue=SQLiteRecoveryQueue(path),
                   wait_policy=WaitPolicy(timeout=timeout)) as client:
        order = client.orders.create(items=[{"itemId": "product_steam_10"}])
        client.orders.pay(order.id)
        print(order.id, flush=True)
        time.sleep(3600)  # the wait would start here
