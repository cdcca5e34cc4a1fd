"""Every call ends within its stated bound, in time and in memory, whatever a server
does: tested against foxpoll.testing.HostileServer over real sockets, with the blocking
client, the async client and the aiohttp transport."""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest

from foxpoll import (
    AmbiguousOrderError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    AsyncFoxReload,
    FoxReload,
    OrderStalled,
    RateLimitError,
    ResponseTooLarge,
)
from foxpoll.testing import HostileServer, Hostility
from foxpoll.transports import AiohttpTransport

pytestmark = pytest.mark.slow

KEY = "sk-live-hostile-5c2e"
MiB = 1024 * 1024


@pytest.fixture
def server() -> Iterator[HostileServer]:
    with HostileServer(interval=0.2) as hostile:
        yield hostile


Call = Callable[[Any], Any]


def sync_client(server: HostileServer, **options: Any) -> FoxReload:
    return FoxReload(KEY, base_url=server.url, **options)


def async_client(server: HostileServer, **options: Any) -> AsyncFoxReload:
    return AsyncFoxReload(KEY, base_url=server.url, **options)


def aiohttp_client(server: HostileServer, **options: Any) -> AsyncFoxReload:
    return AsyncFoxReload(KEY, base_url=server.url, transport=AiohttpTransport(), **options)


CLIENTS = [sync_client, async_client, aiohttp_client]


async def run(make: Callable[..., Any], server: HostileServer | None,
              call: Callable[[Any], Any], **options: Any) -> tuple[Any, float]:
    """``call(client)`` on a fresh client; its result or exception, and the seconds taken."""
    client = make(server, **options)
    started = time.monotonic()
    try:
        result = call(client)
        if isinstance(result, Awaitable):
            result = await result
    except Exception as exc:  # the outcome is what the test inspects
        result = exc
    finally:
        if isinstance(client, AsyncFoxReload):
            await client.aclose()
        else:
            client.close()
    return result, time.monotonic() - started


@pytest.mark.parametrize("make", CLIENTS)
@pytest.mark.parametrize("hostility", [Hostility.SLOW_HEADERS, Hostility.SLOW_BODY])
async def test_a_trickling_server_is_cut_off_at_the_request_deadline(
        make: Callable[..., Any], hostility: Hostility, server: HostileServer) -> None:
    # Each byte comes well inside the read timeout; the whole answer would take ~40 s.
    server.hostility = hostility
    outcome, took = await run(make, server, lambda c: c.orders.get("o1"),
                              timeout=1.0, max_retries=0)
    assert isinstance(outcome, APITimeoutError)
    assert took < 4.0
    assert len(server.requests) == 1


async def test_trickling_headers_are_cut_at_the_deadline_not_per_read() -> None:
    # The blocking client's deadline reaches the header reads only through its transport:
    # without it, this takes the ~3 s the headers need, each byte inside the read timeout.
    with HostileServer(Hostility.SLOW_HEADERS, interval=0.03) as server:
        outcome, took = await run(sync_client, server, lambda c: c.orders.get("o1"),
                                  timeout=0.3, max_retries=0)
    assert isinstance(outcome, APITimeoutError)
    assert took < 1.5


@pytest.mark.parametrize("make", CLIENTS)
async def test_a_wait_ends_at_its_own_deadline_on_a_trickling_server(
        make: Callable[..., Any], server: HostileServer) -> None:
    server.hostility = Hostility.SLOW_BODY
    outcome, took = await run(make, server,
                              lambda c: c.wait_for_completion("o1", timeout=3.0), timeout=2.0)
    assert isinstance(outcome, (OrderStalled, APITimeoutError))
    assert took < 6.0  # issue: 30.6 s before the deadline reached the socket reads


@pytest.mark.parametrize("make", CLIENTS)
async def test_a_create_cut_off_mid_answer_is_ambiguous_not_resent(
        make: Callable[..., Any], server: HostileServer) -> None:
    server.hostility = Hostility.SLOW_BODY
    outcome, took = await run(
        make, server, lambda c: c.orders.create(items=[{"itemId": "product_x"}]), timeout=1.0)
    assert isinstance(outcome, AmbiguousOrderError)
    assert [r.method for r in server.requests] == ["POST"]
    assert took < 4.0


