"""How the drivers send a request: within one deadline and one size cap, whatever the
server or the network does.

httpx's timeouts bound each read, so a server that trickles a byte just inside the read
timeout holds a request for hours, and httpx buffers any body whole, decoding unsolicited
gzip on the way. Here every request has a whole-request deadline and its body is read
chunk by chunk (``iter_raw``), decoded by :class:`BodyReader` with a bounded output, and
refused past ``max_bytes``.

The deadline covers the status line and headers too: on asyncio with ``asyncio.timeout``,
for any transport; with blocking I/O, by :class:`BoundedTransport`, the default client's
transport, which shortens every socket read, write and connect to what is left. A
blocking ``http_client`` of your own bounds the headers per read only (its timeouts); the
body is bounded either way.

The default clients, blocking and async, take their proxies from the environment by one
rule, :func:`proxy_mounts`; :func:`proxy_for` tells which proxy a URL goes through.
"""

from __future__ import annotations

import contextvars
import ipaddress
import time
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar

import httpcore
import httpx

from ._deadlines import within

__all__ = [
    "DEFAULT_MAX_RESPONSE_BYTES",
    "DEFAULT_TIMEOUT",
    "AsyncClientSender",
    "AsyncSender",
    "AsyncTransportSender",
    "BodyReader",
    "BoundedTransport",
    "ClientSender",
    "DeadlineBackend",
    "Sender",
    "TransportSender",
    "UnreadableBody",
    "default_async_client",
    "default_client",
    "proxy_for",
    "proxy_mounts",
]

DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_RESPONSE_BYTES = 10 * 1024 * 1024
ACCEPT_ENCODING = "gzip, deflate"


class UnreadableBody(httpx.TransportError):
    """A response body foxpoll refused to read: over the size cap, or in an encoding it
    did not ask for. Not worth a retry: the same server sends the same body."""

    def __init__(self, message: str, *, request: httpx.Request, too_large: bool) -> None:
        super().__init__(message, request=request)
        self.too_large = too_large


class Sender(Protocol):
    """What the sync driver sends with."""

    def send(self, request: httpx.Request, seconds: float, max_bytes: int) -> httpx.Response:
        ...

    def close(self) -> None: ...


class AsyncSender(Protocol):
    """What the async driver sends with."""

    async def send(self, request: httpx.Request, seconds: float, max_bytes: int
                   ) -> httpx.Response: ...

    async def aclose(self) -> None: ...


class BodyReader:
    """Collects a response body from raw chunks, decoding ``gzip`` or ``deflate`` with a
    bounded output, and refuses it past ``max_bytes`` (decoded) or past ``deadline`` (a
    :func:`time.monotonic` instant). Sans-io: :meth:`feed` it the raw chunks (unless
    :attr:`in_memory`), then take :meth:`response`."""

    def __init__(self, response: httpx.Response, max_bytes: int, deadline: float) -> None:
        self.request = response.request
        self.max_bytes = max_bytes
        self.deadline = deadline
        self.parts: list[bytes] = []
        self.size = 0
        self.decoder: Any = None
        self.in_memory = response.is_stream_consumed
        """Built in memory (a mock, a simulator) and decoded already: nothing to feed."""
        if self.in_memory:
            self.size = len(response.content)
            self._check()
            return
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding in ("gzip", "x-gzip"):
            self.decoder = zlib.decompressobj(zlib.MAX_WBITS | 16)
        elif encoding == "deflate":
            self.decoder = _Deflate()
        elif encoding not in ("identity", ""):
            raise UnreadableBody(f"body in Content-Encoding {encoding[:40]!r}, not asked for",
                                 request=self.request, too_large=False)
        self.encoding = encoding

    def feed(self, chunk: bytes) -> None:
        if time.monotonic() > self.deadline:
            raise httpx.ReadTimeout("the request's deadline passed while reading the body",
                                    request=self.request)
        if self.decoder is None:
            self._keep(chunk)
            return
        try:
            data = self.decoder.decompress(chunk, self.max_bytes + 1 - self.size)
            self._keep(data)
            while self.decoder.unconsumed_tail:
                self._keep(self.decoder.decompress(self.decoder.unconsumed_tail,
                                                   self.max_bytes + 1 - self.size))
        except zlib.error:
            raise UnreadableBody(f"body does not decode as {self.encoding}",
                                 request=self.request, too_large=False) from None

    def _keep(self, data: bytes) -> None:
        self.size += len(data)
        self._check()
        if data:
            self.parts.append(data)

    def _check(self) -> None:
        if self.size > self.max_bytes:
            raise UnreadableBody(f"response body over {self.max_bytes} bytes",
                                 request=self.request, too_large=True)

    def response(self, streamed: httpx.Response) -> httpx.Response:
        """``streamed`` with the body fed, decoded, without the headers of its encoding."""
        if self.in_memory:
            return streamed
        headers = httpx.Headers([
            (name, value) for name, value in streamed.headers.multi_items()
            if name.lower() not in ("content-encoding", "content-length")
        ])
        return httpx.Response(
            streamed.status_code,
            headers=headers,
            content=b"".join(self.parts),
            request=self.request,
            extensions=streamed.extensions,
        )


