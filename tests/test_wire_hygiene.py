"""The key never travels in clear, a request refused on this machine is no network error,
and a base_url's password goes nowhere: issue 23's findings 5, 6 and 8, on real sockets
(HostileServer as the API, TunnelProxy as the proxy from the environment)."""

from __future__ import annotations

import logging
import traceback
from typing import Any

import httpx
import pytest

from foxpoll import (
    AmbiguousOrderError,
    APIConnectionError,
    APIStatusError,
    AsyncFoxReload,
    FoxReload,
)
from foxpoll._core import SIMULATOR_KEY
from foxpoll.testing import DEFAULT_API_KEY, FakeClock, HostileServer

from .test_default_clients import API_HOST, UNREACHABLE, TunnelProxy, environ, get_order
from .test_hostile import run

__all__ = ["environ"]  # the fixture, shared with test_default_clients

KEY = "sk-live-wire-5be0"
CLIENTS = [FoxReload, AsyncFoxReload]
ITEMS = [{"itemId": "product_steam_10", "quantity": 1}]


def construct(make: type[FoxReload] | type[AsyncFoxReload], **options: Any) -> None:
    """Build a client and close it (it is the construction that is tested)."""
    client = make(KEY, **options)
    if isinstance(client, FoxReload):
        client.close()


# Finding 5: the key never goes out in clear, and the proxy's own error is the proxy's.

@pytest.mark.parametrize("make", CLIENTS)
@pytest.mark.parametrize("base_url", ["http://public-api.foxreload.com", "http://10.0.0.7:8080",
                                      "http://[2001:db8::1]", "http://localhost.example.com"])
def test_an_http_base_url_off_this_machine_is_refused(
        make: type[FoxReload], base_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="in clear: use https://") as refused:
        construct(make, base_url=base_url)
    assert KEY not in str(refused.value)
    monkeypatch.setenv("FOXRELOAD_BASE_URL", base_url)
    with pytest.raises(ValueError, match="in clear"):
        construct(make)
    with FoxReload(KEY, base_url="https://public-api.foxreload.com") as client, \
            pytest.raises(ValueError, match="in clear"):
        client.with_options(base_url=base_url)


@pytest.mark.parametrize("base_url", ["http://127.0.0.1:8080", "http://127.3.2.1",
                                      "http://localhost:1", "http://LOCALHOST", "http://[::1]:80"])
def test_an_http_base_url_on_this_machine_is_allowed(base_url: str,
                                                     environ: pytest.MonkeyPatch) -> None:
    construct(FoxReload, base_url=base_url)
    construct(AsyncFoxReload, base_url=base_url)


def test_the_simulator_s_published_key_may_go_in_clear_and_no_other_key_after_it(
        environ: pytest.MonkeyPatch) -> None:
    assert SIMULATOR_KEY == DEFAULT_API_KEY
    with FoxReload(DEFAULT_API_KEY, base_url="http://simulator:8080") as client, \
            pytest.raises(ValueError, match="in clear"):
        client.with_options(api_key=KEY)


@pytest.mark.parametrize("make", CLIENTS)
def test_an_http_base_url_through_a_proxy_is_refused_before_any_byte(
        make: type[FoxReload], environ: pytest.MonkeyPatch) -> None:
    with HostileServer() as api, TunnelProxy() as proxy:
        environ.setenv("HTTP_PROXY", proxy.url)
        with pytest.raises(ValueError, match=r"goes through the proxy at 127\.0\.0\.1") as refused:
            construct(make, base_url=api.url)
        assert "NO_PROXY" in str(refused.value)
        with FoxReload(KEY, base_url="https://public-api.foxreload.com") as client, \
                pytest.raises(ValueError, match="goes through the proxy"):
            client.with_options(base_url=api.url)
        # A client of your own that ignores the environment routes as you set it up.
        with httpx.Client(trust_env=False) as own:
            FoxReload(KEY, base_url=api.url, http_client=own).orders.get("o1")
        environ.setenv("NO_PROXY", "127.0.0.1")
        construct(make, base_url=api.url)
        assert proxy.requests == []
        assert [r.path for r in api.requests] == ["/api/orders/o1"]


@pytest.mark.parametrize("make", CLIENTS)
async def test_your_own_client_that_trusts_the_environment_is_held_to_its_proxy_rule(
        make: type[FoxReload] | type[AsyncFoxReload], environ: pytest.MonkeyPatch) -> None:
    """httpx's clients read HTTP_PROXY by default (``trust_env``): a client of your own
    built so would hand the key to the proxy in clear, as the default client would."""
    own_client = httpx.Client if make is FoxReload else httpx.AsyncClient

    async def get(**options: Any) -> Any:
        own = own_client(**options)
        try:
            read, _ = await run(lambda _: make(KEY, base_url=api.url, http_client=own,
                                               max_retries=0),
                                None, lambda c: c.orders.get("o1"))
            return read
        except ValueError as exc:  # refused when the client is built
            return exc
        finally:
            await close(own)

    with HostileServer() as api, TunnelProxy() as proxy:
        environ.setenv("HTTP_PROXY", proxy.url)
        refused = await get()
        assert isinstance(refused, ValueError), refused
        assert "goes through the proxy at 127.0.0.1" in str(refused)
        assert "trust_env=False" in str(refused)
        assert KEY not in str(refused)
        own = own_client()
        simulated = make(DEFAULT_API_KEY, base_url=api.url, http_client=own)
        with pytest.raises(ValueError, match="goes through the proxy"):
            simulated.with_options(api_key=KEY)
        await close(own)
        assert (await get(trust_env=False)).id == "o1"
        environ.setenv("NO_PROXY", "127.0.0.1")
        assert (await get()).id == "o1"
        assert proxy.requests == []
        assert [r.path for r in api.requests] == ["/api/orders/o1"] * 2


