"""The clients foxpoll builds when given none: both take their proxy from the environment
by the same rule, and the blocking one keeps its deadline and its pool limit through its
own transport. Over real sockets: an https:// API reached through :class:`TunnelProxy`
(CONNECT, as a real proxy does), and foxpoll.testing.HostileServer as a forward proxy for
http:// URLs without a key (it reads the same request, with the whole URL as its
target)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from foxpoll import APITimeoutError, AsyncFoxReload, FoxReload
from foxpoll._senders import BoundedTransport, default_async_client, default_client, proxy_for
from foxpoll.testing import HostileServer, Hostility

from .services import free_port
from .test_hostile import run

pytestmark = pytest.mark.slow

KEY = "sk-live-proxy-31d7"
API_HOST = "foxreload.invalid"  # never resolves: only a proxy can reach it
UNREACHABLE = f"https://{API_HOST}"


class TunnelProxy:
    """A forward proxy on 127.0.0.1 that records what it reads. ``CONNECT`` opens a
    tunnel whose TLS the proxy ends itself (with ``tls``, for :data:`API_HOST`) and
    forwards the plain request inside to ``api`` (a HostileServer, the API behind it),
    unless ``refuse`` says to answer ``CONNECT`` with that status. A request in clear
    (``GET http://...``) it answers ``502`` as a proxy whose upstream is down would."""

    def __init__(self, api: HostileServer | None = None, tls: ssl.SSLContext | None = None,
                 refuse: int | None = None) -> None:
        self.api, self.tls, self.refuse = api, tls, refuse
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        """What the proxy itself read: method, target and headers of each request."""
        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> TunnelProxy:
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[socketserver.StreamRequestHandler]:
        proxy = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                with contextlib.suppress(OSError):
                    proxy._serve(self.rfile, self.connection)

        return Handler

    def _serve(self, rfile: Any, connection: socket.socket) -> None:
        head = _read_head(rfile)
        if not head:
            return
        method, target, _ = head[0].decode("latin-1").split(" ", 2)
        headers = dict(_header(line) for line in head[1:])
        self.requests.append((method, target, headers))
        if method != "CONNECT" or self.refuse is not None:
            status = self.refuse or 502
            connection.sendall(f"HTTP/1.1 {status} Bad Gateway\r\nContent-Length: 0\r\n"
                               "Connection: close\r\n\r\n".encode())
            return
        assert self.api is not None
        assert self.tls is not None
        connection.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        with self.tls.wrap_socket(connection, server_side=True) as inside, \
                socket.create_connection(_address(self.api.url)) as upstream:
            reader = inside.makefile("rb")
            request = _read_head(reader)
            length = int(dict(map(_header, request[1:])).get("content-length") or 0)
            upstream.sendall(b"".join(request) + b"\r\n" + reader.read(length))
            while chunk := upstream.recv(65536):  # a trickle passes as it comes
                inside.sendall(chunk)


def _read_head(rfile: Any) -> list[bytes]:
    lines: list[bytes] = []
    while (line := rfile.readline(65537)) not in (b"\r\n", b"\n", b""):
        lines.append(line)
    return lines


def _header(line: bytes) -> tuple[str, str]:
    name, _, value = line.decode("latin-1").partition(":")
    return name.strip().lower(), value.strip()


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A certificate authority's file, and a certificate and key for :data:`API_HOST`
    that it signed."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder = tmp_path_factory.mktemp("tls")
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "foxpoll test CA")])

    def signed(builder: x509.CertificateBuilder) -> x509.Certificate:
        return builder.issuer_name(ca_name).serial_number(x509.random_serial_number()) \
            .not_valid_before(now - datetime.timedelta(hours=1)) \
            .not_valid_after(now + datetime.timedelta(days=1)).sign(ca_key, hashes.SHA256())

    ca = signed(x509.CertificateBuilder().subject_name(ca_name).public_key(ca_key.public_key())
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(False, False, False, False, False, True, True,
                                             False, False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                               critical=False))
    leaf = signed(x509.CertificateBuilder()
                  .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, API_HOST)]))
                  .public_key(key.public_key())
                  .add_extension(x509.SubjectAlternativeName([x509.DNSName(API_HOST)]),
                                 critical=False)
                  .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                                 critical=True)
                  .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                                 critical=False)
                  .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                      ca_key.public_key()), critical=False))
    paths = folder / "ca.pem", folder / "cert.pem", folder / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


@pytest.fixture
def tunnel(certificates: tuple[Path, Path, Path], environ: pytest.MonkeyPatch
           ) -> Iterator[tuple[TunnelProxy, HostileServer]]:
    """A :class:`TunnelProxy` to a HostileServer, the API at :data:`UNREACHABLE` that
    the clients trust (``SSL_CERT_FILE``)."""
    authority, certificate, key = certificates
    environ.setenv("SSL_CERT_FILE", str(authority))
    environ.delenv("SSL_CERT_DIR", raising=False)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(certificate, key)
    with HostileServer(interval=0.03) as api, TunnelProxy(api, tls) as proxy:
        yield proxy, api


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
@pytest.mark.parametrize("variable", ["HTTPS_PROXY", "https_proxy", "ALL_PROXY"])
async def test_both_default_clients_send_through_the_proxy_the_environment_names(
        make: type[FoxReload], variable: str, environ: pytest.MonkeyPatch,
        tunnel: tuple[TunnelProxy, HostileServer]) -> None:
    proxy, api = tunnel
    environ.setenv(variable, proxy.url)
    order, _ = await get_order(make, UNREACHABLE)
    assert not isinstance(order, Exception), order
    assert order.status == "completed"
    # The proxy read where to, and nothing else: the key went inside the TLS tunnel.
    assert [(method, target) for method, target, _ in proxy.requests] == [
        ("CONNECT", f"{API_HOST}:443")]
    assert not any(KEY in str(headers) for *_, headers in proxy.requests)
    assert [(r.path, r.headers["x-api-key"]) for r in api.requests] == [("/api/orders/o1", KEY)]


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
        make: type[FoxReload], environ: pytest.MonkeyPatch,
        tunnel: tuple[TunnelProxy, HostileServer]) -> None:
    # Each header byte comes well inside the read timeout; all of them would take ~3 s.
    proxy, api = tunnel
    api.hostility = Hostility.SLOW_HEADERS
    environ.setenv("HTTPS_PROXY", proxy.url)
    outcome, took = await get_order(make, UNREACHABLE, timeout=0.5)
    assert isinstance(outcome, APITimeoutError), outcome
    assert took < 2.0
    assert len(api.requests) == 1


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
        # What the clients check an http:// base_url against, before the key goes out.
        proxied = proxy_for(httpx.URL(url))
        assert expected == (["direct"] if proxied is None else ["proxied"])
        assert proxied is None or str(proxied) == proxy.url


async def get_async(http: httpx.AsyncClient, url: str) -> None:
    async with http:
        (await http.get(url, timeout=5.0)).raise_for_status()
