"""A process killed between pay and wait: its watch fires on its client's wait policy, and
a recovery worker delivers the order once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from foxpoll import FoxReload, Order, SystemClock, WaitPolicy
from foxpoll.dedup import DeliveryState, SQLiteDedupStore
from foxpoll.recovery import JobState, RecoveryWorker, SQLiteRecoveryQueue
from foxpoll.testing import FakeClock, FakeFoxReload, OrderScript, SimulatorServer

WAIT_TIMEOUT = 45.0


def test_a_process_killed_after_pay_has_its_order_recovered_within_the_policy_horizon(
    tmp_path: Path,
) -> None:
    path = tmp_path / "queue.db"
    with SQLiteRecoveryQueue(path):  # the schema, before the worker starts
        pass
    # The API outlives the killed process: a simulator served over HTTP from here.
    sim = FakeFoxReload(clock=SystemClock(), default_script=OrderScript.complete(after=0))
    with SimulatorServer(sim) as server:
        before = time.time()
        with subprocess.Popen(  # noqa: S603 - our own test worker
            [sys.executable, str(Path(__file__).with_name("pay_worker.py")), str(path),
             str(WAIT_TIMEOUT)],
            stdout=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": os.getcwd(), "FOXRELOAD_BASE_URL": server.url,
                 "FOXRELOAD_API_KEY": sim.api_key},
        ) as worker:
            try:
                assert worker.stdout is not None
                order_id = worker.stdout.readline().strip()
                os.kill(worker.pid, signal.SIGKILL)
                assert worker.wait(timeout=10) == -signal.SIGKILL
            finally:
                if worker.poll() is None:
                    worker.kill()
        after = time.time()
        assert sim.order_ids() == [order_id]

        with SQLiteRecoveryQueue(path) as queue:
            job = queue.get(order_id)
            lease = queue.policy.watch_lease
        assert job is not None
        assert (job.state, job.reason) == (JobState.QUEUED, "watch")
        # Due a lease after the payment, which nothing renewed...
        assert before + lease <= job.due_at <= after + lease  # a lease after its last renewal
        # ...not after the default schedule's ~23 minutes.
        assert job.due_at - after < WaitPolicy().horizon() / 4

        # Recovery, on a clock that jumps to the watch's due time instead of waiting it out.
        clock = FakeClock(epoch=time.time())
        delivered: list[Order] = []
        with SQLiteRecoveryQueue(path, clock=clock) as queue, \
                SQLiteDedupStore(tmp_path / "dedup.db") as store, \
                FoxReload(api_key=sim.api_key, base_url=server.url, clock=clock) as client:
            recovery = RecoveryWorker(client, queue, store, on_completed=delivered.append)
            assert recovery.run_pending() == 0  # not due yet: the wait might still be running
            clock.advance(job.due_at - clock.time())
            assert recovery.run_pending() == 1
            assert recovery.run_pending() == 0
            # A second look (a requeued job, another worker) finds it delivered already.
            assert recovery.recheck(order_id, 1).action.kind == "deliver"
            done = queue.get(order_id)
            record = store.get(order_id)
    assert [order.id for order in delivered] == [order_id]
    assert delivered[0].codes
    assert done is not None
    assert (done.state, done.note) == (JobState.DONE, "completed")
    assert record is not None
    assert record.state is DeliveryState.DELIVERED
