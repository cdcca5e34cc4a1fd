"""The ``foxpoll`` command.

::

    foxpoll demo                          the whole job against the simulator, no key needed
    foxpoll orders get|pay|wait ORDER_ID  the real API (FOXRELOAD_API_KEY, FOXRELOAD_BASE_URL)
    foxpoll orders create --item ID[:QTY] [--note KEY=VALUE] [--mock]
        [--rate-limit PER_MINUTE|auto [--rate-limit-store sqlite:///PATH|redis://...]]
    foxpoll catalog [--category ID]       the categories, or a category's products
    foxpoll recovery list [--state S]     the recovery queue: queued, running, dead...
    foxpoll dlq list|requeue|resolve      the recovery queue's dead letters
        --queue sqlite:///PATH|postgresql://...|"host=... dbname=..." [--table NAME]
    foxpoll simulate --port 8080          serve the simulator over HTTP
    foxpoll --version

The queue's location comes from ``--queue`` or else ``FOXPOLL_QUEUE``, and the shared
budget's from ``--rate-limit-store`` or else ``FOXPOLL_RATE_LIMIT_STORE``: a flag wins over
its variable. With neither, a queue command stops (exit 2) rather than guess.

Errors print one line and exit non-zero; ``--debug`` shows the traceback instead. Exit
codes: 0 done, 1 an error, 2 a usage error, 3 the order failed or was cancelled, 4 the
wait stalled (the order may still complete), 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from ._version import __version__
from .errors import FoxPollError, OrderStalled

__all__ = ["main"]


EXIT_CODES = """exit codes:
  0    done
  1    an error (API, network, store, configuration)
  2    a usage error (bad arguments)
  3    the order failed or was cancelled
  4    the wait stalled: the order may still complete (re-check it, or let recovery)
  130  interrupted"""
EXIT_USAGE, EXIT_FAILED, EXIT_STALLED = 2, 3, 4

QUEUE_ENV = "FOXPOLL_QUEUE"
RATE_LIMIT_STORE_ENV = "FOXPOLL_RATE_LIMIT_STORE"


class UsageError(Exception):
    """A command that cannot run as given: said in one line, exit status 2."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="foxpoll", description="Buy from FoxReload and deliver codes exactly once.",
        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"foxpoll {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="run the whole job against the simulator")
    demo.add_argument("--virtual", action="store_true",
                      help="run on virtual time: finishes at once, no live table")
    demo.add_argument("--plain", action="store_true", help="plain lines, no live table")
    demo.add_argument("--db", type=Path, help="keep the SQLite store and queue in this file")

    budget = argparse.ArgumentParser(add_help=False)
    budget.add_argument("--rate-limit", metavar="PER_MINUTE|auto", default=argparse.SUPPRESS,
                        help="take a permit for every request: your key's requests a minute "
                             "(100 on the standard tier), or auto to learn it from 429s")
    budget.add_argument("--rate-limit-store", metavar="URL", default=argparse.SUPPRESS,
                        help="share the budget with your other processes: sqlite:///PATH "
                             "(one host) or redis://... (a fleet); default "
                             f"${RATE_LIMIT_STORE_ENV}")
    orders = commands.add_parser(
        "orders", parents=[budget], help="orders on the real API",
        description="Orders on the real API. The key is read from FOXRELOAD_API_KEY and "
                    "the API's address (scheme and host) from FOXRELOAD_BASE_URL.",
        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter,
    ).add_subparsers(dest="action", required=True)
    for name, text in (("get", "show an order"), ("pay", "pay an order from the balance"),
                       ("wait", "wait until an order finishes")):
        sub = orders.add_parser(name, help=text, parents=[budget])
        sub.add_argument("order_id")
        sub.add_argument("--show-codes", action="store_true", help="print delivered codes")
        sub.add_argument("--json", action="store_true", help="print the order as JSON")
        if name == "pay":
            sub.add_argument("--provider", help="an external payment provider")
        if name == "wait":
            sub.add_argument("--timeout", type=float, help="seconds to wait at most")
    create = orders.add_parser("create", help="create an order", parents=[budget])
    create.add_argument("--item", action="append", required=True, metavar="ID[:QTY]",
                        help="a product id (foxpoll catalog --category ID lists them) and "
                             "its quantity, 1 when omitted; repeat for more items (1-10)")
    create.add_argument("--note", action="append", default=[], metavar="KEY=VALUE",
                        help="product note fields (for every item)")
    create.add_argument("--mock", action="store_true", help="a test order")
    create.add_argument("--json", action="store_true")
    create.add_argument("--show-codes", action="store_true")

    catalog = commands.add_parser(
        "catalog", help="the categories, or one category's products and their ids",
        description="The catalog on the real API (FOXRELOAD_API_KEY, FOXRELOAD_BASE_URL): "
                    "the categories, or with --category its products, whose ids "
                    "orders create --item takes.")
    catalog.add_argument("--category", metavar="ID", help="list this category's products")
    catalog.add_argument("--in-stock", action="store_true", help="only products in stock")

    # --queue goes before or after the action: a parent parser on each level.
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--queue", metavar="LOCATION", default=argparse.SUPPRESS,
                       help="sqlite:///PATH (an existing file), or a postgresql:// URL or "
                            "libpq keyword string (the PostgreSQL and procrastinate "
                            f"queues); default ${QUEUE_ENV}, else an error")
    where.add_argument("--table", metavar="NAME", default=argparse.SUPPRESS,
                       help="the queue's table, schema-qualified if need be "
                            "(billing.foxpoll_recovery); default foxpoll_recovery")
    recovery = commands.add_parser("recovery", parents=[where],
                                   help="the recovery queue's jobs, in every state")
    recovery_actions = recovery.add_subparsers(dest="action", required=True)
    listing = recovery_actions.add_parser("list", parents=[where], help="list jobs")
    listing.add_argument("--state", choices=[*STATE_FILTERS], default="active",
                         help="active (queued and running, the default), queued, running, "
                              "dead, done, resolved")
    listing.add_argument("--limit", type=int, default=100)

    dlq = commands.add_parser("dlq", parents=[where], help="the recovery queue's dead letters")
    actions = dlq.add_subparsers(dest="action", required=True)
    actions.add_parser("list", parents=[where], help="list dead letters")
    requeue = actions.add_parser("requeue", parents=[where],
                                 help="give an order a fresh set of re-checks")
    requeue.add_argument("order_id")
    resolve = actions.add_parser("resolve", parents=[where],
                                 help="settle a dead order by hand (refunded...), with a "
                                      "reason kept on record")
    resolve.add_argument("order_id")
    resolve.add_argument("reason")

    from .testing.__main__ import add_arguments

    add_arguments(commands.add_parser("simulate", help="serve the FoxReload simulator over HTTP"))
    return parser


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None) -> int:
    """Run the command; return the exit status."""
    out = out or sys.stdout
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args, out)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except UsageError as exc:
        print(f"foxpoll: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (FoxPollError, ValueError, KeyError, OSError) as exc:
        if args.debug:
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"foxpoll: error: {type(exc).__name__}: {message}", file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace, out: TextIO) -> int:
    if args.command == "demo":
        from ._demo import run_demo

        live = not args.plain and out.isatty()
        tallies = run_demo(virtual=args.virtual, live=live, out=out, db=args.db)
        ok = tallies["delivered"] == 4 and tallies["redelivered"] == 0
        return 0 if ok and tallies["dead_letters"] == 0 else 1
    if args.command == "simulate":
        from .testing.__main__ import serve

        serve(args)
        return 0
    if args.command == "orders":
        return _orders(args, out)
    if args.command == "catalog":
        return _catalog(args, out)
    if args.command == "recovery":
        return _recovery(args, out)
    return _dlq(args, out)