@pytest.mark.parametrize("make", CLIENTS)
@pytest.mark.parametrize("hostility", [Hostility.ENDLESS_BODY, Hostility.GZIP_BOMB])
async def test_endless_and_bomb_bodies_stop_at_the_size_cap_in_bounded_memory(
        make: Callable[..., Any], hostility: Hostility, server: HostileServer) -> None:
    server.hostility = hostility
    server.bomb_size = 512 * MiB  # packs into ~0.5 MiB
    tracemalloc.start()
    try:
        outcome, _ = await run(make, server, lambda c: c.orders.get("o1"), timeout=20.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(outcome, ResponseTooLarge)
    assert "10485760 bytes" in str(outcome)
    assert peak < 48 * MiB  # the 10 MiB cap, plus a chunk and its decoding
    assert len(server.requests) == 1  # the same server would send the same body: no retry


async def test_the_size_cap_is_an_option(server: HostileServer) -> None:
    server.hostility = Hostility.GZIP_BOMB
    server.bomb_size = 4 * MiB
    outcome, _ = await run(sync_client, server, lambda c: c.orders.get("o1"),
                           max_response_bytes=MiB)
    assert isinstance(outcome, ResponseTooLarge)
    outcome, _ = await run(sync_client, server, lambda c: c.with_options(
        max_response_bytes=8 * MiB).orders.get("o1"))
    # Read whole under the raised cap: 4 MiB of zeros, which is no order.
    assert isinstance(outcome, APIResponseValidationError)
    assert not isinstance(outcome, ResponseTooLarge)
    with pytest.raises(ValueError, match="max_response_bytes"):
        sync_client(server, max_response_bytes=0)


@pytest.mark.parametrize("make", CLIENTS)
async def test_a_well_behaved_answer_still_reads_and_asks_for_what_foxpoll_decodes(
        make: Callable[..., Any], server: HostileServer) -> None:
    outcome, _ = await run(make, server, lambda c: c.orders.get("o1"))
    assert outcome.status == "completed"
    assert list(outcome.codes) == ["HOSTILE-TEST-CODE"]
    assert server.requests[0].headers["accept-encoding"] == "gzip, deflate"


@pytest.mark.parametrize("make", CLIENTS)
@pytest.mark.parametrize("retry_after", ["999999", "Wed, 21 Oct 2037 07:28:00 GMT"])
async def test_a_huge_retry_after_is_refused_at_once(
        make: Callable[..., Any], retry_after: str, server: HostileServer) -> None:
    server.hostility, server.retry_after = Hostility.RETRY_AFTER, retry_after
    outcome, took = await run(make, server, lambda c: c.orders.get("o1"))
    assert isinstance(outcome, RateLimitError)
    assert outcome.retry_after is not None
    assert outcome.retry_after > 60
    assert took < 4.0
    assert len(server.requests) == 1


@pytest.mark.parametrize("follow", [False, True])
async def test_a_redirect_to_another_port_is_never_followed(
        follow: bool, server: HostileServer) -> None:
    server.hostility = Hostility.REDIRECT
    with httpx.Client(follow_redirects=follow) as http:
        outcome, _ = await run(sync_client, server, lambda c: c.orders.get("o1"),
                               http_client=http)
    assert isinstance(outcome, APIStatusError)
    assert outcome.status_code == 307
    assert server.redirected == []


@pytest.mark.parametrize("make", CLIENTS)
async def test_a_frozen_server_is_a_timeout(
        make: Callable[..., Any], server: HostileServer) -> None:
    server.hostility = Hostility.FREEZE
    outcome, took = await run(make, server, lambda c: c.orders.get("o1"),
                              timeout=0.5, max_retries=1)
    assert isinstance(outcome, APITimeoutError)
    assert len(server.requests) == 2
    assert took < 4.0


@pytest.mark.parametrize("make", CLIENTS)
async def test_a_deep_body_is_a_validation_error_not_a_recursion_error(
        make: Callable[..., Any], server: HostileServer) -> None:
    server.hostility = Hostility.DEEP_BODY
    outcome, _ = await run(make, server, lambda c: c.orders.get("o1"))
    assert isinstance(outcome, ResponseTooLarge), outcome
    assert "nested deeper than 32" in str(outcome)
    assert len(server.requests) == 1  # the same server would send the same body


@pytest.mark.parametrize("make", CLIENTS)
async def test_an_amplifying_body_is_refused_before_it_is_decoded(
        make: Callable[..., Any], server: HostileServer) -> None:
    server.hostility = Hostility.AMPLIFYING_BODY  # 700,000 items in 10 MiB
    await run(make, server, lambda c: c.orders.get("o1"))  # the server builds its body once
    tracemalloc.start()
    started = time.process_time()
    try:
        outcome, _ = await run(make, server, lambda c: c.orders.get("o1"), timeout=20.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    cpu = time.process_time() - started
    assert isinstance(outcome, ResponseTooLarge), outcome
    assert "over 100000 JSON values" in str(outcome)
    assert peak < 3 * server.amplified_size  # the body and its reading: none of it decoded
    assert cpu < 2.0  # the server's sending included; decoding it all took 3.7 s alone
    assert len(server.requests) == 2
