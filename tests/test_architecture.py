"""docs/architecture.md stays true: its traces name functions that exist, and its layer
table names the modules that .importlinter's layers contract holds in the same order."""

from __future__ import annotations

import configparser
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGE = (ROOT / "docs" / "architecture.md").read_text()


def traced_names() -> list[str]:
    traces = PAGE.split("## Three traces", 1)[1].split("## Bounds", 1)[0]
    return sorted(set(re.findall(r"`(foxpoll\.[\w.]+)`", traces)))


def resolve(dotted: str) -> object:
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            found: object = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[split:]:
            found = getattr(found, attribute)
        return found
    raise ModuleNotFoundError(dotted)


def test_the_traces_name_enough_functions() -> None:
    assert len(traced_names()) >= 25


@pytest.mark.parametrize("name", traced_names())
def test_every_traced_name_exists(name: str) -> None:
    assert callable(resolve(name)), name


def contract_layers() -> list[set[str]]:
    config = configparser.ConfigParser()
    config.read(ROOT / ".importlinter")
    layers = config["importlinter:contract:layers"]["layers"].strip().splitlines()
    return [set(re.findall(r"\w+", line)) for line in reversed(layers)]  # bottom first


def page_layers() -> list[set[str]]:
    table = PAGE.split("## Layers", 1)[1].split("## Sync and async", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]
    return [set(re.findall(r"`(\w+)`", row.split("|")[2])) for row in rows]


def test_the_layer_table_matches_the_import_contract() -> None:
    assert page_layers() == contract_layers()
