"""The README's and the quickstart's code runs as written, against the simulator over HTTP."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import foxpoll.recovery
from foxpoll import SystemClock
from foxpoll.recovery import JobState, SQLiteRecoveryQueue
from foxpoll.testing import FakeFoxReload, OrderScript, SimulatorServer

ROOT = Path(__file__).parent.parent


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeFoxReload]:
    # Both sides on the same clock, whose sleeps only move it: no real backoff waits.
    slept = [0.0]
    monkeypatch.setattr(SystemClock, "sleep", lambda _, s: slept.__setitem__(0, slept[0] + s))
    monkeypatch.setattr(SystemClock, "monotonic", lambda _: time.monotonic() + slept[0])
    monkeypatch.setattr(SystemClock, "time", lambda _: time.time() + slept[0])
    sim = FakeFoxReload(clock=SystemClock(), default_script=OrderScript.complete(after=20))
    with SimulatorServer(sim) as server:
        monkeypatch.setenv("FOXRELOAD_API_KEY", sim.api_key)
        monkeypatch.setenv("FOXRELOAD_BASE_URL", server.url)
        monkeypatch.chdir(tmp_path)
        yield sim


@pytest.mark.parametrize("page", ["README.md", "docs/quickstart.md"])
def test_the_quickstart_runs_as_written(page: str, api: FakeFoxReload,
                                        capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    text = (ROOT / page).read_text()
    block = re.search(r"real API\n\n```python\n(.*?)```", text, re.S)
    assert block is not None
    code = block.group(1).replace("product_...", "product_steam_10")  # the only blank
    names: dict[str, Any] = {"__name__": "quickstart"}
    opened: list[SQLiteRecoveryQueue] = []

    class Recorded(SQLiteRecoveryQueue):
        """The queue the snippet makes, recorded so that the test can close it."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            opened.append(self)

    monkeypatch.setattr(foxpoll.recovery, "SQLiteRecoveryQueue", Recorded)
    try:
        exec(compile(code, page, "exec"), names)  # noqa: S102 - our own docs
    finally:  # what a script would leave to its exit
        names["client"].close()
        names["store"].close()
        for queue in opened:
            queue.close()
    assert len(opened) == 1
    shown = capsys.readouterr().out
    assert "1 code(s)" in shown
    assert "delivered" in shown
    assert len(api.order_ids()) == 1
    # The snippet's queue holds the paid order's watch, settled by its wait: the order
    # is in the queue's file, for a RecoveryWorker to confirm its delivery.
    [order_id] = api.order_ids()
    with SQLiteRecoveryQueue("foxpoll.db") as queue:
        job = queue.get(order_id)
    assert job is not None
    assert (job.state, job.reason, job.last_status) == (JobState.QUEUED, "delivery",
                                                        "completed")