def _orders(args: argparse.Namespace, out: TextIO) -> int:
    from ._client import FoxReload
    from .polling import Listener

    budget = _rate_limit(args)
    with contextlib.ExitStack() as owned:
        if budget is not None:
            owned.callback(budget.close)  # the budget is the command's own: it closes it
        client = owned.enter_context(FoxReload(rate_limit=budget))
        if args.action == "create":
            note = dict(_pair(n) for n in args.note) or None
            items = [_item(spec, note) for spec in args.item]
            order = client.orders.create(items=items, is_mock=args.mock)
        elif args.action == "get":
            order = client.orders.get(args.order_id)
        elif args.action == "pay":
            order = client.orders.pay(args.order_id, payment_provider=args.provider)
        else:
            class Progress(Listener):
                """Prints each poll of the wait."""

                def on_poll(self, attempt: Any) -> None:
                    status = attempt.order.status.value if attempt.order else attempt.outcome
                    print(f"  poll {attempt.attempt}: {status} ({attempt.elapsed:.0f}s)",
                          file=sys.stderr)
                    if attempt.attempt == 1 and status == "active":
                        print(f"  order {args.order_id} is not paid yet: it will stay active "
                              f"(foxpoll orders pay {args.order_id})", file=sys.stderr)

            try:
                order = client.wait_for_completion(args.order_id, timeout=args.timeout,
                                                   listener=Progress(), raise_on_failure=False)
            except OrderStalled as stalled:
                print(f"foxpoll: the wait stalled: {stalled}", file=sys.stderr)
                return EXIT_STALLED
    _print_order(order, out, as_json=args.json, show_codes=args.show_codes)
    return EXIT_FAILED if order.status.value in ("failed", "cancelled") else 0