class _Deflate:
    """``deflate`` as servers send it: zlib-wrapped or raw (httpx accepts both), told
    apart by the zlib header once its two bytes are in."""

    def __init__(self) -> None:
        self.inner: Any = None
        self.head = b""
        self.unconsumed_tail = b""

    def decompress(self, data: bytes, max_length: int) -> bytes:
        if self.inner is None:
            self.head += data
            if len(self.head) < 2:
                return b""
            cmf, flg = self.head[0], self.head[1]
            wrapped = cmf & 0x0F == 8 and (cmf << 8 | flg) % 31 == 0
            self.inner = zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
            data, self.head = self.head, b""
        out = self.inner.decompress(data, max_length)
        self.unconsumed_tail = self.inner.unconsumed_tail
        return bytes(out)


# The deadline of the request this thread is sending, for DeadlineBackend's streams.
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "foxpoll_request_deadline", default=None)


@contextmanager
def _until(deadline: float) -> Iterator[None]:
    token = _deadline.set(deadline)
    try:
        yield
    finally:
        _deadline.reset(token)


def _left(timeout: float | None, error: type[Exception]) -> float | None:
    deadline = _deadline.get()
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise error("the request's deadline passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self.stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self.stream.read(max_bytes, _left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.stream.write(buffer, _left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self.stream.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        tls = self.stream.start_tls(ssl_context, server_hostname,
                                    _left(timeout, httpcore.ConnectTimeout))
        return _DeadlineStream(tls)

    def get_extra_info(self, info: str) -> Any:
        return self.stream.get_extra_info(info)


class DeadlineBackend(httpcore.NetworkBackend):
    """httpcore's blocking backend, with every socket operation cut short at the deadline
    of the request being sent on this thread."""

    def __init__(self, backend: httpcore.NetworkBackend | None = None) -> None:
        self.backend = backend or httpcore.SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None, socket_options: Any = None
                    ) -> httpcore.NetworkStream:
        stream = self.backend.connect_tcp(host, port, _left(timeout, httpcore.ConnectTimeout),
                                          local_address, socket_options)
        return _DeadlineStream(stream)

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Any = None) -> httpcore.NetworkStream:
        stream = self.backend.connect_unix_socket(
            path, _left(timeout, httpcore.ConnectTimeout), socket_options)
        return _DeadlineStream(stream)

    def sleep(self, seconds: float) -> None:
        self.backend.sleep(seconds)


# httpcore's errors as httpx's, the most specific first (as httpx's own transport maps them).
_HTTPX_ERRORS: tuple[tuple[type[Exception], type[httpx.TransportError]], ...] = (
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.ProxyError, httpx.ProxyError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.ProtocolError, httpx.ProtocolError),
)


@contextmanager
def _httpx_errors(request: httpx.Request) -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        for raised, mapped in _HTTPX_ERRORS:
            if isinstance(exc, raised):
                raise mapped(str(exc), request=request) from exc
        raise


