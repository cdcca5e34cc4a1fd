"""Point a client at a server that misbehaves, and see every call end within its bound.

foxpoll.testing ships the hostile server its own bounds are tested with. Run your own
integration against it the same way: a slow-loris body, a gzip bomb, a ten-year
Retry-After and a redirect to another host each end quickly, with a typed error.

Run: ``python examples/hostile_server.py``
"""

from __future__ import annotations

import time

from foxpoll import FoxPollError, FoxReload
from foxpoll.testing import HostileServer, Hostility

CASES = [
    (Hostility.SLOW_BODY, "a valid answer, one byte every 0.3 s (about a minute in all)"),
    (Hostility.GZIP_BOMB, "a quarter MiB on the wire that unpacks to 256 MiB"),
    (Hostility.RETRY_AFTER, "429 with Retry-After: 999999"),
    (Hostility.REDIRECT, "307 to another port"),
]


def main() -> None:
    with HostileServer(bomb_size=256 << 20) as server:
        client = FoxReload(api_key="sk-example", base_url=server.url, timeout=2.0,
                           max_retries=0)
        for hostility, what in CASES:
            server.hostility = hostility
            started = time.monotonic()
            try:
                client.orders.get("o1")
                outcome = "answered"
            except FoxPollError as exc:
                outcome = f"{type(exc).__name__}: {exc}"
            print(f"{what}\n  -> after {time.monotonic() - started:.1f}s: {outcome}")
        print(f"requests that reached the redirect's target: {len(server.redirected)}")
        client.close()


if __name__ == "__main__":
    main()
