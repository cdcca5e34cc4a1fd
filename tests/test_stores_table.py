"""docs/stores.md's table of constructors tells the truth about every store, queue, budget
and stream: their signatures, what they close, and that none is left out."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import pytest

import foxpoll.dedup
import foxpoll.events
import foxpoll.ratelimit
import foxpoll.recovery

ROOT = Path(__file__).parent.parent
PACKAGES = (foxpoll.dedup, foxpoll.recovery, foxpoll.ratelimit, foxpoll.events)
#: Every option that names a namespace or a bound: a class that lists none of them in the
#: table must take none of them.
NAMESPACES = {"table", "key_prefix", "key"}
TIMEOUTS = {"busy_timeout", "connect_timeout", "statement_timeout"}


def rows() -> dict[str, dict[str, str]]:
    text = (ROOT / "docs" / "stores.md").read_text()
    lines = [line for line in text.splitlines() if line.startswith("| `")]
    header = ["class", "where", "namespace", "timeouts", "clock", "closes"]
    found = {}
    for line in lines:
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True))
        found[cells["class"].strip("`")] = cells
    return found


def named(cell: str) -> set[str]:
    """The options a cell names (``table=``)."""
    return set(re.findall(r"`(\w+)=`", cell))


def cls(name: str) -> type:
    for package in PACKAGES:
        if name in package.__all__:
            found: type = getattr(package, name)
            return found
    raise AssertionError(f"{name} is not exported by foxpoll.dedup, .recovery, .ratelimit "
                         "or .events")


TABLE = rows()


def test_the_table_lists_every_store_queue_budget_and_stream() -> None:
    concrete = {
        name for package in PACKAGES for name in package.__all__
        if inspect.isclass(getattr(package, name))
        and any(hasattr(getattr(package, name), method) for method in ("close", "aclose"))
        and not inspect.isabstract(getattr(package, name))
        and getattr(package, name).__module__.split(".")[-1] != "base"
    }
    assert concrete <= set(TABLE), f"missing from docs/stores.md: {concrete - set(TABLE)}"


@pytest.mark.parametrize("name", sorted(TABLE))
def test_each_row_matches_the_signature(name: str) -> None:
    row = TABLE[name]
    parameters = inspect.signature(cls(name)).parameters
    positional = [p.name for p in parameters.values()
                  if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    if row["where"] == "—":
        assert "where" not in parameters
    else:
        assert positional[:1] == ["where"], "where the data lives comes first"
        assert ("client" in parameters) == ("`client=`" in row["where"])
    for column, vocabulary in (("namespace", NAMESPACES), ("timeouts", TIMEOUTS)):
        listed = named(row[column])
        assert listed == vocabulary & set(parameters), f"{name}: {column}"
    assert ("clock" in parameters) == (row["clock"] == "`clock=`")
    for keyword in named(row["namespace"]) | named(row["timeouts"]) | named(row["clock"]):
        assert parameters[keyword].kind is inspect.Parameter.KEYWORD_ONLY


@pytest.mark.parametrize("name", sorted(TABLE))
def test_each_row_says_how_it_closes(name: str) -> None:
    closes = TABLE[name]["closes"]
    kind = cls(name)
    for said, methods in (("`close()`", ("close",)), ("`aclose()`", ("aclose",)),
                          ("`with`", ("__enter__", "__exit__")),
                          ("`async with`", ("__aenter__", "__aexit__"))):
        said_here = re.search(re.escape(said) + r"(,|$)", closes) is not None
        assert all(hasattr(kind, m) for m in methods) == said_here, f"{name}: {said}"


#: Each class that has an asyncio twin, and the twin, by their exported names.
TWINS = sorted(
    (name[len("Async"):], name) for package in PACKAGES for name in package.__all__
    if name.startswith("Async") and name[len("Async"):] in package.__all__
    and inspect.isclass(getattr(package, name))
)


def test_the_twins_are_found() -> None:
    assert {sync for sync, _ in TWINS} >= {
        "MemoryDedupStore", "SQLiteDedupStore", "PostgresDedupStore", "RedisDedupStore",
        "DynamoDBDedupStore", "SQSPublisher", "RedisStreamPublisher", "RedisStreamConsumer"}


@pytest.mark.parametrize(("sync", "async_"), TWINS)
def test_a_class_and_its_async_twin_take_the_same_arguments(sync: str, async_: str) -> None:
    def arguments(name: str) -> list[tuple[str, Any, Any]]:
        parameters = inspect.signature(cls(name)).parameters.values()
        return [(p.name, p.kind, p.default) for p in parameters]

    assert arguments(sync) == arguments(async_)


@pytest.mark.parametrize("name", sorted(TABLE))
def test_every_timeout_defaults_as_the_page_says(name: str) -> None:
    defaults = {"connect_timeout": 5.0, "statement_timeout": 5.0, "busy_timeout": 30.0}
    parameters = inspect.signature(cls(name)).parameters
    for timeout, default in defaults.items():
        if timeout in parameters:
            assert parameters[timeout].default == default, f"{name}: {timeout}"
