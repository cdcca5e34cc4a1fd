"""Chaos: a fleet of real processes on real PostgreSQL, SIGKILLed at random moments.

Four waiter processes share the orders (each order has two owners; one of them pays it),
two recovery workers run on the engine under test, and the processes are killed: at
random, and once on purpose in the middle of a delivery. Killed recovery workers are
restarted, as a supervisor would; killed waiters are not, so their orders have only their
watches (and the other owner) left. No pending-orders table, no sweep. Then, per run:

- every paid order that completed was delivered;
- none twice, except where a killed process had sent the codes before the dedup store
  recorded it (the window docs/delivery.md allows);
- nothing that did not complete was delivered;
- every paid order that did not complete is still queued, dead-lettered or done (failed
  and cancelled), never dropped.

Seeded: set ``FOXPOLL_CHAOS_SEED`` to replay a run; a failure prints its seed.
"""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from foxpoll import FoxReload, SystemClock
from foxpoll.testing import FakeFoxReload, OrderScript, SimulatorServer

from .test_procrastinate import database, sql  # noqa: F401 - the fixture

pytestmark = pytest.mark.service
WORKER = Path(__file__).with_name("chaos_worker.py")
ORDERS = 40
WAITERS = 4
RECOVERERS = 2
RANDOM_KILLS = 4
DEADLINE = 70.0


def scripts(rng: random.Random) -> list[OrderScript]:
    made = []
    for _ in range(ORDERS):
        roll = rng.random()
        if roll < 0.70:
            made.append(OrderScript.complete(after=rng.uniform(0.5, 5.0)))
        elif roll < 0.80:
            made.append(OrderScript.fail(after=rng.uniform(0.5, 3.0)))
        elif roll < 0.85:
            made.append(OrderScript.cancel(after=rng.uniform(0.5, 3.0)))
        else:
            made.append(OrderScript.stall())
    return made


class Fleet:
    def __init__(self, tmp: Path, base: dict[str, Any]) -> None:
        self.tmp, self.base = tmp, base
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.killed: set[int] = set()
        self.log = (tmp / "fleet.log").open("ab")

    def start(self, name: str, role: str, **config: Any) -> None:
        path = self.tmp / f"{name}.json"
        path.write_text(json.dumps({**self.base, **config}))
        self.processes[name] = subprocess.Popen(  # noqa: S603 - our own test worker
            [sys.executable, str(WORKER), role, str(path)], stdout=self.log, stderr=self.log,
            env={**os.environ, "PYTHONPATH": os.getcwd()})

    def kill(self, name: str) -> None:
        process = self.processes[name]
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=10)
            self.killed.add(process.pid)

    def alive(self, prefix: str = "") -> list[str]:
        return [name for name, p in self.processes.items()
                if name.startswith(prefix) and p.poll() is None]

    def jobs(self, ids: set[str]) -> list[Any]:
        """The recovery jobs of ``ids``, for a failure's message."""
        from foxpoll.recovery import PostgresRecoveryQueue, SQLiteRecoveryQueue

        queue: Any = (SQLiteRecoveryQueue(self.base["sqlite_path"])
                      if self.base["engine"] == "sqlite" else
                      PostgresRecoveryQueue(self.base["db"]))
        with queue:
            return [queue.get(order_id) for order_id in sorted(ids)]

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
        self.log.close()


def mid_delivery_pid(db: str) -> int | None:
    """A process that has sent an order's codes and not yet recorded it in the store."""
    rows = sql(db, "SELECT d.pid FROM chaos_deliveries d JOIN foxpoll_deliveries f "
                   "ON f.order_id = d.order_id WHERE f.state = 'claimed' LIMIT 1")
    return int(rows[0][0]) if rows else None


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["sqlite", "postgres"])
def test_a_fleet_under_sigkill_loses_no_order_and_delivers_none_twice(
    engine: str, database: str, tmp_path: Path  # noqa: F811 - the fixture
) -> None:
    seed = int(os.environ.get("FOXPOLL_CHAOS_SEED") or random.randrange(2**32))
    print(f"chaos seed {seed} ({engine})")
    try:
        run_chaos(engine, database, tmp_path, random.Random(seed))
    except AssertionError as failure:
        raise AssertionError(f"chaos seed {seed} ({engine}): {failure}") from failure


def run_chaos(engine: str, db: str, tmp: Path, rng: random.Random) -> None:
    from foxpoll.dedup import PostgresDedupStore

    PostgresDedupStore(db).create_schema()
    sql(db, "CREATE TABLE chaos_deliveries (order_id TEXT, pid INTEGER, kind TEXT, "
            "at TIMESTAMPTZ DEFAULT clock_timestamp())")
    if engine == "postgres":
        from foxpoll.recovery import ProcrastinateRecoveryQueue

        with ProcrastinateRecoveryQueue(db) as queue:
            queue.create_schema()
    sim = FakeFoxReload(clock=SystemClock(), record_requests=False)
    with SimulatorServer(sim) as server, FoxReload(sim.api_key, base_url=server.url) as plain:
        sim.script_next(*scripts(rng))
        ids = [plain.orders.create(items=[{"itemId": "product_steam_10"}]).id
               for _ in range(ORDERS)]
        owners = {order_id: rng.sample(range(WAITERS), 2) for order_id in ids}
        fleet = Fleet(tmp, {"engine": engine, "db": db, "sim_url": server.url,
                            "api_key": sim.api_key, "sqlite_path": str(tmp / "queue.db")})
        try:
            for n in range(RECOVERERS):
                fleet.start(f"recovery-{n}", "recovery")
            for n in range(WAITERS):
                fleet.start(f"waiter-{n}", "waiter", marker=str(tmp / f"waiter-{n}.waiting"),
                            pay=[i for i in ids if owners[i][0] == n],
                            wait=[i for i in ids if n in owners[i]])
            unleash(fleet, db, rng)
            settle(fleet, db, sim, ids)
        finally:
            fleet.stop()
        check(db, sim, ids, fleet.killed, engine, tmp)


