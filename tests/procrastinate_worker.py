"""A procrastinate recovery worker process, for the multi-process tests.

Usage: python procrastinate_worker.py DB_URL SIM_URL API_KEY MODE
MODE "share": deliver by recording (order_id, pid) in table handled, slowly; exit when
    no job is due.
MODE "hang": print "delivering" once inside deliver(), then hang until killed.
MODE "serve": like "share", but keep working (and dispatching) until terminated.
"""

from __future__ import annotations

import os
import sys
import time

import psycopg

from foxpoll import FoxReload, Order
from foxpoll.dedup import PostgresDedupStore
from foxpoll.recovery import ProcrastinateRecoveryQueue, RecoveryWorker


def main() -> None:
    db_url, sim_url, api_key, mode = sys.argv[1:5]

    def record(order: Order) -> None:
        time.sleep(0.2)
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute("INSERT INTO handled (order_id, pid) VALUES (%s, %s)",
                         (order.id, os.getpid()))

    def hang(order: Order) -> None:
        print("delivering", flush=True)
        time.sleep(3600)

    queue = ProcrastinateRecoveryQueue(db_url, dispatch_every=0.3, stalled_after=1.0)
    with FoxReload(api_key, base_url=sim_url) as client, queue, \
            PostgresDedupStore(db_url) as store:
        worker = RecoveryWorker(client, queue, store,
                                on_completed=hang if mode == "hang" else record, lease=2.0)
        queue.run_worker(worker, wait=mode == "serve", concurrency=2,
                         update_heartbeat_interval=0.2, fetch_job_polling_interval=0.3,
                         install_signal_handlers=mode == "serve")


if __name__ == "__main__":
    main()
