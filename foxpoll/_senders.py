"""How the drivers send a request: within one deadline and one size cap, whatever the
server or the network does.

httpx's timeouts bound each read, so a server that trickles a byte just inside the read
timeout holds a request for hours, and httpx buffers any body whole, decoding unsolicited
gzip on the way. Here every request has a whole-request deadline and its body is read
chunk by chunk, decoded by :class:`BodyReader` with a bounded output, and refused past
``max_bytes``.

The deadline covers the status line and headers too: on asyncio with ``asyncio.timeout``,
for any transport; with blocking I/O, by :class:`DeadlineBackend` under the default
client's connection pool, which shortens every socket read, write and connect to what is
left. A blocking ``http_client`` of your own bounds the headers per read only (its
timeouts); the body is bounded either way.
"""

from __future__ import annotations

import contextvars
import time
import zlib
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

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
    "ClientSender",
    "Sender",
    "TransportSender",
    "UnreadableBody",
    "bounded_transport",
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
    :func:`time.monotonic` instant). Sans-io: :meth:`feed` it, then :meth:`response`."""

    def __init__(self, response: httpx.Response, max_bytes: int, deadline: float) -> None:
        self.request = response.request
        self.max_bytes = max_bytes
        self.deadline = deadline
        self.parts: list[bytes] = []
        self.size = 0
        self.direct = True  # httpx reads the body itself, through _Checked
        self.decoder: Any = None
        if response.is_stream_consumed:  # built in memory (a mock, a simulator): decoded
            self.feed(response.content, keep=False)
            return
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding in ("gzip", "x-gzip"):
            self.decoder = zlib.decompressobj(zlib.MAX_WBITS | 16)
        elif encoding == "deflate":
            self.decoder = _Deflate()
        elif encoding in ("identity", ""):
            response.stream = _Checked(response.stream, self)
            return
        else:
            raise UnreadableBody(f"body in Content-Encoding {encoding[:40]!r}, not asked for",
                                 request=self.request, too_large=False)
        self.encoding = encoding
        self.direct = False  # the sender feeds the raw chunks, this decodes them

    def feed(self, chunk: bytes, keep: bool = True) -> None:
        if time.monotonic() > self.deadline:
            raise httpx.ReadTimeout("the request's deadline passed while reading the body",
                                    request=self.request)
        if self.decoder is None:
            self.size += len(chunk)
            self._check()
            if keep and chunk:
                self.parts.append(chunk)
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
        """``streamed`` with its body; a decoded one without its encoding headers."""
        if self.direct:
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


class _Checked(httpx.SyncByteStream, httpx.AsyncByteStream):
    def __init__(self, stream: Any, reader: BodyReader) -> None:
        self.stream, self.reader = stream, reader

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.stream:
            self.reader.feed(chunk, keep=False)
            yield chunk

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.stream:
            self.reader.feed(chunk, keep=False)
            yield chunk

    def close(self) -> None:
        self.stream.close()

    async def aclose(self) -> None:
        await self.stream.aclose()


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


def bounded_transport(limits: httpx.Limits) -> httpx.HTTPTransport:
    """An :class:`httpx.HTTPTransport` whose pool connects through :class:`DeadlineBackend`.

    httpx takes no network backend, so the transport's pool is rebuilt with one; the pool
    is the only state an ``HTTPTransport`` sends through.
    """
    transport = httpx.HTTPTransport(limits=limits)
    transport._pool = httpcore.ConnectionPool(
        ssl_context=httpx.create_ssl_context(),
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        network_backend=DeadlineBackend(),
    )
    return transport


class _BlockingSender:
    def _open(self, request: httpx.Request) -> httpx.Response:
        raise NotImplementedError

    def send(self, request: httpx.Request, seconds: float, max_bytes: int) -> httpx.Response:
        deadline = time.monotonic() + seconds
        with _until(deadline):
            streamed = self._open(request)
            try:
                reader = BodyReader(streamed, max_bytes, deadline)
                if reader.direct:
                    streamed.read()
                else:
                    for chunk in streamed.stream:  # type: ignore[union-attr]
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
                    if reader.direct:
                        await streamed.aread()
                    else:
                        async for chunk in streamed.stream:  # type: ignore[union-attr]
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