def unleash(fleet: Fleet, db: str, rng: random.Random) -> None:
    """The kills: one early (perhaps mid-payment), the others at random moments once the
    waiters are waiting, and one mid-delivery; recovery workers come back."""
    later = sorted(rng.uniform(0.5, 8.0) for _ in range(RANDOM_KILLS - 1))
    kill_at = [rng.uniform(0.5, 3.0), *later]
    started = time.monotonic()
    waiting_since: float | None = None
    mid_delivery_done = False
    while kill_at or not mid_delivery_done:
        if waiting_since is None and (
                all((fleet.tmp / f"{name}.waiting").exists() or name not in fleet.alive()
                    for name in fleet.processes if name.startswith("waiter"))
                or time.monotonic() - started > 15):
            waiting_since = time.monotonic()
        elapsed = time.monotonic() - started
        if len(kill_at) < RANDOM_KILLS:  # after the early kill, the clock is the waits'
            elapsed = -1.0 if waiting_since is None else time.monotonic() - waiting_since
        if not mid_delivery_done and elapsed < 20:
            pid = mid_delivery_pid(db)
            victim = next((name for name, p in fleet.processes.items()
                           if p.pid == pid and p.poll() is None), None)
            if victim is not None:
                fleet.kill(victim)
                mid_delivery_done = True
        elif not mid_delivery_done:
            mid_delivery_done = True  # nothing was ever caught mid-delivery: rare, fine
        if kill_at and elapsed >= kill_at[0]:
            kill_at.pop(0)
            alive = fleet.alive()
            if alive:
                fleet.kill(rng.choice(alive))
        restart_recovery(fleet)
        time.sleep(0.05)


def restart_recovery(fleet: Fleet) -> None:
    for n in range(RECOVERERS):
        if fleet.processes[f"recovery-{n}"].poll() is not None:
            fleet.start(f"recovery-{n}", "recovery")


def settle(fleet: Fleet, db: str, sim: FakeFoxReload, ids: list[str]) -> None:
    """Let the fleet finish: every completed order delivered, no failed one still queued."""
    started = time.monotonic()
    completed = {i for i in ids if sim.status_of(i) == "completed"}
    while time.monotonic() - started < DEADLINE:
        restart_recovery(fleet)
        completed = {i for i in ids if sim.status_of(i) == "completed"}
        delivered = {row[0] for row in sql(db, "SELECT order_id FROM chaos_deliveries")}
        claimed = sql(db, "SELECT 1 FROM foxpoll_deliveries WHERE state = 'claimed'")
        if completed <= delivered and not claimed and not fleet.alive("waiter"):
            return
        time.sleep(0.3)
    missing = completed - {row[0] for row in sql(db, "SELECT order_id FROM chaos_deliveries")}
    claims = sql(db, "SELECT * FROM foxpoll_deliveries WHERE state <> 'delivered'")
    raise AssertionError(f"after {DEADLINE:.0f}s, {len(missing)} completed orders were "
                         f"still undelivered: {sorted(missing)[:5]}; "
                         f"jobs: {fleet.jobs(missing)}; claims: {claims}")


def jobs(engine: str, db: str, tmp: Path) -> dict[str, str]:
    if engine == "sqlite":
        import contextlib
        import sqlite3

        with contextlib.closing(sqlite3.connect(tmp / "queue.db")) as conn:
            rows = conn.execute("SELECT order_id, state FROM foxpoll_recovery").fetchall()
    else:
        rows = sql(db, "SELECT order_id, state FROM foxpoll_recovery")
    return dict(rows)


def check(db: str, sim: FakeFoxReload, ids: list[str], killed: set[int], engine: str,
          tmp: Path) -> None:
    status = {i: sim.status_of(i) for i in ids}
    sent: dict[str, list[int]] = collections.defaultdict(list)
    for order_id, pid in sql(db, "SELECT order_id, pid FROM chaos_deliveries ORDER BY at"):
        sent[order_id].append(pid)
    state = jobs(engine, db, tmp)
    assert killed, "no process was killed"
    for order_id in ids:
        pids = sent.get(order_id, [])
        if status[order_id] == "completed":
            assert pids, f"completed order {order_id} was never delivered"
            # Each extra delivery must follow one a killed process sent but never recorded.
            assert set(pids[:-1]) <= killed, (
                f"order {order_id} delivered {len(pids)} times by {pids}; killed: {killed}")
        else:
            assert not pids, f"order {order_id} is {status[order_id]} but was delivered"
        if status[order_id] in ("paid", "processing"):  # paid and never finished
            assert state.get(order_id) in ("queued", "dead"), (
                f"order {order_id} ({status[order_id]}) was dropped: job {state.get(order_id)}")
        elif status[order_id] in ("failed", "cancelled"):
            assert order_id in state, f"order {order_id} ({status[order_id]}) left no job"
    assert any(s == "completed" for s in status.values())
    twice = sum(len(pids) > 1 for pids in sent.values())
    print(f"{len(killed)} kills; {sum(s == 'completed' for s in status.values())} completed, "
          f"{twice} re-sent after a kill mid-delivery; jobs: "
          f"{sorted(collections.Counter(state.values()).items())}")
