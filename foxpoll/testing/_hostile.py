"""A local server that misbehaves the way bad servers and networks do, and a TCP proxy
that stalls or goes down: point an integration at them to see that every call still ends
in time.

Everything runs on threads over real sockets, so sync and async clients alike meet real
trickling bytes, endless bodies and stalled connections::

    with HostileServer(Hostility.SLOW_BODY) as server:
        client = FoxReload(api_key="k", base_url=server.url, timeout=2.0)
        client.orders.get("o1")     # APITimeoutError after about 2 s, not 30 s or hours

    with FreezingProxy(("127.0.0.1", 5432)) as proxy:
        store = PostgresDedupStore(f"host=127.0.0.1 port={proxy.port} ...")
        proxy.freeze()              # bytes stop flowing both ways; sockets stay open
        proxy.down()                # every connection dropped, new ones closed at once
"""

from __future__ import annotations

import contextlib
import enum
import json
import socket
import socketserver
import threading
import urllib.parse
import zlib
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import unquote

import attrs

__all__ = ["FreezingProxy", "HostileServer", "Hostility", "ReceivedRequest"]

COMPLETED_ORDER: dict[str, Any] = {
    "id": "o1",
    "status": "completed",
    "items": [{"id": "i1", "itemId": "product_steam_10", "quantity": 1, "status": "completed",
               "externalData": ["HOSTILE-TEST-CODE"]}],
}


class Hostility(enum.Enum):
    """How a :class:`HostileServer` answers every request."""

    WELL_BEHAVED = "well-behaved"
    """A completed order, at once: the baseline."""
    SLOW_HEADERS = "slow-headers"
    """The status line and headers one byte per ``interval`` (slow-loris)."""
    SLOW_BODY = "slow-body"
    """Headers at once, then a valid JSON body one byte per ``interval``."""
    ENDLESS_BODY = "endless-body"
    """A chunked body that never ends, as fast as the client reads."""
    GZIP_BOMB = "gzip-bomb"
    """An unsolicited ``Content-Encoding: gzip`` body of ``bomb_size`` zero bytes, packed
    into about a thousandth of that."""
    RETRY_AFTER = "retry-after"
    """``429`` with ``Retry-After: <retry_after>`` (seconds or an HTTP date)."""
    REDIRECT = "redirect"
    """``307`` to the same path on a second port, which records what reaches it."""
    FREEZE = "freeze"
    """Read the request, then send nothing, holding the connection open."""
    WRONG_ID = "wrong-id"
    """The body, about another order: its ``id`` is ``wrong_id``, whatever was asked."""
    WRONG_ID_CASE = "wrong-id-case"
    """The body with its ``id`` the order asked for in another case (``o1`` -> ``O1``;
    an id without letters gets a trailing ``X``)."""
    WRONG_ID_SPACE = "wrong-id-space"
    """The body with its ``id`` the order asked for and a trailing space (``"o1 "``)."""
    ESCAPES = "escapes"
    """Terminal escape sequences (a window title, a screen clear, a cursor move, a device
    control string, a C1 CSI) and control characters (CR, BEL, BS, NUL, DEL) in every
    free-text field and the status, shaped for the path asked: an
    order (its id the one asked for) for ``GET /api/orders/ID``, a page of categories or
    products for their lists, and for any other request (a create, a pay) ``400`` whose
    ``detail`` and ``code`` hold them: what a tool printing the server's words must not
    pass to a terminal."""

    DEEP_BODY = "deep-body"
    """A completed order with a field of arrays nested ``depth`` deep."""
    AMPLIFYING_BODY = "amplifying-body"
    """A completed order with as many one-field items as fit in ``amplified_size`` bytes:
    under the size cap, yet millions of objects once decoded."""


# What Hostility.ESCAPES puts in text, in the order its docstring names them.
_ESCAPES = ("\x1b]0;owned\x07\x1b[2J\x1b[H\x1bP+q\x1b\\\x9b31m\r\x07\x08"
                    "\x00\x7f")


@attrs.frozen
class ReceivedRequest:
    """A request as a hostile server (or its redirect target) read it."""

    method: str
    path: str
    headers: dict[str, str] = attrs.field(repr=False)  # holds the API key


