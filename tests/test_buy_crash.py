"""``buy()`` SIGKILLed at each stage: nothing paid, or paid, watched and delivered once.

One process per stage (``tests/buy_worker.py``) buys one order against a simulator
served over HTTP, sharing a budget (SQLite or Redis), a recovery queue and a dedup store
(SQLite or PostgreSQL) with the others, and is killed at its stage: before the create,
after it, inside ``pay`` before and after the payment is taken, during the wait, and
inside ``deliver``. One more runs to the end. Then a recovery worker on the same queue,
store and ``deliver`` runs until it has nothing left to do. The simulator saw every
payment, so:

- no order was paid twice, and no process paid more than one order;
- every paid order was delivered exactly once, and nothing unpaid was delivered;
- every order left unpaid is one whose create was answered before the kill, or whose
  payment was never sent: it stays ``active`` and expires.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from foxpoll import FoxReload, SystemClock
from foxpoll.recovery import RecoveryWorker
from foxpoll.testing import FakeFoxReload, OrderScript, SimulatorServer

from .buy_worker import parts, recorder
from .services import POSTGRES_URL, REDIS_URL, delete_keys, drop_table, require

WORKER = Path(__file__).with_name("buy_worker.py")
KILLED = ("before_create", "after_create", "pay_sending", "pay_answered", "waiting",
          "delivering")
STAGES = (*KILLED, "none")
PAID = {"pay_answered", "waiting", "delivering", "none"}
SETTLE_WITHIN = 30.0  # seconds for the recovery worker to deliver what was left


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.service)])
def config(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, Any]]:
    inbox = tmp_path / "inbox.txt"
    inbox.touch()
    if request.param == "sqlite":
        yield {"engine": "sqlite", "queue": str(tmp_path / "queue.db"),
               "store": str(tmp_path / "store.db"), "budget": str(tmp_path / "budget.db"),
               "inbox": str(inbox)}
        return
    require("PostgreSQL", "127.0.0.1", 5432)
    require("Redis", "127.0.0.1", 6379)
    tag = uuid.uuid4().hex[:8]
    made = {"engine": "postgres", "db": POSTGRES_URL, "redis": REDIS_URL,
            "queue": f"foxpoll_buy_queue_{tag}", "store": f"foxpoll_buy_store_{tag}",
            "budget": f"foxpoll-buy-{tag}:", "inbox": str(inbox)}
    queue, store, budget = parts(made)
    try:
        queue.create_schema()
        store.create_schema()
        yield made
    finally:
        for opened in (queue, store, budget):
            opened.close()
        drop_table(made["queue"])
        drop_table(made["store"])
        delete_keys(made["budget"])


@pytest.mark.slow
def test_a_buy_killed_at_any_stage_pays_nothing_twice_and_loses_nothing(
    config: dict[str, Any], tmp_path: Path
) -> None:
    sim = FakeFoxReload(clock=SystemClock(), default_script=OrderScript.complete(after=0.5))
    with SimulatorServer(sim) as server:
        said = run_buyers(sim, server, config, tmp_path)
        assert said["none"] == "done delivered"
        recover(sim, server, config)
        check(sim, server, config)


def run_buyers(sim: FakeFoxReload, server: SimulatorServer, config: dict[str, Any],
               tmp: Path) -> dict[str, str]:
    """Start a buyer per stage at once, and SIGKILL each as it reaches its stage; what
    each printed."""
    buyers: dict[str, subprocess.Popen[str]] = {}
    said: dict[str, str] = {}
    try:
        for stage in STAGES:
            path = tmp / f"{stage}.json"
            path.write_text(json.dumps({**config, "stage": stage, "sim_url": server.url,
                                        "api_key": sim.api_key}))
            buyers[stage] = subprocess.Popen(  # noqa: S603 - our own test worker
                [sys.executable, str(WORKER), str(path)], stdout=subprocess.PIPE, text=True,
                env={**os.environ, "PYTHONPATH": os.getcwd()})
        for stage, buyer in buyers.items():
            assert buyer.stdout is not None
            said[stage] = buyer.stdout.readline().strip()
            if stage == "none":
                assert buyer.wait(timeout=30) == 0
                continue
            assert said[stage] == stage, f"{stage}: the buyer said {said[stage]!r}"
            os.kill(buyer.pid, signal.SIGKILL)
            assert buyer.wait(timeout=10) == -signal.SIGKILL
    finally:
        for buyer in buyers.values():
            if buyer.poll() is None:
                buyer.kill()
                buyer.wait(timeout=10)
            if buyer.stdout is not None:
                buyer.stdout.close()
    return said


def orders_by_stage(sim: FakeFoxReload, server: SimulatorServer) -> dict[str, list[str]]:
    """The ids of the orders each stage's buyer created (its note names it)."""
    with FoxReload(sim.api_key, base_url=server.url) as reader:
        page = reader.orders.list(limit=100)
    made: dict[str, list[str]] = collections.defaultdict(list)
    for order in page.items:
        note = order.items[0].note or {}
        made[str(note["buyer"])].append(order.id)
    return made


