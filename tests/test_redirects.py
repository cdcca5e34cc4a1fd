"""A redirect is never followed, so the API key never reaches another host: tested with a
real local server that redirects to a second one, on another port, that records headers."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from foxpoll import APIStatusError, AsyncFoxReload, FoxReload

pytestmark = pytest.mark.slow

KEY = "sk-live-redirect-9f1c"


def serve(handler: type[BaseHTTPRequestHandler]) -> tuple[ThreadingHTTPServer, str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def hosts() -> Iterator[tuple[str, list[dict[str, str]]]]:
    seen: list[dict[str, str]] = []

    class Elsewhere(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(dict(self.headers.items()))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"id": "o1", "status": "completed"}')

        def log_message(self, *args: Any) -> None:
            pass

    other, other_url = serve(Elsewhere)

    class Redirecting(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(301)
            self.send_header("Location", f"{other_url}{self.path}")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    api, api_url = serve(Redirecting)
    try:
        yield api_url, seen
    finally:
        for server in (api, other):
            server.shutdown()
            server.server_close()


def test_a_redirect_is_refused_even_by_a_client_that_follows_them(
    hosts: tuple[str, list[dict[str, str]]]
) -> None:
    url, seen = hosts
    with httpx.Client(follow_redirects=True) as http, \
            FoxReload(KEY, base_url=url, http_client=http, max_retries=0) as client, \
            pytest.raises(APIStatusError, match=r"redirected to 127\.0\.0\.1") as info:
        client.orders.get("o1")
    assert info.value.status_code == 301
    assert "follows no redirect" in str(info.value)
    assert seen == []  # the other host never saw a request, let alone the key


async def test_the_async_client_refuses_redirects_too(
    hosts: tuple[str, list[dict[str, str]]]
) -> None:
    url, seen = hosts
    async with httpx.AsyncClient(follow_redirects=True) as http, \
            AsyncFoxReload(KEY, base_url=url, http_client=http, max_retries=0) as client:
        with pytest.raises(APIStatusError, match="redirected"):
            await client.orders.get("o1")
    assert seen == []