CATALOG_PAGE = 200  # the API's largest page


def _catalog(args: argparse.Namespace, out: TextIO) -> int:
    from ._client import FoxReload

    in_stock = args.in_stock or None
    with FoxReload() as client:
        if args.category is None:
            for category in client.categories.list(with_stock_only=in_stock).items:
                print(f"{category.id}  {category.name}", file=out)
            print("products: foxpoll catalog --category ID", file=out)
            return 0
        offset = 0
        while True:  # every page: a category rarely holds more than a few
            page = client.products.list(category=args.category, limit=CATALOG_PAGE,
                                        offset=offset, with_stock_only=in_stock)
            for product in page.items:
                price = f"{product.price} {product.currency or ''}".strip()
                print(f"{product.id}  {product.name}  {price}  stock={product.quantity}",
                      file=out)
            offset += len(page.items)
            if len(page.items) < CATALOG_PAGE:
                break
    if not offset:
        print(f"foxpoll: no products in category {args.category!r}"
              f"{' in stock' if in_stock else ''} (foxpoll catalog lists the categories)",
              file=sys.stderr)
    return 0


def _rate_limit(args: argparse.Namespace) -> Any:
    from .ratelimit import RateLimit, RedisRateLimit, SQLiteRateLimit

    spec = getattr(args, "rate_limit", None)
    store = getattr(args, "rate_limit_store", None)
    if spec is None:
        if store is not None:
            raise ValueError("--rate-limit-store needs --rate-limit")
        return None
    if store is None:  # the variable is the fleet's setting; only a budget asks for it
        store = os.environ.get(RATE_LIMIT_STORE_ENV) or None
    if spec == "auto":
        per_minute = None
    else:
        try:
            per_minute = float(spec)
        except ValueError:
            raise ValueError(f"--rate-limit {spec!r}: requests a minute, or auto") from None
    if store is None:
        return RateLimit(per_minute)
    if store.startswith("sqlite:///"):
        return SQLiteRateLimit(store[len("sqlite:///"):], per_minute)
    if store.startswith(("redis://", "rediss://", "unix://")):
        return RedisRateLimit(store, per_minute)
    raise ValueError(f"rate-limit store {_shown(store)!r}: use sqlite:///PATH or redis://...")


def _item(spec: str, note: dict[str, str] | None) -> dict[str, Any]:
    item_id, _, quantity = spec.partition(":")
    if not item_id:
        raise ValueError(f"--item {spec!r}: expected ID or ID:QUANTITY")
    try:
        count = int(quantity) if quantity else 1
    except ValueError:
        raise ValueError(f"--item {spec!r}: the quantity must be a whole number") from None
    return {"itemId": item_id, "quantity": count, "note": note}


def _pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--note {text!r}: expected KEY=VALUE")
    return key, value


def _print_order(order: Any, out: TextIO, *, as_json: bool, show_codes: bool) -> None:
    if as_json:
        data = dict(order.raw)
        if not show_codes:  # codes and notes (player ids, phone numbers) are secrets
            data["items"] = [
                {**i, **{key: "<redacted: --show-codes>" for key in ("externalData", "note")
                         if i.get(key)}}
                for i in data.get("items", []) if isinstance(i, dict)]
        print(json.dumps(data, indent=2, default=str), file=out)
        return
    print(f"order {order.id}: {order.status}", file=out)
    if order.cancel_reason:
        print(f"  cancelled: {order.cancel_reason}", file=out)
    if order.total_price is not None:
        print(f"  total: {order.total_price} {order.currency or ''}".rstrip(), file=out)
    for item in order.items:
        line = f"  {item.quantity} x {item.item_id}"
        if item.error:
            line += f" (error: {item.error})"
        print(line, file=out)
        for code in item.codes:
            shown = json.dumps(code) if show_codes else "<redacted: --show-codes>"
            print(f"    code: {shown}", file=out)


