"""Every example runs to completion, as a user would run it (the nox `examples` session)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .services import MARIADB, require

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.py"))
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
