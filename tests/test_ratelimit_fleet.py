"""Several real processes on one budget, in SQLite and in Redis: the requests a local server
receives stay within the limit, and a 429 seen by one process pauses them all."""

from __future__ import annotations

import json
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

from foxpoll import FoxReload, SystemClock
from foxpoll.testing import FakeFoxReload, Fault, FaultKind, SimulatorServer

from .services import REDIS_URL, require

WORKER = Path(__file__).with_name("ratelimit_worker.py")
PROCESSES = 3
PER_MINUTE = 600  # 10 a second, for all of them together
BURST = 5


@pytest.fixture
def served() -> Iterator[tuple[FakeFoxReload, str, str]]:
    sim = FakeFoxReload(clock=SystemClock())
    with SimulatorServer(sim) as server, FoxReload(sim.api_key, base_url=server.url) as client:
        order = client.orders.create(items=[{"itemId": "product_steam_10"}])
        yield sim, server.url, order.id


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.service)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    if request.param == "redis":
        require("Redis", "127.0.0.1", 6379)
        return "redis", REDIS_URL
    return "sqlite", str(tmp_path / "budget.db")


def run_fleet(tmp: Path, backend: tuple[str, str], sim: FakeFoxReload, url: str,
              order_id: str, duration: float, kill_after: float | None = None) -> list[float]:
    """Start the processes together (SIGKILL one after ``kill_after`` seconds); return when
    the server received each GET."""
    config = {"backend": backend[0], "target": backend[1], "per_minute": PER_MINUTE,
              "burst": BURST, "key": f"foxpoll-test:{uuid.uuid4().hex[:8]}",
              "sim_url": url, "api_key": sim.api_key, "order_id": order_id,
              "duration": duration}
    path = tmp / "fleet.json"
    path.write_text(json.dumps(config))
    processes: list[Any] = [
        subprocess.Popen([sys.executable, str(WORKER), str(path)],  # noqa: S603 - ours
                         stdout=subprocess.DEVNULL,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
        for _ in range(PROCESSES)]
    if kill_after is not None:
        time.sleep(kill_after)  # the fleet runs meanwhile: this is the moment of the kill
        processes[0].send_signal(signal.SIGKILL)
        assert processes[0].wait(timeout=10) == -signal.SIGKILL
    for process in processes[1 if kill_after is not None else 0:]:
        assert process.wait(timeout=60) == 0
    return [r.at for r in sim.requests if r.method == "GET"]


@pytest.mark.slow
def test_the_fleet_stays_within_the_budget(
    backend: tuple[str, str], served: tuple[FakeFoxReload, str, str], tmp_path: Path
) -> None:
    sim, url, order_id = served
    gets = run_fleet(tmp_path, backend, sim, url, order_id, duration=4.0)
    rate = PER_MINUTE / 60
    transit = 0.2  # seconds: a permit taken earlier may arrive with one taken later
    for start in gets:  # every window of two seconds, starting at each request
        in_window = sum(1 for t in gets if start <= t < start + 2.0)
        assert in_window <= rate * (2.0 + transit) + BURST  # three blind processes: ~60
    span = gets[-1] - gets[0]
    assert len(gets) <= rate * (span + transit) + BURST
    assert len(gets) >= 0.8 * rate * span  # and the budget is spent, not wasted


@pytest.mark.slow
def test_a_429_seen_by_one_process_pauses_them_all(
    backend: tuple[str, str], served: tuple[FakeFoxReload, str, str], tmp_path: Path
) -> None:
    sim, url, order_id = served
    sim.inject(Fault(FaultKind.RATE_LIMIT, method="GET", retry_after=2, times=1))
    gets = run_fleet(tmp_path, backend, sim, url, order_id, duration=4.0)
    throttled = gets[0]  # the fault answers the first GET
    paused = [t for t in gets if throttled + 0.5 < t < throttled + 1.9]
    assert paused == []  # requests already in flight may land just after; then none
    assert any(t >= throttled + 2.0 for t in gets)


@pytest.mark.slow
def test_a_process_killed_while_it_spends_the_budget_stalls_no_one(
    backend: tuple[str, str], served: tuple[FakeFoxReload, str, str], tmp_path: Path
) -> None:
    sim, url, order_id = served
    started = time.monotonic()
    gets = run_fleet(tmp_path, backend, sim, url, order_id, duration=5.0, kill_after=2.5)
    killed_at = started + 2.5
    after = [t for t in gets if t > killed_at + 0.5]
    # The survivors go on spending the whole budget (a SIGKILL inside a SQLite write
    # transaction releases its lock; a Redis script runs whole or not at all)...
    assert len(after) >= 0.8 * (PER_MINUTE / 60) * (gets[-1] - killed_at - 0.5)
    for start in gets:  # ...and still within it
        assert sum(1 for t in gets if start <= t < start + 2.0) <= (PER_MINUTE / 60) * 2.2 + BURST
