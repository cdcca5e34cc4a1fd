"""Every example runs to completion, as a user would run it (the nox `examples` session),
and the examples and the docs' snippets import only what users are told to."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from .services import MARIADB, require
from .test_public_api import PLACES

ROOT = Path(__file__).parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
NEEDS = {  # examples that talk to a real server
    "mysql_store.py": ("MariaDB", MARIADB["host"], MARIADB["port"]),
    "recovery_and_events.py": ("Redis", "127.0.0.1", 6379),
}


REAL_TIME = {"fleet_budget.py", "simulator_over_http.py", "survive_a_crash.py"}


@pytest.mark.parametrize("path", [
    pytest.param(path, marks=pytest.mark.slow) if path.name in REAL_TIME else path
    for path in EXAMPLES], ids=lambda p: p.name)
def test_example_runs(path: Path) -> None:
    if path.name in NEEDS:
        require(*NEEDS[path.name])
    result = subprocess.run(  # noqa: S603 - our own example files
        [sys.executable, str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def _sources() -> Iterator[tuple[str, str]]:
    """(where, code) for every example and every Python block of the README and docs."""
    for path in EXAMPLES:
        yield str(path.relative_to(ROOT)), path.read_text()
    for page in PAGES:
        text = page.read_text()
        for block in re.finditer(r"^```(?:python|py)\n(.*?)^```", text, re.S | re.M):
            line = text.count("\n", 0, block.start()) + 2
            yield f"{page.relative_to(ROOT)}:{line}", block.group(1)


def _unexported(module: str, names: list[str]) -> list[str]:
    """What of ``from module import names`` users are not told to import."""
    if module not in PLACES:
        return [f"{module}: not a documented place"]
    public = set(importlib.import_module(module).__all__)
    return [f"{module}.{name}" for name in names
            if name not in public and f"{module}.{name}" not in PLACES]


def _bad_imports(code: str, where: str) -> list[str]:
    tree = compile(code, where, "exec", ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    bad: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] == "foxpoll":
            bad += _unexported(node.module, [alias.name for alias in node.names])
        elif isinstance(node, ast.Import):
            bad += [alias.name for alias in node.names
                    if alias.name.split(".")[0] == "foxpoll" and alias.name not in PLACES]
        elif isinstance(node, ast.Attribute) and not isinstance(node.ctx, ast.Store):
            # foxpoll.recovery.RecoveryWorker, after `import foxpoll.recovery`
            dotted = ast.unparse(node)
            module, _, name = dotted.rpartition(".")
            if module in PLACES and not name.startswith("__") and not isinstance(
                    getattr(importlib.import_module(module), name, None), types.ModuleType):
                bad += _unexported(module, [name])
            elif module.startswith("foxpoll.") and module.count(".") == 1 \
                    and module not in PLACES:
                bad.append(module)
    return bad


@pytest.mark.parametrize(("where", "code"),
                         [pytest.param(where, code, id=where) for where, code in _sources()])
def test_users_import_from_documented_places_only(where: str, code: str) -> None:
    assert _bad_imports(code, where) == []


def test_an_import_from_a_private_or_undocumented_module_is_caught() -> None:
    code = """
import foxpoll.models
from foxpoll import FoxReload, dedup
from foxpoll.delivery import deliver_once
from foxpoll.dedup import SQLiteDedupStore, base
from foxpoll.recovery import _sql
from foxpoll._client import FoxReload as Client
x = foxpoll.recovery.RecoveryWorker, foxpoll.recovery.require_text, foxpoll.polling.Listener
"""
    assert _bad_imports(code, "sample") == [
        "foxpoll.models",
        "foxpoll.delivery: not a documented place",
        "foxpoll.dedup.base",
        "foxpoll.recovery._sql",
        "foxpoll._client: not a documented place",
        "foxpoll.recovery.require_text",
        "foxpoll.polling",
    ]
