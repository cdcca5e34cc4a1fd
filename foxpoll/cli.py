"""The ``foxpoll`` command.

::

    foxpoll demo                          the whole job against the simulator, no key needed
    foxpoll orders get|pay|wait ORDER_ID  the real API (FOXRELOAD_API_KEY, FOXRELOAD_BASE_URL)
    foxpoll orders create --item ID[:QTY] [--note KEY=VALUE] [--mock]
    foxpoll buy --item ID[:QTY] [--note KEY=VALUE] [--mock]   create, pay, wait, print codes
        [--rate-limit PER_MINUTE|auto [--rate-limit-store PATH|sqlite:///PATH|redis://...]
         [--rate-limit-table NAME] [--rate-limit-key NAME] | [--rate-limit-key-prefix PREFIX]]
    foxpoll catalog [--category ID]       the categories, or a category's products
    foxpoll recovery list [--state S]     the recovery queue: queued, running, dead...
    foxpoll dlq list|requeue|resolve      the recovery queue's dead letters
        --queue PATH|sqlite:///PATH|postgresql://...|"host=... dbname=..." [--table NAME]
    foxpoll simulate --port 8080          serve the simulator over HTTP
    foxpoll --version

The queue's location comes from ``--queue`` or else ``FOXPOLL_QUEUE`` (its table from
``--table`` or ``FOXPOLL_QUEUE_TABLE``), and the shared budget's from
``--rate-limit-store`` or else ``FOXPOLL_RATE_LIMIT_STORE`` (its SQLite table from
``--rate-limit-table`` or ``FOXPOLL_RATE_LIMIT_TABLE`` and its row from
``--rate-limit-key`` or ``FOXPOLL_RATE_LIMIT_KEY``, its Redis key prefix from
``--rate-limit-key-prefix`` or ``FOXPOLL_RATE_LIMIT_KEY_PREFIX``): a flag wins over its
variable. A SQLite file is named by its path or a ``sqlite:///PATH`` URL (as the SQLite
classes take it); a location without a scheme that holds no ``=`` (which a libpq keyword
string does) is a path. With no queue, a queue command stops (exit 2) rather than guess; a
queue command only reads what exists, and never creates a database file or a table.

Errors print one line and exit non-zero; ``--debug`` shows the traceback instead. Exit
codes: 0 done, 1 an error, 2 a usage error, 3 the order failed or was cancelled, 4 the
wait stalled (the order may still complete), 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
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
QUEUE_TABLE_ENV = "FOXPOLL_QUEUE_TABLE"
RATE_LIMIT_STORE_ENV = "FOXPOLL_RATE_LIMIT_STORE"
RATE_LIMIT_TABLE_ENV = "FOXPOLL_RATE_LIMIT_TABLE"
RATE_LIMIT_KEY_PREFIX_ENV = "FOXPOLL_RATE_LIMIT_KEY_PREFIX"
RATE_LIMIT_KEY_ENV = "FOXPOLL_RATE_LIMIT_KEY"


class UsageError(Exception):
    """A command that cannot run as given: said in one line, exit status 2."""


class CommandError(Exception):
    """A command that ran and failed for a reason its message says in full (a missing
    file, table or order): one line, exit status 1."""


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
    budget.add_argument("--rate-limit-store", metavar="LOCATION", default=argparse.SUPPRESS,
                        help="share the budget with your other processes: a SQLite file, "
                             "PATH or sqlite:///PATH (one host), or redis://... (a fleet); "
                             "default "
                             f"${RATE_LIMIT_STORE_ENV}")
    budget.add_argument("--rate-limit-table", metavar="NAME", default=argparse.SUPPRESS,
                        help="the SQLite budget's table, as its table= (default "
                             f"foxpoll_rate_limit); default ${RATE_LIMIT_TABLE_ENV}")
    budget.add_argument("--rate-limit-key", metavar="NAME", default=argparse.SUPPRESS,
                        help="the SQLite budget's row, as its key= (one per API key sharing "
                             f"a table; default default); default ${RATE_LIMIT_KEY_ENV}")
    budget.add_argument("--rate-limit-key-prefix", metavar="PREFIX",
                        default=argparse.SUPPRESS,
                        help="the Redis budget's key prefix, as its key_prefix= (default "
                             f"foxpoll:); default ${RATE_LIMIT_KEY_PREFIX_ENV}")
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

    buying = commands.add_parser(
        "buy", parents=[budget], help="buy on the real API: create, pay, wait, show the order",
        description="Buy on the real API (FOXRELOAD_API_KEY, FOXRELOAD_BASE_URL): create "
                    "an order, pay it from the balance, wait for it with a line per poll, "
                    "and print it once completed (FoxReload.buy, delivering to this "
                    "terminal). No recovery queue watches it: if the wait stalls, the "
                    "order may still complete (foxpoll orders wait ID). A command killed "
                    "after paying leaves the order to you.",
        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    buying.add_argument("--item", action="append", required=True, metavar="ID[:QTY]",
                        help="a product id (foxpoll catalog --category ID lists them) and "
                             "its quantity, 1 when omitted; repeat for more items (1-10)")
    buying.add_argument("--note", action="append", default=[], metavar="KEY=VALUE",
                        help="product note fields (for every item)")
    buying.add_argument("--mock", action="store_true", help="a test order")
    buying.add_argument("--timeout", type=float, help="seconds to wait at most")
    buying.add_argument("--show-codes", action="store_true", help="print delivered codes")
    buying.add_argument("--json", action="store_true", help="print the order as JSON")

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
                       help="an existing SQLite file, PATH or sqlite:///PATH, or a "
                            "postgresql:// URL or "
                            "libpq keyword string (the PostgreSQL and procrastinate "
                            f"queues); default ${QUEUE_ENV}, else an error")
    where.add_argument("--table", metavar="NAME", default=argparse.SUPPRESS,
                       help="the queue's table, schema-qualified if need be "
                            f"(billing.foxpoll_recovery); default ${QUEUE_TABLE_ENV}, "
                            "else foxpoll_recovery")
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
        print(f"foxpoll: error: {_said(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except CommandError as exc:
        if args.debug:
            raise
        print(f"foxpoll: error: {_said(exc)}", file=sys.stderr)
        return 1
    except (FoxPollError, ValueError, KeyError, OSError, ImportError) as exc:
        if args.debug:
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"foxpoll: error: {type(exc).__name__}: {_said(message)}", file=sys.stderr)
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
    if args.command == "buy":
        return _buy(args, out)
    if args.command == "catalog":
        return _catalog(args, out)
    if args.command == "recovery":
        return _recovery(args, out)
    return _dlq(args, out)


def _progress(*, unpaid_hint: bool) -> Any:
    """The listener that prints each poll of a wait on stderr (the live status line of
    ``orders wait`` and ``buy``); with ``unpaid_hint``, it says so when the first poll
    finds the order still unpaid."""
    from .polling import Listener, PollAttempt

    class Progress(Listener):
        def on_poll(self, attempt: PollAttempt) -> None:
            status = attempt.order.status.value if attempt.order else attempt.outcome
            print(f"  poll {attempt.attempt}: {_plain(status)} ({attempt.elapsed:.0f}s)",
                  file=sys.stderr)
            if unpaid_hint and attempt.attempt == 1 and status == "active":
                order_id = _plain(attempt.order_id)
                print(f"  order {order_id} is not paid yet: it will stay active "
                      f"(foxpoll orders pay {order_id})", file=sys.stderr)

    return Progress()


def _orders(args: argparse.Namespace, out: TextIO) -> int:
    from ._client import FoxReload

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
            try:
                order = client.wait_for_completion(args.order_id, timeout=args.timeout,
                                                   listener=_progress(unpaid_hint=True),
                                                   raise_on_failure=False)
            except OrderStalled as stalled:
                print(f"foxpoll: the wait stalled: {_said(stalled)}", file=sys.stderr)
                return EXIT_STALLED
    _print_order(order, out, as_json=args.json, show_codes=args.show_codes)
    return EXIT_FAILED if order.status.value in ("failed", "cancelled") else 0


def _buy(args: argparse.Namespace, out: TextIO) -> int:
    """``foxpoll buy``: ``FoxReload.buy``, whose delivery prints the order, once (a dedup
    store in memory: this process is the only one delivering it)."""
    from ._buy import PurchaseOutcome
    from ._client import FoxReload
    from .dedup.memory import MemoryDedupStore

    note = dict(_pair(n) for n in args.note) or None
    items = [_item(spec, note) for spec in args.item]
    budget = _rate_limit(args)
    with contextlib.ExitStack() as owned:
        if budget is not None:
            owned.callback(budget.close)
        client = owned.enter_context(FoxReload(rate_limit=budget))
        purchase = client.buy(
            items, is_mock=args.mock, timeout=args.timeout, listener=_progress(unpaid_hint=False),
            store=MemoryDedupStore(),
            deliver=functools.partial(_print_order, out=out, as_json=args.json,
                                      show_codes=args.show_codes))
    if purchase.possible_orphans:
        print("foxpoll: a create's outcome was unknown, so foxpoll created a new order: "
              "if the first made an order, it was never paid and expires unpaid",
              file=sys.stderr)
    if purchase.outcome is PurchaseOutcome.STALLED:
        order_id = _plain(purchase.order_id)
        print(f"foxpoll: the wait stalled: {_said(purchase.reason)}. Order {order_id} may "
              f"still complete: foxpoll orders wait {order_id}", file=sys.stderr)
        return EXIT_STALLED
    if not purchase.ok:  # failed or cancelled: shown, as orders wait shows it
        _print_order(purchase.order, out, as_json=args.json, show_codes=args.show_codes)
        return EXIT_FAILED
    return 0


CATALOG_PAGE = 200  # the API's largest page


def _catalog(args: argparse.Namespace, out: TextIO) -> int:
    from ._client import FoxReload

    in_stock = args.in_stock or None
    with FoxReload() as client:
        if args.category is None:
            for category in client.categories.list(with_stock_only=in_stock).items:
                print(f"{_plain(category.id)}  {_plain(category.name)}", file=out)
            print("products: foxpoll catalog --category ID", file=out)
            return 0
        offset = 0
        while True:  # every page: a category rarely holds more than a few
            page = client.products.list(category=args.category, limit=CATALOG_PAGE,
                                        offset=offset, with_stock_only=in_stock)
            for product in page.items:
                price = _plain(f"{product.price} {product.currency or ''}".strip())
                print(f"{_plain(product.id)}  {_plain(product.name)}  {price}  "
                      f"stock={product.quantity}", file=out)
            offset += len(page.items)
            if len(page.items) < CATALOG_PAGE:
                break
    if not offset:
        print(f"foxpoll: no products in category {args.category!r}"
              f"{' in stock' if in_stock else ''} (foxpoll catalog lists the categories)",
              file=sys.stderr)
    return 0


def _setting(args: argparse.Namespace, flag: str, variable: str | None = None
             ) -> tuple[str | None, str]:
    """The value of ``--flag``, else of ``$variable``, and which of the two gave it."""
    value = getattr(args, flag[2:].replace("-", "_"), None)
    if value is not None or variable is None:
        return value, flag
    return os.environ.get(variable) or None, f"${variable}"


def _rate_limit(args: argparse.Namespace) -> Any:
    from .ratelimit import RateLimit, RedisRateLimit, SQLiteRateLimit

    spec = getattr(args, "rate_limit", None)
    if spec is None:
        for flag in ("--rate-limit-store", "--rate-limit-table", "--rate-limit-key",
                     "--rate-limit-key-prefix"):
            if _setting(args, flag)[0] is not None:
                raise UsageError(f"{flag} needs --rate-limit")
        return None  # the variables are the fleet's settings; only a budget asks for them
    if spec == "auto":
        per_minute = None
    else:
        try:
            per_minute = float(spec)
        except ValueError:
            raise ValueError(f"--rate-limit {spec!r}: requests a minute, or auto") from None
    store, _ = _setting(args, "--rate-limit-store", RATE_LIMIT_STORE_ENV)
    table, table_from = _setting(args, "--rate-limit-table", RATE_LIMIT_TABLE_ENV)
    row, row_from = _setting(args, "--rate-limit-key", RATE_LIMIT_KEY_ENV)
    prefix, prefix_from = _setting(args, "--rate-limit-key-prefix", RATE_LIMIT_KEY_PREFIX_ENV)
    if store is None:
        kind = "in-process"
    elif _is_sqlite(store):
        kind = "SQLite"
    elif store.startswith(("redis://", "rediss://", "unix://")):
        kind = "Redis"
    else:
        raise ValueError(f"rate-limit store {_shown(store)!r}: use a file's PATH, "
                         "sqlite:///PATH or redis://...")
    # A name meant for another kind of budget would share nothing with the budget the
    # partner meant: refused, never dropped.
    if table is not None and kind != "SQLite":
        raise UsageError(f"{table_from} names a SQLite budget's table, but the budget is "
                         f"{kind}" + (" (a Redis budget takes --rate-limit-key-prefix)"
                                      if kind == "Redis" else
                                      ": give --rate-limit-store sqlite:///PATH"))
    if row is not None and kind != "SQLite":
        raise UsageError(f"{row_from} names a SQLite budget's row, but the budget is "
                         f"{kind}" + (" (a Redis budget takes --rate-limit-key-prefix)"
                                      if kind == "Redis" else
                                      ": give --rate-limit-store sqlite:///PATH"))
    if prefix is not None and kind != "Redis":
        raise UsageError(f"{prefix_from} names a Redis budget's key prefix, but the budget "
                         f"is {kind}" + (" (a SQLite budget takes --rate-limit-table)"
                                         if kind == "SQLite" else
                                         ": give --rate-limit-store redis://..."))
    if store is None:
        return RateLimit(per_minute)
    if kind == "SQLite":  # a path or a sqlite:/// URL, which SQLiteRateLimit reads itself
        return SQLiteRateLimit(
            store, per_minute,
            table="foxpoll_rate_limit" if table is None else _table(table, table_from),
            key="default" if row is None else row)
    _check_redis_url(store)
    if prefix is None:
        return RedisRateLimit(store, per_minute)
    return RedisRateLimit(store, per_minute, key_prefix=prefix)


def _check_redis_url(location: str) -> None:
    """Refuse a Redis URL redis-py cannot read, in words of our own: redis-py's quote
    part of it (a password holding a ``/`` becomes the "port" it names)."""
    import redis

    try:
        redis.ConnectionPool.from_url(location).disconnect()
    except ValueError:
        # No @ in the words: the masking of what is printed runs to the line's last one.
        raise ValueError(f"rate-limit store {_shown(location)!r}: not a Redis URL redis-py "
                         "can read (redis://HOST[:PORT][/DB], a user name and password "
                         "before the host, percent-encoded)") from None


# A location's scheme: what a URL starts with, and a path never does.
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def _is_sqlite(location: str) -> bool:
    """Whether ``location`` names a SQLite file: a ``sqlite:`` URL (checked when opened),
    or a path: something without a scheme, and without the ``=`` of a libpq keyword
    string (``host=db dbname=shop``)."""
    return location.startswith("sqlite:") or (
        bool(location.strip()) and not _SCHEME.match(location) and "=" not in location)


def _table(text: str, given_by: str) -> str:
    """``text``, a table name checked as the stores check it: a bad one is a usage error."""
    from .dedup._sql import TableName

    try:
        TableName.parse(text)
    except ValueError as exc:
        raise UsageError(f"{given_by}: {exc}") from None
    return text


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
        print(_json(data, indent=2), file=out)
        return
    print(f"order {_plain(order.id)}: {_plain(order.status)}", file=out)
    if order.cancel_reason:
        print(f"  cancelled: {_plain(order.cancel_reason)}", file=out)
    if order.total_price is not None:
        print(f"  total: {order.total_price} {_plain(order.currency or '')}".rstrip(),
              file=out)
    for item in order.items:
        line = f"  {item.quantity} x {_plain(item.item_id)}"
        if item.error:
            line += f" (error: {_plain(item.error)})"
        print(line, file=out)
        for code in item.codes:
            shown = _json(code) if show_codes else "<redacted: --show-codes>"
            print(f"    code: {shown}", file=out)


def _json(data: Any, indent: int | None = None) -> str:
    """``data`` as JSON with every control character escaped: json.dumps leaves DEL."""
    return json.dumps(data, indent=indent, default=str).replace("\x7f", "\\u007f")


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
    "watch": "a paid order a process is waiting on; due one watch_lease after that process "
             "last renewed it, so it fires only if the process died or gave up on it",
    "delivery": "a wait saw it completed; when due, a RecoveryWorker confirms the delivery "
                "in the dedup store (no API request), or delivers it",
}


def _recovery(args: argparse.Namespace, out: TextIO) -> int:
    import time

    from .recovery.base import JobState

    states, running = STATE_FILTERS[args.state]
    queue = _queue(args, read_only=True)
    try:
        now = time.time()
        shown, reasons, unreadable = 0, set[str](), dict[str, str]()
        for state in states:
            read = functools.partial(queue.jobs, JobState(state), limit=args.limit)
            for job in _readable(read, unreadable):
                if running is not None and job.running(now) != running:
                    continue
                label = "running" if job.running(now) else job.state.value
                due = f"due_in={job.due_at - now:.0f}s  " if label == "queued" else ""
                print(f"{_plain(job.order_id)}  {label}  reason={_plain(job.reason or '-')}"
                      f"  attempts={job.attempts}  {due}"
                      f"last_status={_plain(job.last_status or '-')}"
                      f"  last_error={_plain(job.last_error or '-')}", file=out)
                shown += 1
                reasons.add(job.reason or "")
        print(f"{shown} job(s) {args.state}" + _and_unreadable(unreadable), file=out)
        for reason in sorted(reasons & REASONS.keys()):
            print(f"reason={reason}: {REASONS[reason]}", file=sys.stderr)
    finally:
        queue.close()
    return _say_unreadable(unreadable)


def _readable(read: Callable[[], list[Any]], unreadable: dict[str, str]) -> list[Any]:
    """The jobs ``read()`` returns; the rows it could not read go into ``unreadable``
    (order id: what is wrong), and the ones it could are still returned."""
    from .recovery.base import UnreadableJobs

    try:
        return read()
    except UnreadableJobs as exc:
        unreadable.update(exc.unreadable)
        return exc.jobs


def _and_unreadable(unreadable: dict[str, str]) -> str:
    return f", {len(unreadable)} unreadable" if unreadable else ""


def _say_unreadable(unreadable: dict[str, str]) -> int:
    """Name each unreadable row on stderr; the exit status: 1 if there was one."""
    for order_id, what in unreadable.items():
        print(f"foxpoll: error: order {_plain(order_id)}: unreadable row ({_plain(what)})",
              file=sys.stderr)
    return 1 if unreadable else 0


# What each dead-letter action accepts a job in, and what it says of one in another state.
_ACTIONS = {"requeue": (("dead", "resolved"), "only a dead or resolved order is requeued"),
            "resolve": (("dead",), "only a dead letter is resolved")}


def _dlq(args: argparse.Namespace, out: TextIO) -> int:
    import time

    queue = _queue(args, read_only=args.action == "list")
    try:
        if args.action == "list":
            unreadable: dict[str, str] = {}
            jobs = _readable(queue.list_dead, unreadable)
            for job in jobs:
                print(f"{_plain(job.order_id)}  attempts={job.attempts}  "
                      f"last_status={_plain(job.last_status)}  "
                      f"last_error={_plain(job.last_error or '-')}", file=out)
            print(f"{len(jobs)} dead letter(s)" + _and_unreadable(unreadable), file=out)
            return _say_unreadable(unreadable)
        # Checked first so that each refusal says why; the action itself checks again,
        # atomically, against a worker or operator acting at the same moment.
        job = queue.get(args.order_id)
        if job is None:
            raise CommandError(f"no order {args.order_id} in the queue")
        states, rule = _ACTIONS[args.action]
        if job.state.value not in states:
            label = "running" if job.running(time.time()) else job.state.value
            raise CommandError(f"order {args.order_id} is {label}, not dead: {rule}")
        if args.action == "requeue":
            queue.requeue(args.order_id)
            print(f"{args.order_id}: requeued", file=out)
        else:
            queue.resolve(args.order_id, args.reason)
            print(f"{args.order_id}: resolved ({args.reason})", file=out)
    finally:
        queue.close()
    return 0


DEFAULT_TABLE = "foxpoll_recovery"
# A libpq keyword string ("host=db dbname=shop"), which the PostgreSQL queues accept too.
_KEYWORDS = re.compile(r"\s*[A-Za-z_]+\s*=")
# The columns that make a table a recovery queue's: a table without them is another one.
_QUEUE_COLUMNS = ("order_id", "state", "attempts", "due_at")
_CONNECT_TIMEOUT = 5  # seconds, for the check that the queue's table exists


def _queue(args: argparse.Namespace, *, read_only: bool) -> Any:
    """The queue the command names: ``--queue``, else ``$FOXPOLL_QUEUE``; never a guess,
    and never a new database or table (what a typo would otherwise open). Its schema is
    used as it is, never changed; ``read_only``, a SQLite file is opened read-only."""
    location, _ = _setting(args, "--queue", QUEUE_ENV)
    if not location:
        raise UsageError(f"which recovery queue? Give --queue PATH, sqlite:///PATH or "
                         f"postgresql://..., or set {QUEUE_ENV}")
    table, table_from = _setting(args, "--table", QUEUE_TABLE_ENV)
    table = _table(table or DEFAULT_TABLE, table_from)
    if _is_sqlite(location):
        return _sqlite_queue(location, table, read_only=read_only)
    if location.startswith(("postgresql://", "postgres://")) or _KEYWORDS.match(location):
        return _postgres_queue(location, table)
    raise ValueError(f"queue {_shown(location)!r}: use a SQLite file's PATH, sqlite:///PATH, "
                     "postgresql://... or a libpq keyword string (host=... dbname=...)")


def _sqlite_queue(location: str, table: str, *, read_only: bool) -> Any:
    import sqlite3

    from .dedup._sql import TableName
    from .dedup._sqlite import sqlite_path
    from .errors import StoreUnavailable
    from .recovery.sqlite import SQLiteRecoveryQueue

    path = Path(sqlite_path(location))
    if path.is_dir():
        raise CommandError(f"{location} is a directory, not a SQLite database")
    if not path.is_file():  # opening it would make a new, empty queue
        raise CommandError(f"no queue at {location}: the file does not exist")
    name = TableName.parse(table)
    # Read-only, so that looking cannot create the table (the queue's constructor would).
    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro",
                                                uri=True, timeout=_CONNECT_TIMEOUT)) as db:
            schemas = {row[1] for row in db.execute("PRAGMA database_list")}
            columns = set() if (name.schema or "main") not in schemas else {
                row[0] for row in db.execute("SELECT name FROM pragma_table_info(?, ?)",
                                             (name.table, name.schema or "main"))}
    except sqlite3.DatabaseError as exc:
        # sqlite_errorname from Python 3.11; SQLite's own words before it.
        if getattr(exc, "sqlite_errorname", None) == "SQLITE_NOTADB" or (
                str(exc) == "file is not a database"):
            raise CommandError(f"{location} is not a SQLite database") from exc
        raise CommandError(f"cannot read {location}: {exc}") from exc
    _check_columns(columns, location, table)
    try:
        # No setup: looking must not switch the journal mode or add an index.
        return SQLiteRecoveryQueue(path, table=table, setup=False, read_only=read_only)
    except StoreUnavailable as exc:  # after the check, a file it may read but not write
        raise CommandError(f"cannot open the queue in {location}: "
                           f"{exc.__cause__ or exc}") from exc


def _postgres_queue(location: str, table: str) -> Any:
    from .recovery.postgres import PostgresRecoveryQueue  # says which extra is missing

    _check_columns(*_postgres_columns(location, table), table)
    return PostgresRecoveryQueue(location, table=table)


def _postgres_columns(location: str, table: str) -> tuple[set[str], str]:
    """The columns of ``table`` (none: no such table), and where it was looked for."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    from .dedup._sql import TableName

    try:
        params = conninfo_to_dict(location)
    except psycopg.Error:  # its message quotes the string, password and all
        raise CommandError(f"queue {_shown(location)!r}: not a valid PostgreSQL connection "
                           "string") from None
    where = (f"PostgreSQL at {params.get('host') or os.environ.get('PGHOST') or 'localhost'}"
             f":{params.get('port') or os.environ.get('PGPORT') or 5432}")
    database = (params.get("dbname") or os.environ.get("PGDATABASE") or params.get("user")
                or os.environ.get("PGUSER"))  # libpq's default database is the user's
    timeout = params.get("connect_timeout") or _CONNECT_TIMEOUT
    # A read-only look in the catalog: the queue's own first statement would fail on a
    # missing table only as an outage (StoreUnavailable), and name no table.
    try:
        with psycopg.connect(location, autocommit=True, connect_timeout=timeout) as conn:
            found = conn.execute(
                "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s) "
                "AND attnum > 0 AND NOT attisdropped", [TableName.parse(table).qualified]
            ).fetchall()
    except psycopg.OperationalError as exc:
        # libpq's own words, which never quote a password: what the server said (after
        # "FATAL:"), or why no server answered ("Connection refused", "timeout expired").
        first = (str(exc).strip().splitlines() or [""])[0]
        said = first.partition("FATAL:")[2].strip()
        if said:
            raise CommandError(f"{where} refused the connection: {said}") from exc
        reason = first.rpartition(": ")[2].strip()
        raise CommandError(f"{where} is unreachable" + (f": {reason}" if reason else "")
                           ) from exc
    except psycopg.Error as exc:
        raise CommandError(f"{where} could not look up table {table}: "
                           f"{type(exc).__name__}") from exc
    return {row[0] for row in found}, (f"database {database} on {where}" if database
                                       else where)


