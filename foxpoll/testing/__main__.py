"""``python -m foxpoll.testing``: serve the FoxReload simulator over HTTP."""

from __future__ import annotations

import argparse
import logging

from foxpoll._clock import SystemClock

from ._scripts import OrderScript
from ._server import SimulatorServer
from ._simulator import DEFAULT_API_KEY, FakeFoxReload


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m foxpoll.testing", description="Serve the FoxReload simulator."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--api-key", default=DEFAULT_API_KEY)
    parser.add_argument(
        "--complete-after", type=float, default=6.0,
        help="seconds from payment to completion (default 6)",
    )
    parser.add_argument("--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO)
    sim = FakeFoxReload(
        api_key=args.api_key,
        clock=SystemClock(),
        default_script=OrderScript.complete(after=args.complete_after),
    )
    server = SimulatorServer(sim, host=args.host, port=args.port)
    print(f"FoxReload simulator on {server.url} (API key {args.api_key!r}); Ctrl-C stops it")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
