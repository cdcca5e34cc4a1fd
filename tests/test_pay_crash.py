"""A process killed between pay and wait: its watch fires on its client's wait policy."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from foxpoll.polling import WaitPolicy
from foxpoll.recovery import JobState, SQLiteRecoveryQueue

WAIT_TIMEOUT = 45.0


def test_a_watch_written_at_pay_comes_due_within_the_client_policy_horizon(
    tmp_path: Path,
) -> None:
    path = tmp_path / "queue.db"
    with SQLiteRecoveryQueue(path):  # the schema, before the worker starts
        pass
    before = time.time()
    with subprocess.Popen(  # noqa: S603 - our own test worker
        [sys.executable, str(Path(__file__).with_name("pay_worker.py")), str(path),
         str(WAIT_TIMEOUT)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()},
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

    with SQLiteRecoveryQueue(path) as queue:
        job = queue.get(order_id)
        lease = queue.policy.watch_lease
    assert job is not None
    assert (job.state, job.reason) == (JobState.QUEUED, "watch")
    # Due a lease after the payment, which nothing renewed...
    assert before + lease <= job.due_at <= after + lease  # a lease after its last renewal
    # ...not after the default schedule's ~23 minutes.
    assert job.due_at - after < WaitPolicy().horizon() / 4
