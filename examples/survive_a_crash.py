"""A paid order outlives the process that was waiting for it.

This script serves the FoxReload simulator over HTTP and starts a second process that
buys an order, pays it and waits for it. The second process is killed with SIGKILL in the
middle of its wait. Nothing else knows about the order: there is no table of pending
orders and no sweep. But the client recorded a *watch* in the recovery queue before it
paid. The dead process no longer renews its watch, which fires a lease later, and a
RecoveryWorker delivers the codes, once.

Run: python examples/survive_a_crash.py
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from foxpoll import Fixed, FoxReload, Order, SystemClock, WaitPolicy
from foxpoll.dedup import SQLiteDedupStore
from foxpoll.recovery import JobState, RecoveryPolicy, RecoveryWorker, SQLiteRecoveryQueue
from foxpoll.testing import FakeFoxReload, OrderScript, SimulatorServer

# Short times so the example runs in seconds; the defaults are minutes.
POLICY = RecoveryPolicy(max_attempts=5, backoff=Fixed(1.0), watch_margin=1.0, watch_lease=3.0)
WAIT = WaitPolicy(backoff=Fixed(0.5), max_attempts=8)  # gives up after about 4 s


def buyer(sim_url: str, api_key: str, db: str) -> None:
    """The process that dies: buy, pay (the watch is written first), wait."""
    queue = SQLiteRecoveryQueue(db, policy=POLICY)
    with FoxReload(api_key, base_url=sim_url, recovery_queue=queue, wait_policy=WAIT) as client:
        order = client.orders.create(items=[{"itemId": "product_steam_10"}])
        client.orders.pay(order.id)
        print(order.id, flush=True)
        client.wait_for_completion(order.id)  # killed in here


def main() -> None:
    sim = FakeFoxReload(clock=SystemClock(), default_script=OrderScript.complete(after=3))
    with tempfile.TemporaryDirectory() as tmp, SimulatorServer(sim) as server:
        db = str(Path(tmp) / "foxpoll.db")
        child = subprocess.Popen(  # noqa: S603 - this very script
            [sys.executable, __file__, "buyer", server.url, sim.api_key, db],
            stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None
        order_id = child.stdout.readline().strip()
        time.sleep(1.0)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        child.stdout.close()
        print(f"order {order_id[:8]}: paid, then its waiting process was killed")

        delivered: list[Order] = []
        with SQLiteRecoveryQueue(db, policy=POLICY) as queue, \
                FoxReload(sim.api_key, base_url=server.url) as client:
            job = queue.get(order_id)
            assert job is not None
            print(f"the queue holds its watch ({job.reason}), due in "
                  f"{job.due_at - time.time():.1f}s")
            worker = RecoveryWorker(client, queue, SQLiteDedupStore(db),
                                    on_completed=delivered.append, lease=10.0)
            while (job := queue.get(order_id)) is not None and job.state is JobState.QUEUED:
                worker.run_pending()
                time.sleep(0.2)
        assert [order.id for order in delivered] == [order_id]
        print(f"order {order_id[:8]}: {job.note if job else '?'}, {len(delivered[0].codes)} "
              "code(s) delivered by the recovery worker, once")


if __name__ == "__main__":
    if sys.argv[1:2] == ["buyer"]:
        buyer(*sys.argv[2:5])
    else:
        main()