class BoundedTransport(httpx.BaseTransport):
    """The blocking transport of the client foxpoll builds: httpcore's connection pool
    (or its proxy pool, for ``proxy``) on :class:`DeadlineBackend`, so that every connect,
    read and write ends by the deadline of the request being sent, status line and headers
    included. httpx's own transport takes no network backend; this one is built on
    httpcore's public API with httpx's defaults (HTTP/1.1, certificates verified as
    :func:`httpx.create_ssl_context` does) and ``limits``, and raises httpx's exceptions.

    Args:
        limits: The pool's ``max_connections``, ``max_keepalive_connections`` and
            ``keepalive_expiry``.
        proxy: An HTTP(S) or SOCKS5 proxy to send every request through.
    """

    def __init__(self, limits: httpx.Limits, proxy: httpx.Proxy | None = None) -> None:
        options: dict[str, Any] = {
            "ssl_context": httpx.create_ssl_context(),
            "max_connections": limits.max_connections,
            "max_keepalive_connections": limits.max_keepalive_connections,
            "keepalive_expiry": limits.keepalive_expiry,
            "network_backend": DeadlineBackend(),
        }
        self.pool: httpcore.ConnectionPool
        if proxy is None:
            self.pool = httpcore.ConnectionPool(**options)
        elif proxy.url.scheme in ("socks5", "socks5h"):
            self.pool = httpcore.SOCKSProxy(proxy_url=_core_url(proxy.url),
                                            proxy_auth=proxy.raw_auth, **options)
        else:
            self.pool = httpcore.HTTPProxy(proxy_url=_core_url(proxy.url),
                                           proxy_auth=proxy.raw_auth,
                                           proxy_headers=proxy.headers.raw,
                                           proxy_ssl_context=proxy.ssl_context, **options)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        sent = httpcore.Request(
            request.method,
            _core_url(request.url),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        with _httpx_errors(request):
            answer = self.pool.handle_request(sent)
        return httpx.Response(answer.status, headers=answer.headers,
                              stream=_Body(answer, request), extensions=answer.extensions)

    def close(self) -> None:
        self.pool.close()


class _Body(httpx.SyncByteStream):
    def __init__(self, answer: httpcore.Response, request: httpx.Request) -> None:
        self.answer, self.request = answer, request

    def __iter__(self) -> Iterator[bytes]:
        with _httpx_errors(self.request):
            yield from self.answer.iter_stream()

    def close(self) -> None:
        self.answer.close()


def _core_url(url: httpx.URL) -> httpcore.URL:
    return httpcore.URL(scheme=url.raw_scheme, host=url.raw_host, port=url.port,
                        target=url.raw_path)


TransportT = TypeVar("TransportT")


def proxy_mounts(transport: Callable[[httpx.Proxy], TransportT]
                 ) -> dict[str, TransportT | None]:
    """httpx ``mounts`` for the proxies the environment names, read as httpx reads them
    for a client with ``trust_env`` (its documented rule): ``HTTP_PROXY``, ``HTTPS_PROXY``
    and ``ALL_PROXY`` (in either case, or the system's settings on macOS and Windows) for
    URLs of that scheme, each through ``transport(proxy)``; the hosts in ``NO_PROXY`` are
    sent direct (``None``: the client's own transport), and ``NO_PROXY=*`` turns proxies
    off."""
    found = urllib.request.getproxies()
    bypass = [host.strip() for host in found.get("no", "").split(",") if host.strip()]
    if "*" in bypass:
        return {}
    mounts: dict[str, TransportT | None] = {}
    for scheme in ("http", "https", "all"):
        if url := found.get(scheme):
            mounts[f"{scheme}://"] = transport(
                httpx.Proxy(url if "://" in url else f"http://{url}"))
    for host in bypass:
        mounts[_direct_pattern(host)] = None
    return mounts


def proxy_for(url: httpx.URL) -> httpx.URL | None:
    """The proxy the default clients send a request for ``url`` through, as the
    environment says now, or None when they go direct. httpx itself routes a request to
    no network: a client with :func:`proxy_mounts` of in-memory transports, so that the
    answer is httpx's matching of mounts, not a copy of it."""
    chosen: list[httpx.Proxy | None] = []

    def route(proxy: httpx.Proxy | None) -> httpx.MockTransport:
        def handle(request: httpx.Request) -> httpx.Response:
            chosen.append(proxy)
            return httpx.Response(204)

        return httpx.MockTransport(handle)

    with httpx.Client(transport=route(None), mounts=proxy_mounts(route)) as probe:
        probe.get(url.copy_with(query=None, fragment=None))
    return None if chosen[0] is None else chosen[0].url


def _direct_pattern(host: str) -> str:
    # The URL pattern httpx gives a NO_PROXY entry (after curl's rules for NO_PROXY).
    if "://" in host:
        return host
    try:
        address = ipaddress.ip_address(host.split("/")[0])
    except ValueError:
        return f"all://{host}" if host.lower() == "localhost" else f"all://*{host}"
    return f"all://[{host}]" if address.version == 6 else f"all://{host}"


def default_client(limits: httpx.Limits) -> httpx.Client:
    """The blocking client a ``FoxReload`` builds when given none: every request within
    its deadline (:class:`BoundedTransport`), through the proxy the environment names for
    its URL (:func:`proxy_mounts`)."""
    return httpx.Client(
        transport=BoundedTransport(limits),
        mounts=proxy_mounts(lambda proxy: BoundedTransport(limits, proxy)),
    )


def default_async_client(limits: httpx.Limits) -> httpx.AsyncClient:
    """The client an ``AsyncFoxReload`` builds when given none: httpx's own transport
    (the async sender bounds each request as a whole), proxied as :func:`default_client`
    is."""
    return httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(limits=limits),
        mounts=proxy_mounts(lambda proxy: httpx.AsyncHTTPTransport(limits=limits,
                                                                   proxy=proxy)),
    )


