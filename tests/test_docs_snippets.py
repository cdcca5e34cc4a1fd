"""The docs agree with the code: the README's and the quickstart's code runs as written,
against the simulator over HTTP, and the client page shows the constructor and the
exception tree the code has."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import re
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import foxpoll
import foxpoll.recovery
from foxpoll import AsyncFoxReload, FoxPollError, FoxReload, SystemClock
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


# -- docs/client.md ------------------------------------------------------------------------

CLIENT_PAGE = ROOT / "docs" / "client.md"


def _docstring_tree() -> str:
    """The tree of ``foxpoll.errors``'s docstring, the literal block after its ``::``."""
    doc = foxpoll.errors.__doc__ or ""
    block = re.search(r"::\n\n((?:    .*\n)+)", doc)
    assert block is not None
    return textwrap.dedent(block.group(1))


def _page_tree() -> str:
    block = re.search(r"## Errors\n\n```\n(.*?)```\n", CLIENT_PAGE.read_text(), re.S)
    assert block is not None
    return block.group(1)


def _parents(tree: str) -> dict[str, str | None]:
    """Each class a tree names, and the class it hangs under (None for the root)."""
    parents: dict[str, str | None] = {}
    path: list[str] = []
    for line in tree.splitlines():
        name = re.search(r"[A-Za-z][\w.]*", line)
        assert name is not None, line
        depth = name.start() // 4  # each level: "│   ", "├── " or "└── "
        del path[depth:]
        parents[name.group()] = path[-1] if path else None
        path.append(name.group())
    return parents


def test_the_client_page_shows_the_error_tree_of_foxpoll_errors() -> None:
    assert _page_tree() == _docstring_tree()


def _error_classes() -> dict[str, type]:
    """Every public subclass of FoxPollError that foxpoll defines, each of its modules
    imported, by the name the tree gives it (a subpackage's, as ``recovery.Name``)."""
    for module in pkgutil.walk_packages(foxpoll.__path__, "foxpoll."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
    found: dict[str, type] = {}
    todo = [FoxPollError]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__name__.startswith("_") or not cls.__module__.startswith("foxpoll"):
            continue
        place = cls.__module__.split(".")[1]
        found[cls.__name__ if place == "errors" else f"{place}.{cls.__name__}"] = cls
    return found


def test_the_error_tree_is_the_class_hierarchy() -> None:
    classes = _error_classes()
    parents = _parents(_docstring_tree())
    assert sorted(parents) == sorted(classes)
    for name, parent in parents.items():
        bases = classes[name].__bases__
        assert (classes[parent] in bases) if parent else bases == (Exception,), name


def test_the_client_page_shows_the_constructor() -> None:
    """Every argument of the clients, in order, with its default."""
    code = re.search(r"```python\n(.*?)```", CLIENT_PAGE.read_text(), re.S)
    assert code is not None
    [call] = [node for node in ast.walk(ast.parse(code.group(1)))
              if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "FoxReload"]
    shown = [(kw.arg, eval(compile(ast.Expression(kw.value), "client.md", "eval"), {}))  # noqa: S307
             for kw in call.keywords]
    for client in (FoxReload, AsyncFoxReload):
        parameters = list(inspect.signature(client).parameters.values())
        assert shown == [(p.name, p.default) for p in parameters]
        assert all(p.kind is p.KEYWORD_ONLY for p in parameters[1:])
