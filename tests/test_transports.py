"""foxpoll.transports.AiohttpTransport and the transport= option, over real HTTP."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from foxpoll import (
    AmbiguousOrderError,
    APIConnectionError,
    APITimeoutError,
    AsyncFoxReload,
    FoxReload,
    OrderStatus,
    SystemClock,
)
from foxpoll.backoff import Fixed
from foxpoll.polling import WaitPolicy
from foxpoll.testing import FakeFoxReload, Fault, FaultKind, OrderScript, SimulatorServer
from foxpoll.transports import AiohttpTransport, fast_http_client

from .services import free_port

STEAM = [{"itemId": "product_steam_10"}]


@pytest.fixture
def served() -> Iterator[tuple[FakeFoxReload, str]]:
    sim = FakeFoxReload(clock=SystemClock(), default_script=OrderScript.complete(after=0.3))
    with SimulatorServer(sim) as server:
        yield sim, server.url


@pytest.mark.slow
async def test_full_flow_through_the_aiohttp_transport(served: tuple[FakeFoxReload, str]) -> None:
    sim, url = served
    async with AsyncFoxReload(sim.api_key, base_url=url, transport=AiohttpTransport()) as client:
        order = await client.orders.create(items=STEAM, is_mock=True)
        await client.orders.pay(order.id)
        done = await client.wait_for_completion(order.id, policy=WaitPolicy(backoff=Fixed(0.1)))
        products = await client.products.list(category="steam")
    assert done.status is OrderStatus.COMPLETED
    assert len(done.codes) == 1
    assert products.total == 2
    sent = sim.requests[0]
    assert sent.headers["x-api-key"] == sim.api_key
    assert sent.headers["user-agent"].startswith("foxpoll/")
    assert sent.json == {"items": [{"itemId": "product_steam_10", "quantity": 1}], "isMock": True}


@pytest.mark.slow
async def test_fast_http_client_is_an_httpx_client(served: tuple[FakeFoxReload, str]) -> None:
    sim, url = served
    http = fast_http_client()
    async with AsyncFoxReload(sim.api_key, base_url=url, http_client=http) as client:
        assert (await client.products.get("product_steam_10")).id == "product_steam_10"
    await http.aclose()


class CountingTransport(AiohttpTransport):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        return await super().handle_async_request(request)


async def test_refused_connection_is_a_connect_error_and_create_is_retried() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    transport = CountingTransport()
    async with AsyncFoxReload("k", base_url=url, transport=transport,
                              max_retries=2, clock=_NoSleep()) as client:
        with pytest.raises(APIConnectionError) as info:
            await client.orders.create(items=STEAM)
    assert not isinstance(info.value, AmbiguousOrderError)
    assert isinstance(info.value.__cause__, httpx.ConnectError)
    assert transport.calls == 3  # provably never sent, so safe to send again


@pytest.mark.slow
async def test_disconnect_after_create_is_ambiguous(served: tuple[FakeFoxReload, str]) -> None:
    sim, url = served
    sim.inject(Fault(FaultKind.DISCONNECT, method="POST", after_handling=True))
    async with AsyncFoxReload(sim.api_key, base_url=url, transport=AiohttpTransport()) as client:
        with pytest.raises(AmbiguousOrderError):
            await client.orders.create(items=STEAM)
    assert sim.count("POST") == 1
    assert len(sim.order_ids()) == 1


@pytest.mark.slow
async def test_read_timeout_is_a_timeout_and_create_is_ambiguous(
    served: tuple[FakeFoxReload, str]
) -> None:
    sim, url = served
    sim.inject(Fault(FaultKind.TIMEOUT, method="POST", delay=1.5),
               Fault(FaultKind.TIMEOUT, method="GET", delay=1.5, times=10))
    async with AsyncFoxReload(sim.api_key, base_url=url, transport=AiohttpTransport(),
                              timeout=0.3, max_retries=0) as client:
        with pytest.raises(AmbiguousOrderError) as info:
            await client.orders.create(items=STEAM)
        assert isinstance(info.value.cause, APITimeoutError)
        with pytest.raises(APITimeoutError):
            await client.products.get("product_steam_10")


def test_sync_client_sends_straight_to_a_transport(sim: FakeFoxReload) -> None:
    with FoxReload(sim.api_key, base_url=sim.base_url, transport=sim.transport(),
                   clock=sim.clock) as client:
        order = client.orders.create(items=STEAM)
        assert client.orders.get(order.id).id == order.id
    assert sim.count() == 2


def test_http_client_and_transport_are_exclusive(sim: FakeFoxReload) -> None:
    with pytest.raises(ValueError, match="not both"):
        FoxReload("k", http_client=httpx.Client(), transport=sim.transport())


class _NoSleep(SystemClock):
    """Real time, but retry backoff is skipped: the test is about which errors retry."""

    def sleep(self, seconds: float) -> None:
        pass

    async def asleep(self, seconds: float) -> None:
        pass