class _BlockingSender:
    def _open(self, request: httpx.Request) -> httpx.Response:
        raise NotImplementedError

    def send(self, request: httpx.Request, seconds: float, max_bytes: int) -> httpx.Response:
        deadline = time.monotonic() + seconds
        with _until(deadline):
            streamed = self._open(request)
            try:
                reader = BodyReader(streamed, max_bytes, deadline)
                if not reader.in_memory:
                    for chunk in streamed.iter_raw():
                        reader.feed(chunk)
            finally:
                streamed.close()
        return reader.response(streamed)


class ClientSender(_BlockingSender):
    """Sends with an :class:`httpx.Client`. Never follows a redirect, whatever the
    client's own setting: httpx would carry ``X-API-Key`` to another host."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client

    def _open(self, request: httpx.Request) -> httpx.Response:
        return self.client.send(request, stream=True, follow_redirects=False)

    def close(self) -> None:
        self.client.close()


class TransportSender(_BlockingSender):
    """Sends straight to an httpx transport, without an :class:`httpx.Client` around it."""

    def __init__(self, transport: httpx.BaseTransport) -> None:
        self.transport = transport

    def _open(self, request: httpx.Request) -> httpx.Response:
        streamed = self.transport.handle_request(request)
        streamed.request = request
        return streamed

    def close(self) -> None:
        self.transport.close()


class _AsyncSender:
    async def _open(self, request: httpx.Request) -> httpx.Response:
        raise NotImplementedError

    async def send(self, request: httpx.Request, seconds: float, max_bytes: int
                   ) -> httpx.Response:
        deadline = time.monotonic() + seconds
        try:
            async with within(seconds):  # the whole exchange, whatever the transport
                streamed = await self._open(request)
                try:
                    reader = BodyReader(streamed, max_bytes, deadline)
                    if not reader.in_memory:
                        async for chunk in streamed.aiter_raw():
                            reader.feed(chunk)
                finally:
                    await streamed.aclose()
        except TimeoutError:
            # Where it stopped is unknown, so it may have been sent: never a ConnectTimeout.
            raise httpx.ReadTimeout("the request's deadline passed", request=request) from None
        return reader.response(streamed)


class AsyncClientSender(_AsyncSender):
    """:class:`ClientSender` for an :class:`httpx.AsyncClient`."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def _open(self, request: httpx.Request) -> httpx.Response:
        return await self.client.send(request, stream=True, follow_redirects=False)

    async def aclose(self) -> None:
        await self.client.aclose()


class AsyncTransportSender(_AsyncSender):
    """:class:`TransportSender` for an async httpx transport."""

    def __init__(self, transport: httpx.AsyncBaseTransport) -> None:
        self.transport = transport

    async def _open(self, request: httpx.Request) -> httpx.Response:
        streamed = await self.transport.handle_async_request(request)
        streamed.request = request
        return streamed

    async def aclose(self) -> None:
        await self.transport.aclose()
