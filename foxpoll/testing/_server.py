"""Serve a :class:`FakeFoxReload` over real HTTP, with the standard library only."""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

from ._simulator import FakeFoxReload

__all__ = ["SimulatorServer"]

log = logging.getLogger("foxpoll.testing")


class SimulatorServer:
    """A threaded HTTP server in front of a simulator; use as a context manager.

    Args:
        sim: The simulator to serve (give it a real clock: ``SystemClock()``).
        host: Address to bind; loopback by default.
        port: Port to bind; 0 picks a free one (see :attr:`url`).
    """

    def __init__(self, sim: FakeFoxReload, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.sim = sim
        handler = type("_Handler", (_Handler,), {"sim": sim})
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def serve_forever(self) -> None:
        self._server.serve_forever(poll_interval=0.2)

    def start(self) -> SimulatorServer:
        """Serve from a background thread."""
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> SimulatorServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    sim: FakeFoxReload
    protocol_version = "HTTP/1.1"

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        content = self.rfile.read(length) if length else b""
        request = httpx.Request(
            self.command,
            f"http://{self.headers.get('Host', 'localhost')}{self.path}",
            headers=list(self.headers.items()),
            content=content,
        )
        try:
            response = self.sim.handle(request)
        except httpx.TransportError:
            self.close_connection = True  # a dropped connection, as the fault asked
            return
        body = response.content
        try:
            self.send_response(response.status_code)
            for name, value in response.headers.items():
                if name.lower() not in ("content-length", "connection"):
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout)
            self.close_connection = True

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _serve

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)
