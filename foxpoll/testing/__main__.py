"""``python -m foxpoll.testing`` (and ``foxpoll simulate``): serve the FoxReload simulator
over HTTP."""

from __future__ import annotations

import argparse
import logging
import secrets

from foxpoll._clock import SystemClock

from ._scripts import OrderScript
from ._server import SimulatorServer
from ._simulator import DEFAULT_API_KEY, FakeFoxReload


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The served simulator's options, on ``parser``."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    parser.add_argument("--api-key", default=DEFAULT_API_KEY,
                        help=f"the key clients must send (default {DEFAULT_API_KEY!r})")
    parser.add_argument("--complete-after", type=float, default=6.0,
                        help="seconds from payment to completion (default 6)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed order ids and codes, to repeat a run (default: fresh "
                             "ids every start, as a real server's never repeat)")
    parser.add_argument("--verbose", action="store_true", help="log every request")


def simulator(args: argparse.Namespace) -> FakeFoxReload:
    """The simulator ``args`` describe, on the real clock."""
    # Without a seed every start would hand out the same order ids again, which a dedup
    # store kept from an earlier run would then skip as already delivered.
    seed = args.seed if args.seed is not None else secrets.randbits(64)
    return FakeFoxReload(api_key=args.api_key, clock=SystemClock(), seed=seed,
                         default_script=OrderScript.complete(after=args.complete_after))


def serve(args: argparse.Namespace) -> None:
    """Serve until interrupted."""
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO)
    server = SimulatorServer(simulator(args), host=args.host, port=args.port)
    print(f"FoxReload simulator on {server.url} (API key {args.api_key!r}); Ctrl-C stops it.\n"
          f"Point a client at it: FOXRELOAD_BASE_URL={server.url} "
          f"FOXRELOAD_API_KEY={args.api_key}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m foxpoll.testing", description="Serve the FoxReload simulator."
    )
    add_arguments(parser)
    serve(parser.parse_args(argv))


if __name__ == "__main__":
    main()
