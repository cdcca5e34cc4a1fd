"""Reaching the machine's real servers: fail under CI=true, skip on a developer's machine."""

from __future__ import annotations

import contextlib
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

POSTGRES_URL = os.environ.get("FOXPOLL_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("FOXPOLL_TEST_REDIS", "redis://127.0.0.1:6379/0")
MARIADB = {"host": "127.0.0.1", "port": 3306, "user": "root", "password": "", "database": "test"}


def require(name: str, host: str, port: int) -> None:
    """Fail (under CI) or skip (elsewhere) unless something accepts connections there."""
    try:
        with socket.create_connection((host, port), timeout=3):
            return
    except OSError as exc:
        message = f"{name} is not reachable on {host}:{port} ({exc})"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message + "; CI must run every service-backed test", pytrace=False)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def drop_table(table: str) -> None:
    """Drop a test's own PostgreSQL table, leaving the server as the test found it."""
    import psycopg

    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {table}")


def postgres_connections(application_name: str) -> int:
    """How many connections PostgreSQL has open under ``application_name``, as the server
    sees them."""
    import psycopg

    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity "
                           "WHERE application_name = %s", (application_name,)).fetchone()
    return int(row[0]) if row else 0


def delete_keys(prefix: str) -> None:
    """Delete a test's own Redis keys, all under ``prefix``."""
    import redis

    with redis.Redis.from_url(REDIS_URL) as client:
        for key in client.scan_iter(f"{prefix}*"):
            client.delete(key)


def eventually(condition: Callable[[], bool], within: float = 5.0) -> bool:
    """Whether ``condition()`` comes true within ``within`` seconds (asked every 10 ms):
    for what a background thread does, such as a store's flush of idle connections."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


@contextlib.contextmanager
def own_redis_server() -> Iterator[str]:
    """A Redis server of the test's own, on a free port, for what must not touch the
    shared one (``SCRIPT FLUSH``, a restart); its URL. Fails under CI, skips elsewhere,
    when ``redis-server`` is missing."""
    import shutil
    import subprocess

    binary = shutil.which("redis-server")
    if binary is None:
        message = "redis-server is not installed"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message + "; CI must run every service-backed test", pytrace=False)
        pytest.skip(message)
    port = free_port()
    server = subprocess.Popen(  # noqa: S603 - a fixed binary and options of our own
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the test's own redis-server did not start") from None
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.terminate()
        server.wait(10)


@contextlib.contextmanager
def closing_stores(build: Callable[..., Any]) -> Iterator[Callable[..., Any]]:
    """A factory of stores, ``build(**options)``, that closes every store it made on exit:
    for a fixture whose tests make stores with options of their own."""
    made: list[Any] = []

    def make(**options: Any) -> Any:
        made.append(build(**options))
        return made[-1]

    try:
        yield make
    finally:
        for store in made:
            store.close()


@contextlib.contextmanager
def own_database(prefix: str) -> Iterator[str]:
    """A PostgreSQL database of the test's own (procrastinate's tables want one), as a
    URL; dropped afterwards, connections and all."""
    require("PostgreSQL", "127.0.0.1", 5432)
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE {name} WITH (FORCE)")
