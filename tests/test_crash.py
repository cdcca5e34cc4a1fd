"""A worker SIGKILLed inside deliver(): after its lease, another worker delivers, once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from foxpoll import DeliveryInProgress, deliver_once
from foxpoll.dedup import DeliveryState

from .crash_worker import make_store, order
from .services import POSTGRES_URL, REDIS_URL, delete_keys, drop_table, require

LEASE = 1.0  # seconds: the killed worker's claim outlives it by this much


@pytest.fixture(params=["sqlite", "postgres", "redis", "dynamodb"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    backend = request.param
    if backend == "sqlite":
        yield backend, str(tmp_path / "deliveries.db")
    elif backend == "postgres":
        require("PostgreSQL", "127.0.0.1", 5432)
        table = f"foxpoll_crash_{uuid.uuid4().hex[:8]}"
        make_store(backend, f"{POSTGRES_URL}#{table}").create_schema()
        yield backend, f"{POSTGRES_URL}#{table}"
        drop_table(table)
    elif backend == "redis":
        require("Redis", "127.0.0.1", 6379)
        prefix = f"foxpoll-crash-{uuid.uuid4().hex[:8]}:"
        yield backend, f"{REDIS_URL}#{prefix}"
        delete_keys(prefix)
    else:
        moto_url = request.getfixturevalue("moto_url")
        table = f"foxpoll-crash-{uuid.uuid4().hex[:8]}"
        make_store(backend, f"{moto_url}#{table}").create_schema()
        yield backend, f"{moto_url}#{table}"


@pytest.mark.slow
def test_a_killed_worker_is_followed_by_exactly_one_delivery(target: tuple[str, str]) -> None:
    backend, where = target
    order_id = str(uuid.uuid4())
    with subprocess.Popen(  # noqa: S603 - our own test worker
        [sys.executable, str(Path(__file__).with_name("crash_worker.py")),
         backend, where, order_id, str(LEASE)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()},
    ) as worker:
        try:
            assert worker.stdout is not None
            assert worker.stdout.readline().strip() == "delivering"
            os.kill(worker.pid, signal.SIGKILL)
            assert worker.wait(timeout=10) == -signal.SIGKILL
        finally:
            if worker.poll() is None:
                worker.kill()

    store: Any = make_store(backend, where)
    stuck = store.get(order_id)
    assert stuck.state is DeliveryState.CLAIMED  # the dead worker's claim is visible...
    assert stuck.attempts == 1
    assert [r.order_id for r in store.list(DeliveryState.CLAIMED, limit=10_000)].count(
        order_id
    ) == 1  # ...to operations, too

    delivered: list[str] = []
    with pytest.raises(DeliveryInProgress):  # no blind takeover of a live lease
        deliver_once(order(order_id), lambda o: delivered.append(o.id), store)

    deadline = time.monotonic() + 10 * LEASE
    while True:  # the lease runs out on the store's clock
        try:
            result = deliver_once(order(order_id), lambda o: delivered.append(o.id), store)
            break
        except DeliveryInProgress as busy:
            assert time.monotonic() < deadline
            time.sleep(min(0.2, max(0.01, busy.lease_until - time.time())))
    assert result.delivered
    assert result.record.attempts == 2
    assert not deliver_once(order(order_id), lambda o: delivered.append(o.id), store).delivered
    assert delivered == [order_id]
    if hasattr(store, "close"):
        store.close()