class HostileServer:
    """A threaded HTTP/1.1 server that answers every request the way ``hostility`` says.

    Args:
        hostility: The misbehaviour; change :attr:`hostility` at any time.
        interval: Seconds between bytes, for the slow modes.
        retry_after: The ``Retry-After`` value sent by :attr:`Hostility.RETRY_AFTER`.
        bomb_size: Bytes a :attr:`Hostility.GZIP_BOMB` body expands to.
        wrong_id: The order id :attr:`Hostility.WRONG_ID` answers with.
        body: The JSON document the well-behaved and slow modes send (bytes are sent as
            they are).
        status: The HTTP status the well-behaved mode answers with: an error status
            sends ``body`` as the error's body.
        depth: How deep :attr:`Hostility.DEEP_BODY` nests.
        amplified_size: Bytes of a :attr:`Hostility.AMPLIFYING_BODY` body (just under the
            client's default size cap).
    """

    def __init__(
        self,
        hostility: Hostility = Hostility.WELL_BEHAVED,
        *,
        interval: float = 0.3,
        retry_after: str = "999999",
        bomb_size: int = 1 << 30,
        body: Any = None,
        host: str = "127.0.0.1",
        wrong_id: str = "SOMEONE-ELSES-ORDER",
        depth: int = 100_000,
        amplified_size: int = 10 * 1024 * 1024 - 1024,
        status: int = 200,
    ) -> None:
        self.hostility = hostility
        self.status = status
        self.wrong_id = wrong_id
        self.interval = interval
        self.retry_after = retry_after
        self.bomb_size = bomb_size
        self.body = body if isinstance(body, bytes) else json.dumps(
            COMPLETED_ORDER if body is None else body).encode()
        self.requests: list[ReceivedRequest] = []
        """Requests received, in order."""
        self.redirected: list[ReceivedRequest] = []
        """Requests that reached the redirect target (a client followed the redirect)."""
        self._closing = threading.Event()
        self._server = _Server((host, 0), _handler(self._serve))
        self._target = _Server((host, 0), _handler(self._serve_redirected))
        self._bomb: bytes | None = None
        self.depth = depth
        self.amplified_size = amplified_size
        self._generated_bodies: dict[tuple[Hostility, int], bytes] = {}

    @property
    def url(self) -> str:
        """The base URL to give a client."""
        return _url(self._server)

    @property
    def redirect_url(self) -> str:
        """The base URL of the second port that :attr:`Hostility.REDIRECT` points to."""
        return _url(self._target)

    def start(self) -> HostileServer:
        for server in (self._server, self._target):
            threading.Thread(target=server.serve_forever, args=(0.1,), daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop serving; connections held open by the slow and frozen modes are dropped."""
        self._closing.set()
        for server in (self._server, self._target):
            server.shutdown()
            server.server_close()

    def __enter__(self) -> HostileServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _serve(self, request: ReceivedRequest, out: socket.socket) -> None:
        self.requests.append(request)
        mode = self.hostility
        if mode is Hostility.FREEZE:
            self._closing.wait()
        elif mode is Hostility.SLOW_HEADERS:
            self._trickle(out, _head(200, {"Content-Length": str(len(self.body))}) + self.body)
        elif mode is Hostility.SLOW_BODY:
            out.sendall(_head(200, {"Content-Length": str(len(self.body))}))
            self._trickle(out, self.body)
        elif mode is Hostility.ENDLESS_BODY:
            out.sendall(_head(200, {"Transfer-Encoding": "chunked"}))
            chunk = b"%x\r\n%s\r\n" % (65536, b"[" * 65536)
            while not self._closing.is_set():
                out.sendall(chunk)
        elif mode is Hostility.GZIP_BOMB:
            bomb = self._gzip_bomb()
            out.sendall(_head(200, {"Content-Encoding": "gzip",
                                    "Content-Length": str(len(bomb))}) + bomb)
        elif mode is Hostility.RETRY_AFTER:
            out.sendall(_head(429, {"Retry-After": self.retry_after, "Content-Length": "0"}))
        elif mode is Hostility.REDIRECT:
            location = self.redirect_url + request.path
            out.sendall(_head(307, {"Location": location, "Content-Length": "0"}))
        elif mode in _WRONG_IDS:
            body = self._about(_WRONG_IDS[mode](self, _asked_order(request.path)))
            out.sendall(_head(200, {"Content-Length": str(len(body))}) + body)
        elif mode is Hostility.ESCAPES:
            status, document = _escaping(request)
            body = json.dumps(document).encode()
            out.sendall(_head(status, {"Content-Length": str(len(body))}) + body)
        elif mode in (Hostility.DEEP_BODY, Hostility.AMPLIFYING_BODY):
            body = self._generated(mode)
            out.sendall(_head(200, {"Content-Length": str(len(body))}))
            out.sendall(body)  # apart: joined to the head, the body would be copied
        else:
            out.sendall(_head(self.status, {"Content-Length": str(len(self.body))}))
            out.sendall(self.body)

    def _about(self, order_id: str) -> bytes:
        """The body with its ``id`` replaced by ``order_id``."""
        return json.dumps({**json.loads(self.body), "id": order_id}).encode()

    def _serve_redirected(self, request: ReceivedRequest, out: socket.socket) -> None:
        self.redirected.append(request)
        out.sendall(_head(200, {"Content-Length": str(len(self.body))}) + self.body)

    def _trickle(self, out: socket.socket, data: bytes) -> None:
        for index in range(len(data)):
            if self._closing.wait(self.interval):
                return
            out.sendall(data[index:index + 1])

    def _gzip_bomb(self) -> bytes:
        if self._bomb is None:
            self._bomb = b"".join(_zeros_gzip(self.bomb_size))
        return self._bomb


    def _generated(self, mode: Hostility) -> bytes:
        """The body of a generated mode, built once per size (a test measuring memory
        does not see the server build it again)."""
        key = (mode, self.depth if mode is Hostility.DEEP_BODY else self.amplified_size)
        if key not in self._generated_bodies:
            self._generated_bodies.clear()
            self._generated_bodies[key] = (
                _deep(self.depth) if mode is Hostility.DEEP_BODY
                else _amplifying(self.amplified_size))
        return self._generated_bodies[key]


def _deep(depth: int) -> bytes:
    return (b'{"id":"o1","status":"completed","items":[],"detail":'
            + b"[" * depth + b"]" * depth + b"}")


def _amplifying(size: int) -> bytes:
    head, item, tail = b'{"id":"o1","status":"completed","items":[', b'{"itemId":"p"}', b"]}"
    count = max(1, (size - len(head) - len(tail) + 1) // (len(item) + 1))
    return head + b",".join([item] * count) + tail


def _asked_order(path: str) -> str:
    """The order id in ``/api/orders/<id>[/pay]`` (``o1`` for any other path)."""
    parts = [unquote(part) for part in path.split("?")[0].split("/") if part]
    return parts[2] if parts[:2] == ["api", "orders"] and len(parts) > 2 else "o1"


def _other_case(order_id: str) -> str:
    other = order_id.swapcase()
    return other if other != order_id else order_id + "X"  # it has no letter to swap


_WRONG_IDS: dict[Hostility, Callable[[HostileServer, str], str]] = {
    Hostility.WRONG_ID: lambda server, _: server.wrong_id,
    Hostility.WRONG_ID_CASE: lambda _, asked: _other_case(asked),
    Hostility.WRONG_ID_SPACE: lambda _, asked: asked + " ",
}


def _escaping(request: ReceivedRequest) -> tuple[int, Any]:
    """The status and document of :attr:`Hostility.ESCAPES` for ``request``."""
    path = urllib.parse.urlsplit(request.path).path
    text = f"x{_ESCAPES}y"
    if request.method == "GET" and path.startswith("/api/orders/"):
        order_id = urllib.parse.unquote(path.removeprefix("/api/orders/").strip("/"))
        return 200, {
            "id": order_id, "status": f"{_ESCAPES}completed",
            "cancelReason": text, "totalPrice": "1.00", "currency": text,
            "items": [{"id": "i1", "itemId": text, "quantity": 1, "status": text,
                       "error": text, "externalData": [text]}],
        }
    if request.method == "GET" and path.startswith(("/api/categories", "/api/products")):
        item: dict[str, Any] = {"id": text, "name": text, "slug": text}
        if path.startswith("/api/products"):
            item.update(price="1.00", currency=text, quantity=1)
        return 200, {"items": [item], "limit": 200, "offset": 0, "total": 1}
    return 400, {"detail": text, "code": text}


def _zeros_gzip(size: int) -> Iterator[bytes]:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = bytes(1 << 20)
    left = size
    while left > 0:
        piece = block if left >= len(block) else block[:left]
        yield compressor.compress(piece)
        left -= len(piece)
    yield compressor.flush()


def _head(status: int, headers: dict[str, str]) -> bytes:
    reasons = {200: "OK", 307: "Temporary Redirect", 400: "Bad Request",
               429: "Too Many Requests"}
    lines = [f"HTTP/1.1 {status} {reasons.get(status, 'Status')}",
             "Content-Type: application/json", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _url(server: socketserver.TCPServer) -> str:
    host, port = server.server_address[:2]
    return f"http://{host!s}:{port}"


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False


def _handler(serve: Any) -> type[socketserver.StreamRequestHandler]:
    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            request = _read_request(self.rfile)
            if request is None:
                return
            with contextlib.suppress(OSError):  # the client gave up, as the test wants
                serve(request, self.connection)

    return Handler


def _read_request(rfile: Any) -> ReceivedRequest | None:
    line = rfile.readline(65537)
    if not line:
        return None
    method, path, _ = line.decode("latin-1").split(" ", 2)
    headers: dict[str, str] = {}
    while True:
        header = rfile.readline(65537).decode("latin-1").rstrip("\r\n")
        if not header:
            break
        name, _, value = header.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0") or 0)
    if length:
        rfile.read(length)
    return ReceivedRequest(method, path, headers)


class FreezingProxy:
    """A TCP proxy to ``target`` that stalls or goes down on command.

    :meth:`freeze` stops moving bytes, both ways, while every connection stays open: a
    network that stalls mid-statement. :meth:`down` drops every connection and closes
    new ones as soon as they are accepted: a server that restarts, or a host that cannot
    be reached. The two are independent; :meth:`thaw` and :meth:`up` undo them.

    Args:
        target: ``(host, port)`` of the real server, such as PostgreSQL or Redis.
    """

    def __init__(self, target: tuple[str, int], *, host: str = "127.0.0.1") -> None:
        self.target = target
        self._flowing = threading.Event()
        self._flowing.set()
        self._up = threading.Event()
        self._up.set()
        self._closing = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()  # guards _sockets, and _up against a new connection
        self._listener = socket.create_server((host, 0))
        self._listener.settimeout(0.1)

    @property
    def port(self) -> int:
        """The port to connect to instead of the target's."""
        port: int = self._listener.getsockname()[1]
        return port

    def freeze(self) -> None:
        """Stop forwarding: reads and writes through the proxy hang from now on."""
        self._flowing.clear()

    def thaw(self) -> None:
        """Forward again, including what was held back."""
        self._flowing.set()

    def down(self) -> None:
        """Go down: close every open connection, both its ends, and from now on close
        each new one as soon as it is accepted. What was held back by :meth:`freeze` on
        a dropped connection is lost."""
        with self._lock:
            self._up.clear()
        self._drop_connections()

    def up(self) -> None:
        """Come back up: connections made from now on reach the target again. Those
        dropped by :meth:`down` stay closed."""
        self._up.set()

    def start(self) -> FreezingProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def stop(self) -> None:
        self._closing.set()
        self._flowing.set()
        self._drop_connections()
        self._listener.close()

    def __enter__(self) -> FreezingProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _drop_connections(self) -> None:
        with self._lock:
            dropped, self._sockets = self._sockets, []
        for sock in dropped:
            _close(sock)

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not self._up.is_set():
                _close(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                # down() or stop() may have come while the target was being reached:
                # they found nothing of this connection to close, so close it here.
                accepted = self._up.is_set() and not self._closing.is_set()
                if accepted:
                    self._sockets += [client, upstream]
            if not accepted:
                _close(client)
                _close(upstream)
                continue
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                while not self._flowing.wait(0.1):  # frozen: hold the bytes, keep the socket
                    if self._closing.is_set() or sink.fileno() < 0:  # stopped, or dropped
                        return
                sink.sendall(data)
        except OSError:
            pass
        finally:
            _close(sink)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()