def inbox(config: dict[str, Any]) -> list[tuple[str, str]]:
    """Every delivery so far: ``(order_id, who)``, in order."""
    lines = Path(config["inbox"]).read_text().splitlines()
    return [(order_id, who) for order_id, who in (line.split() for line in lines)]


def payments(sim: FakeFoxReload) -> collections.Counter[str]:
    """How many payments the simulator received for each order."""
    return collections.Counter(r.path.split("/")[3] for r in sim.requests
                               if r.method == "POST" and r.path.endswith("/pay"))


def recover(sim: FakeFoxReload, server: SimulatorServer, config: dict[str, Any]) -> None:
    """Run a recovery worker on the buyers' queue, store, budget and ``deliver`` until
    every paid order is delivered and no job is due soon; then stop it."""
    queue, store, budget = parts(config)
    stop = threading.Event()
    with FoxReload(sim.api_key, base_url=server.url, rate_limit=budget) as client:
        worker = RecoveryWorker(client, queue, store,
                                on_completed=recorder(config["inbox"], "worker"))
        running = threading.Thread(target=worker.run, kwargs={"stop": stop, "idle": 0.1})
        running.start()
        try:
            deadline = time.monotonic() + SETTLE_WITHIN
            while time.monotonic() < deadline:
                paid = {order_id for order_id in payments(sim)
                        if sim.status_of(order_id) == "completed"}
                delivered = {order_id for order_id, _ in inbox(config)}
                confirmed = all(job is None or job.state.value == "done"
                                for job in (queue.get(order_id) for order_id in paid))
                if len(paid) == len(PAID) and paid <= delivered and confirmed:
                    break
                time.sleep(0.1)
            time.sleep(1.0)  # a second delivery, if one were coming, has had its chance
        finally:
            stop.set()
            running.join(timeout=10)
            for opened in (queue, store, budget):
                opened.close()
    assert not running.is_alive()


def check(sim: FakeFoxReload, server: SimulatorServer, config: dict[str, Any]) -> None:
    made = orders_by_stage(sim, server)
    paid = payments(sim)
    sent = collections.Counter(order_id for order_id, _ in inbox(config))
    who = dict(inbox(config))
    assert max(paid.values()) == 1, f"an order was paid twice: {paid}"
    assert "before_create" not in made  # killed before its create left
    for stage in STAGES[1:]:
        assert len(made[stage]) == 1, f"{stage} created {made[stage]}"
    for stage, [order_id] in ((s, made[s]) for s in STAGES[1:]):
        status = sim.status_of(order_id)
        if stage in PAID:
            assert paid[order_id] == 1, stage
            assert status == "completed", (stage, status)
            assert sent[order_id] == 1, f"{stage}: order {order_id} delivered {sent[order_id]}x"
            assert who[order_id] == ("buyer" if stage == "none" else "worker"), stage
        else:  # never paid: it stays active, then expires
            assert paid[order_id] == 0, stage
            assert status == "active", (stage, status)
            assert sent[order_id] == 0, stage
    assert set(sent) == {made[s][0] for s in PAID}, "something unpaid was delivered"
    queue, store, budget = parts(config)
    try:
        # The watch is written before the payment is sent; an unpaid create has none.
        assert queue.get(made["pay_sending"][0]) is not None
        assert queue.get(made["after_create"][0]) is None
    finally:
        for opened in (queue, store, budget):
            opened.close()