def _check_columns(columns: set[str], where: str, table: str) -> None:
    if not columns:
        raise CommandError(f"no table {table} in {where} (--table or {QUEUE_TABLE_ENV} names "
                           f"the queue's table; the default is {DEFAULT_TABLE})")
    missing = [name for name in _QUEUE_COLUMNS if name not in columns]
    if missing:
        raise CommandError(f"table {table} in {where} is not a recovery queue's (no column "
                           f"{missing[0]})")


# A URL's user info (redis://:secret@host, https://token@host): from the scheme up to the
# last @ on the line, since a password may hold a space, a slash or an @ that a driver
# would not have taken for its end; and what is left of one in a mistyped URL
# (redis:/user:secret@host): after a word and a colon, up to the last @.
_URL_USERINFO = re.compile(r"://([^\n]*)@")
_LOOSE_USERINFO = re.compile(r"([^\s:/@]*):(?!//)\S*@")
# A libpq keyword string's or a URL query's password.
_PASSWORD_FIELD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&;]*)",
                             re.IGNORECASE)


def _shown(location: str) -> str:
    """``location``, or any text quoting one, with every password and user-info token
    masked: for what the command prints."""
    masked = _URL_USERINFO.sub(_masked_userinfo, location)
    masked = _LOOSE_USERINFO.sub(r"\1:***@", masked)
    return _PASSWORD_FIELD.sub(r"\1***", masked)