async def close(http: httpx.Client | httpx.AsyncClient) -> None:
    if isinstance(http, httpx.Client):
        http.close()  # noqa: ASYNC212 - closing sockets does not wait on the network
    else:
        await http.aclose()


@pytest.mark.parametrize("make", CLIENTS)
async def test_the_proxy_s_refusal_is_a_connection_error_never_the_api_s_nor_ambiguous(
        make: type[FoxReload], environ: pytest.MonkeyPatch) -> None:
    with TunnelProxy(refuse=502) as proxy:
        environ.setenv("HTTPS_PROXY", proxy.url)
        read, _ = await get_order(make, UNREACHABLE)
        assert type(read) is APIConnectionError
        assert str(read).startswith("the proxy refused the connection (502 Bad Gateway) for "
                                    f"GET {UNREACHABLE}/api/orders/o1")
        proxy.requests.clear()

        def client(_: Any) -> Any:
            return make(KEY, base_url=UNREACHABLE, max_retries=1, clock=FakeClock())

        created, _ = await run(client, None, lambda c: c.orders.create(items=ITEMS))
        # The tunnel was refused, so the create was never sent: retried, and not ambiguous.
        assert type(created) is APIConnectionError, created
        assert not isinstance(created, (AmbiguousOrderError, APIStatusError))
        assert [(method, target) for method, target, _ in proxy.requests] == [
            ("CONNECT", f"{API_HOST}:443")] * 2
        assert not any(KEY in str(headers) for *_, headers in proxy.requests)


# Finding 6: a request refused on this machine is a ValueError at the call, never retried.

SECRET = "Bearer gw-7d1f0c"
BAD_HEADERS: list[dict[str, Any]] = [
    {"language": "en\r\nX-Injected: 1"},
    {"currency": "usd\x00"},
    {"language": "\u0440\u0443\u0441"},  # not ASCII
    {"currency": "usd "},
    {"default_headers": {"Authorization": f"{SECRET}\n"}},
    {"default_headers": {"X-Trace\r\n": "1"}},
    {"default_headers": {"X-Trace": "a\x7fb"}},
]


@pytest.mark.parametrize("make", CLIENTS)
@pytest.mark.parametrize("options", BAD_HEADERS)
def test_a_header_value_http_cannot_carry_is_refused_when_the_client_is_built(
        make: type[FoxReload], options: dict[str, Any]) -> None:
    with HostileServer() as api:
        with pytest.raises(ValueError, match=r"not a valid header name|the value of") as refused:
            construct(make, base_url=api.url, **options)
        assert SECRET not in str(refused.value)
        assert api.requests == []


def test_good_header_values_pass() -> None:
    with HostileServer() as api, FoxReload(
            KEY, base_url=api.url, language="en", currency="usd",
            default_headers={"Authorization": SECRET, "X-Empty": "", "X-Tab": "a\tb"}) as client:
        client.orders.get("o1")
        assert api.requests[0].headers["authorization"] == SECRET
        assert api.requests[0].headers["x-language"] == "en"


@pytest.mark.parametrize("make", CLIENTS)
@pytest.mark.parametrize("call", ["get", "create"])
async def test_a_request_the_http_stack_refuses_is_a_value_error_never_retried(
        make: type[FoxReload], call: str) -> None:
    # Past foxpoll's checks, an event hook of your own client sets a header h11 will not
    # write: the request fails on this machine, on every attempt alike.
    def spoil(request: httpx.Request) -> None:
        request.headers["X-Hook"] = f"{SECRET}\r\nX-Injected: 1"

    async def spoil_async(request: httpx.Request) -> None:
        spoil(request)

    def client(server: HostileServer) -> Any:
        if make is FoxReload:
            http: Any = httpx.Client(event_hooks={"request": [spoil]})
        else:
            http = httpx.AsyncClient(event_hooks={"request": [spoil_async]})
        return make(KEY, base_url=server.url, http_client=http, max_retries=3)

    with HostileServer() as api:
        outcome, took = await run(client, api, lambda c: (
            c.orders.get("o1") if call == "get" else c.orders.create(items=ITEMS)))
    assert type(outcome) is ValueError, outcome
    assert "refused before it was sent" in str(outcome)
    assert SECRET not in "".join(traceback.format_exception(outcome))  # h11's words quote it
    assert api.requests == []
    assert took < 0.5  # no backoff: not one retry


# Finding 8: a base_url's user info is refused, so its password reaches no log.

@pytest.mark.parametrize("base_url", ["https://gw-user:hunter2@api.example.com",
                                      "https://:hunter2@api.example.com/x",
                                      "http://gw-user:hunter2@127.0.0.1:8080",
                                      "https://hunter2@api.example.com"])
def test_a_base_url_with_user_info_is_refused_and_its_password_logged_nowhere(
        base_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    messages = []
    for make in CLIENTS:
        with pytest.raises(ValueError, match="user name or password") as refused:
            construct(make, base_url=base_url)
        messages.append(str(refused.value))
    with HostileServer() as api:
        with FoxReload(KEY, base_url=api.url) as client:
            with pytest.raises(ValueError, match="user name or password") as refused:
                client.with_options(base_url=base_url)
            messages.append(str(refused.value))
            client.orders.get("o1")
        monkeypatch.setenv("FOXRELOAD_BASE_URL", base_url)
        with pytest.raises(ValueError, match="user name or password") as refused:
            construct(FoxReload)
        messages.append(str(refused.value))
    assert "HTTP Request: GET" in caplog.text  # httpx's INFO line of each request is seen
    for text in [caplog.text, *messages]:
        assert "hunter2" not in text
        assert KEY not in text
