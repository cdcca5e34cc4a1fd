"""Sessions: ``nox`` runs tests, lint and typecheck; ``nox -s bench`` runs the benchmarks."""

from __future__ import annotations

import os

import nox

nox.options.default_venv_backend = "uv|virtualenv"
nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True

PYPROJECT = nox.project.load_toml("pyproject.toml")


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite, against the machine's PostgreSQL and Redis where tests need them."""
    session.install("-e", ".[all]", *nox.project.dependency_groups(PYPROJECT, "test"))
    session.run("pytest", *session.posargs, env={"CI": os.environ.get("CI", "")})


@nox.session
def lint(session: nox.Session) -> None:
    """ruff."""
    session.install(*nox.project.dependency_groups(PYPROJECT, "lint"))
    session.run("ruff", "check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the package."""
    session.install("-e", ".[all]", *nox.project.dependency_groups(PYPROJECT, "typecheck"))
    session.run("mypy", "--strict", "foxpoll")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks: poll schedules, polling throughput, dedup-store overhead (not in default)."""
    session.install("-e", ".[all]", "httpx-aiohttp>=0.1.8", "aiohttp>=3.9")
    session.run("python", "benchmarks/schedules.py", *session.posargs)
    session.run("python", "benchmarks/throughput.py")
    session.run("python", "benchmarks/dedup.py")
