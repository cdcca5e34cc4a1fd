"""A lean aiohttp transport for :class:`httpx.AsyncClient` (the ``fast`` extra).

httpx's default async transport slows down sharply with many requests in flight. This
transport sends each request with one aiohttp call and hands back a plain
:class:`httpx.Response`, so foxpoll's polling loop can run close to a bare aiohttp loop
(``benchmarks/throughput.py`` measures it beside one).

Errors are mapped onto httpx's exception classes with one rule in mind: only a failure
that proves nothing was sent becomes :class:`httpx.ConnectError` or
:class:`httpx.ConnectTimeout`, the only errors after which foxpoll ever resends a create.

::

    from foxpoll import AsyncFoxReload
    from foxpoll.transports import fast_http_client

    client = AsyncFoxReload(http_client=fast_http_client())
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import httpx

try:
    import aiohttp
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "foxpoll.transports needs aiohttp: pip install 'foxpoll[fast]'"
    ) from exc

__all__ = ["AiohttpTransport", "fast_http_client"]


class AiohttpTransport(httpx.AsyncBaseTransport):
    """Send httpx requests through one :class:`aiohttp.ClientSession`.

    Args:
        limits: Connection limits, as for httpx (``max_connections``, keep-alive expiry).
        session: Your own session (foxpoll will not close it); one is created on first use
            otherwise. Give it ``auto_decompress=False``: httpx decodes bodies itself.
    """

    def __init__(
        self,
        *,
        limits: httpx.Limits | None = None,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self._limits = limits or httpx.Limits(max_connections=100)
        self._session = session
        self._owns_session = session is None

    def _session_for_loop(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            expiry = self._limits.keepalive_expiry
            connector = aiohttp.TCPConnector(
                limit=self._limits.max_connections or 0,
                keepalive_timeout=expiry if expiry is not None else 15.0,
            )
            self._session = aiohttp.ClientSession(
                connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent",)
            )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._session_for_loop()
        timeouts: dict[str, Any] = request.extensions.get("timeout", {})
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=_sum(timeouts.get("pool"), timeouts.get("connect")),
            sock_connect=timeouts.get("connect"),
            sock_read=timeouts.get("read"),
        )
        with _mapped_errors(request):
            answer = await session.request(
                request.method,
                str(request.url),
                headers=request.headers.multi_items(),
                data=request.content or None,
                timeout=timeout,
                allow_redirects=False,
            )
        # The body streams: the caller bounds its size and its time (foxpoll reads it
        # chunk by chunk, within the request's deadline and the response-size cap).
        return httpx.Response(
            answer.status,
            headers=answer.raw_headers,
            stream=_AiohttpBody(answer, request),
            request=request,
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def aclose(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()


class _AiohttpBody(httpx.AsyncByteStream):
    def __init__(self, answer: aiohttp.ClientResponse, request: httpx.Request) -> None:
        self.answer = answer
        self.request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        content = self.answer.content
        with _mapped_errors(self.request):
            while chunk := await content.readany():
                yield chunk

    async def aclose(self) -> None:
        if self.answer.content.at_eof():
            self.answer.release()  # read to the end: the connection can serve another
        else:
            self.answer.close()  # abandoned mid-body: the connection is unusable


def _sum(pool: float | None, connect: float | None) -> float | None:
    if pool is None or connect is None:
        return None
    return pool + connect


@contextmanager
def _mapped_errors(request: httpx.Request) -> Iterator[None]:
    try:
        yield
    except aiohttp.ConnectionTimeoutError as exc:  # waiting for or opening a connection
        raise httpx.ConnectTimeout(str(exc) or "connect timed out", request=request) from exc
    except aiohttp.ClientConnectorError as exc:  # refused, DNS, TLS handshake: never sent
        raise httpx.ConnectError(str(exc), request=request) from exc
    except (aiohttp.ServerTimeoutError, asyncio.TimeoutError) as exc:
        raise httpx.ReadTimeout(str(exc) or "read timed out", request=request) from exc
    except aiohttp.ServerDisconnectedError as exc:
        raise httpx.RemoteProtocolError(str(exc), request=request) from exc
    except aiohttp.ClientPayloadError as exc:
        raise httpx.ReadError(str(exc), request=request) from exc
    except aiohttp.ClientError as exc:  # anything else happened after connecting
        raise httpx.NetworkError(str(exc), request=request) from exc


def fast_http_client(*, limits: httpx.Limits | None = None) -> httpx.AsyncClient:
    """An :class:`httpx.AsyncClient` on :class:`AiohttpTransport`, for ``AsyncFoxReload``."""
    return httpx.AsyncClient(transport=AiohttpTransport(limits=limits))