def _masked_userinfo(found: re.Match[str]) -> str:
    user, colon, _ = found.group(1).partition(":")
    return f"://{user}:***@" if colon else "://***@"  # a lone name may be a token


# What a terminal acts on: CSI sequences (ESC [ or C1 CSI), strings up to their terminator
# or the end (OSC, DCS, SOS, PM, APC, by ESC or C1), two-character escapes; then any
# other C0 or C1 control or DEL left over.
_ESCAPE_SEQUENCES = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]?"
    r"|(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f]).*?(?:\x07|\x1b\\|\x9c|\Z)"
    r"|\x1b[ -/]*[0-~]?",
    re.DOTALL)
# The C0 and C1 controls and DEL; the bidirectional marks, embeddings, overrides and
# isolates, which reorder what follows them on screen (a code or an id shown backwards);
# the line and paragraph separators, which break a line as \n does.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069"
                       "\u2028\u2029]")
_BREAKS = "\n\t\u2028\u2029"


def _plain(value: object) -> str:
    """``value`` as text safe to print on one line of a terminal: without escape
    sequences, control characters or bidirectional overrides (a server's text could
    retitle the window, clear the screen or show itself reversed), each line break or
    tab a space."""
    text = _ESCAPE_SEQUENCES.sub("", str(value))
    return _CONTROLS.sub(lambda found: " " if found.group() in _BREAKS else "", text)


def _said(message: object) -> str:
    """An error's message as the command prints it: plain, passwords masked."""
    return _shown(_plain(message))


if __name__ == "__main__":
    raise SystemExit(main())