# What ``recovery list --state`` shows: the stored states it reads, and whether a job must
# be running (leased), not running, or either.
STATE_FILTERS: dict[str, tuple[tuple[str, ...], bool | None]] = {
    "active": (("queued",), None),
    "queued": (("queued",), False),
    "running": (("queued",), True),
    "dead": (("dead",), None),
    "done": (("done",), None),
    "resolved": (("resolved",), None),
}


#: What a queued job's reason means, for the reader of ``recovery list``.
REASONS = {
    "watch": "a paid order a wait is on; due once that wait would have given up, so it "
             "fires only if the process died",
    "delivery": "a wait saw it completed; when due, a RecoveryWorker confirms the delivery "
                "in the dedup store (no API request), or delivers it",
}


def _recovery(args: argparse.Namespace, out: TextIO) -> int:
    import time

    from .recovery.base import JobState

    states, running = STATE_FILTERS[args.state]
    queue = _queue(args)
    try:
        now = time.time()
        shown, reasons = 0, set[str]()
        for state in states:
            for job in queue.jobs(JobState(state), limit=args.limit):
                if running is not None and job.running(now) != running:
                    continue
                label = "running" if job.running(now) else job.state.value
                due = f"due_in={job.due_at - now:.0f}s  " if label == "queued" else ""
                print(f"{job.order_id}  {label}  reason={job.reason or '-'}  "
                      f"attempts={job.attempts}  {due}last_status={job.last_status or '-'}"
                      f"  last_error={job.last_error or '-'}", file=out)
                shown += 1
                reasons.add(job.reason or "")
        print(f"{shown} job(s) {args.state}", file=out)
        for reason in sorted(reasons & REASONS.keys()):
            print(f"reason={reason}: {REASONS[reason]}", file=sys.stderr)
    finally:
        queue.close()
    return 0


def _dlq(args: argparse.Namespace, out: TextIO) -> int:
    queue = _queue(args)
    try:
        if args.action == "list":
            jobs = queue.list_dead()
            for job in jobs:
                print(f"{job.order_id}  attempts={job.attempts}  last_status={job.last_status}"
                      f"  last_error={job.last_error or '-'}", file=out)
            print(f"{len(jobs)} dead letter(s)", file=out)
        elif args.action == "requeue":
            queue.requeue(args.order_id)
            print(f"{args.order_id}: requeued", file=out)
        else:
            queue.resolve(args.order_id, args.reason)
            print(f"{args.order_id}: resolved ({args.reason})", file=out)
    except KeyError:
        if args.debug:
            raise
        print(f"foxpoll: error: no order {args.order_id} in the queue", file=sys.stderr)
        return 1
    finally:
        queue.close()
    return 0


DEFAULT_TABLE = "foxpoll_recovery"
# A libpq keyword string ("host=db dbname=shop"), which the PostgreSQL queues accept too.
_KEYWORDS = re.compile(r"\s*[A-Za-z_]+\s*=")


def _queue(args: argparse.Namespace) -> Any:
    """The queue the command names: ``--queue``, else ``$FOXPOLL_QUEUE``; never a guess."""
    location = getattr(args, "queue", None) or os.environ.get(QUEUE_ENV)
    if not location:
        raise UsageError(f"which recovery queue? Give --queue sqlite:///PATH or "
                         f"postgresql://..., or set {QUEUE_ENV}")
    table = getattr(args, "table", DEFAULT_TABLE)
    if location.startswith("sqlite:///"):
        from .recovery.sqlite import SQLiteRecoveryQueue

        path = Path(location[len("sqlite:///"):])
        if not path.is_file():  # opening it would make a new, empty queue
            raise ValueError(f"no queue at {location}: the file does not exist")
        return SQLiteRecoveryQueue(path, table=table)
    if location.startswith(("postgresql://", "postgres://")) or _KEYWORDS.match(location):
        from .recovery.postgres import PostgresRecoveryQueue

        return PostgresRecoveryQueue(location, table=table)
    raise ValueError(f"queue {_shown(location)!r}: use sqlite:///PATH, postgresql://... or "
                     "a libpq keyword string (host=... dbname=...)")


def _shown(location: str) -> str:
    """``location`` without its password, for an error message."""
    scheme, sep, rest = location.partition("://")
    if sep and "@" in rest:
        credentials, _, host = rest.rpartition("@")
        return f"{scheme}://{credentials.partition(':')[0]}:***@{host}"
    return "<connection string>" if "password" in location.lower() else location


if __name__ == "__main__":
    raise SystemExit(main())
