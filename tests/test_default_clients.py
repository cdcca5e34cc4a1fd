"""The clients foxpoll builds when given none: both take their proxy from the environment
by the same rule, and the blocking one keeps its deadline and its pool limit through its
own transport. Over real sockets: foxpoll.testing.HostileServer is also the proxy (a
forward proxy reads the same request, with the whole URL as its target)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from foxpoll import APITimeoutError, AsyncFoxReload, FoxReload
from foxpoll._senders import BoundedTransport, default_async_client, default_client
from foxpoll.testing import HostileServer, Hostility

from .services import free_port
from .test_hostile import run

pytestmark = pytest.mark.slow

KEY = "sk-live-proxy-31d7"
UNREACHABLE = "http://foxreload.invalid"  # never resolves: only a proxy can answer for it


@pytest.fixture
def environ(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """The environment without any proxy setting of the machine running the tests."""
    for scheme in ("http", "https", "all", "no"):
        monkeypatch.delenv(f"{scheme}_proxy", raising=False)
        monkeypatch.delenv(f"{scheme.upper()}_PROXY", raising=False)
    monkeypatch.delenv("REQUEST_METHOD", raising=False)  # a CGI environment drops HTTP_PROXY
    return monkeypatch


@pytest.fixture
def proxy() -> Iterator[HostileServer]:
    with HostileServer(interval=0.03) as server:
        yield server


async def get_order(make: type[FoxReload] | type[AsyncFoxReload], base_url: str,
                    **options: Any) -> tuple[Any, float]:
    """``orders.get("o1")`` on a fresh default client: its result or exception, and the
    seconds taken."""
    def client(_: Any, **options: Any) -> Any:
        return make(KEY, base_url=base_url, max_retries=0, **options)

    return await run(client, None, lambda c: c.orders.get("o1"), **options)


CLIENTS = [FoxReload, AsyncFoxReload]


@pytest.mark.parametrize("make", CLIENTS)
@pytest.mark.parametrize("variable", ["HTTP_PROXY", "http_proxy", "ALL_PROXY"])
async def test_both_default_clients_send_through_the_proxy_the_environment_names(
        make: type[FoxReload], variable: str, environ: pytest.MonkeyPatch,
        proxy: HostileServer) -> None:
    environ.setenv(variable, proxy.url)
    order, _ = await get_order(make, UNREACHABLE)
    assert not isinstance(order, Exception), order
    assert order.status == "completed"
    assert [r.path for r in proxy.requests] == [f"{UNREACHABLE}/api/orders/o1"]


@pytest.mark.parametrize("make", CLIENTS)
@pytest.mark.parametrize("no_proxy", ["127.0.0.1", "localhost, 127.0.0.1", "*"])
async def test_both_default_clients_go_direct_to_hosts_in_no_proxy(
        make: type[FoxReload], no_proxy: str, environ: pytest.MonkeyPatch) -> None:
    with HostileServer() as direct:
        environ.setenv("HTTP_PROXY", f"http://127.0.0.2:{free_port()}")  # nothing there
        environ.setenv("NO_PROXY", no_proxy)
        order, _ = await get_order(make, direct.url)
        assert not isinstance(order, Exception), order
        assert [r.path for r in direct.requests] == ["/api/orders/o1"]


@pytest.mark.parametrize("make", CLIENTS)
async def test_a_request_through_the_proxy_keeps_its_deadline(
        make: type[FoxReload], environ: pytest.MonkeyPatch, proxy: HostileServer) -> None:
    # Each header byte comes well inside the read timeout; all of them would take ~3 s.
    proxy.hostility = Hostility.SLOW_HEADERS
    environ.setenv("HTTP_PROXY", proxy.url)
    outcome, took = await get_order(make, UNREACHABLE, timeout=0.3)
    assert isinstance(outcome, APITimeoutError)
    assert took < 1.5
    assert len(proxy.requests) == 1


def test_the_blocking_transport_keeps_its_pool_limit_and_raises_httpx_errors() -> None:
    limits = httpx.Limits(max_connections=1)
    with HostileServer(Hostility.FREEZE) as server, \
            httpx.Client(transport=BoundedTransport(limits)) as http:
        held: list[Exception] = []

        def hold_the_only_connection() -> None:
            try:
                http.get(server.url, timeout=1.0)
            except Exception as exc:  # what the transport raised is the point
                held.append(exc)

        holder = threading.Thread(target=hold_the_only_connection)
        holder.start()
        waited = time.monotonic() + 5
        while not server.requests and time.monotonic() < waited:
            time.sleep(0.01)  # until the frozen server holds the connection
        with pytest.raises(httpx.PoolTimeout):
            http.get(server.url, timeout=httpx.Timeout(5.0, pool=0.1))
        holder.join()
        assert len(server.requests) == 1  # the second request never had a connection
        assert [type(exc) for exc in held] == [httpx.ReadTimeout]
        with pytest.raises(httpx.ConnectError):  # nothing listens: provably never sent
            http.get(f"http://127.0.0.1:{free_port()}", timeout=1.0)



ENVIRONMENTS = [
    {"HTTP_PROXY": "{proxy}"},
    {"http_proxy": "{proxy_host}"},  # a bare host:port is an HTTP proxy
    {"ALL_PROXY": "{proxy}"},
    {"HTTPS_PROXY": "{proxy}"},  # not for http:// URLs
    {"HTTP_PROXY": "{proxy}", "NO_PROXY": "127.0.0.1"},
    {"HTTP_PROXY": "{proxy}", "NO_PROXY": "localhost"},
    {"HTTP_PROXY": "{proxy}", "no_proxy": "example.com, .0.0.1"},
    {"HTTP_PROXY": "{proxy}", "NO_PROXY": "http://127.0.0.1"},
    {"HTTP_PROXY": "{proxy}", "NO_PROXY": "*"},
]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
@pytest.mark.parametrize("environment", ENVIRONMENTS)
def test_the_proxy_rule_is_the_one_httpx_applies_to_its_own_clients(
        environment: dict[str, str], host: str, environ: pytest.MonkeyPatch,
        proxy: HostileServer) -> None:
    proxy_host = proxy.url.removeprefix("http://")
    for name, value in environment.items():
        environ.setenv(name, value.format(proxy=proxy.url, proxy_host=proxy_host))
    with HostileServer() as target:
        url = f"http://{host}:{target.url.rsplit(':', 1)[1]}/api/orders/o1"

        def route(http: httpx.Client | httpx.AsyncClient) -> list[str]:
            """Where a GET to ``url`` went: ``direct`` or ``proxied``."""
            target.requests.clear()
            proxy.requests.clear()
            if isinstance(http, httpx.AsyncClient):
                asyncio.run(get_async(http, url))
            else:
                with http:
                    http.get(url, timeout=5.0).raise_for_status()
            return ["direct" for _ in target.requests] + ["proxied" for _ in proxy.requests]

        expected = route(httpx.Client())  # httpx reads the environment itself
        assert len(expected) == 1
        limits = httpx.Limits()
        assert route(default_client(limits)) == expected
        assert route(default_async_client(limits)) == expected


async def get_async(http: httpx.AsyncClient, url: str) -> None:
    async with http:
        (await http.get(url, timeout=5.0)).raise_for_status()
