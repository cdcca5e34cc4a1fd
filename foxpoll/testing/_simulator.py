"""``FakeFoxReload``: an in-memory FoxReload, on virtual time, with fault injection.

It answers :class:`httpx.Request` objects with :class:`httpx.Response` objects, so it plugs
into both clients as a transport (:meth:`FakeFoxReload.transport`) and sits behind a real
HTTP server (:mod:`foxpoll.testing._server`). Order statuses are computed from the clock on
every read, so they move forward as virtual time passes and never go back.
"""

from __future__ import annotations

import json
import random
import re
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any
from urllib.parse import unquote

import attrs
import httpx

from foxpoll._client import AsyncFoxReload, FoxReload
from foxpoll._clock import Clock

from ._clock import FakeClock
from ._scripts import Fault, FaultKind, OrderScript, Outcome

__all__ = ["FakeFoxReload", "RecordedRequest", "SimProduct"]

DEFAULT_API_KEY = "test-key"
DEFAULT_BASE_URL = "https://foxreload.test"


@attrs.frozen
class SimProduct:
    """A product in the simulated catalogue.

    Attributes:
        code_style: ``"string"`` delivers text codes; ``"object"`` delivers
            ``{"code": ..., "pin": ...}`` objects.
    """

    id: str
    name: str
    category: str
    price: Decimal
    stock: int = 1_000_000
    required_note_fields: tuple[str, ...] = ()
    code_style: str = "string"
    order_max_quantity: int = 10


DEFAULT_CATALOGUE = (
    SimProduct("product_steam_10", "Steam Gift Card $10", "steam", Decimal("10.50")),
    SimProduct("product_steam_50", "Steam Gift Card $50", "steam", Decimal("51.20")),
    SimProduct(
        "product_pubg_660", "PUBG Mobile 660 UC", "pubg", Decimal("9.99"),
        required_note_fields=("player_id",), code_style="object",
    ),
    SimProduct(
        "product_esim_eu_5gb", "eSIM Europe 5 GB", "esim", Decimal("7.00"), code_style="object"
    ),
)


@attrs.frozen
class RecordedRequest:
    """A request the simulator received, for assertions."""

    method: str
    path: str
    at: float
    headers: Mapping[str, str] = attrs.field(repr=False)
    json: Any = attrs.field(repr=False)


@attrs.define
class _SimOrder:
    id: str
    items: list[dict[str, Any]]
    total: Decimal
    is_mock: bool
    created_at: float
    script: OrderScript
    paid_at: float | None = None
    codes: list[list[Any]] = attrs.field(factory=list)


class _Reply(Exception):
    """Raised inside a handler to answer at once with an error status."""

    def __init__(self, status: int, detail: str, code: str | None = None) -> None:
        self.status, self.detail, self.code = status, detail, code


class FakeFoxReload:
    """A FoxReload API in memory.

    Args:
        api_key: The key requests must carry in ``X-API-Key`` (401 otherwise).
        clock: The time source; a :class:`FakeClock` for virtual time (the default).
        default_script: How orders behave unless told otherwise.
        products: The catalogue.
        balance: The account balance; paying from balance beyond it answers 402.
        rate_limit_per_minute: Requests allowed per minute and key; None for no limit.
        seed: Seeds order ids and codes, so runs are reproducible.
        record_requests: Keep every request in :attr:`requests` (turn off for long runs).
    """

    def __init__(
        self,
        *,
        api_key: str = DEFAULT_API_KEY,
        clock: Clock | None = None,
        default_script: OrderScript | None = None,
        products: Iterable[SimProduct] = DEFAULT_CATALOGUE,
        balance: Decimal | int | str = Decimal("100000"),
        rate_limit_per_minute: int | None = None,
        seed: int = 0,
        base_url: str = DEFAULT_BASE_URL,
        record_requests: bool = True,
    ) -> None:
        self.api_key = api_key
        self.clock: Clock = clock if clock is not None else FakeClock()
        self.default_script = default_script or OrderScript()
        self.products = {p.id: p for p in products}
        self.balance = Decimal(balance)
        self.rate_limit_per_minute = rate_limit_per_minute
        self.base_url = base_url
        self.requests: list[RecordedRequest] = []
        self.record_requests = record_requests
        self._rng = random.Random(seed)
        self._orders: dict[str, _SimOrder] = {}
        self._next_scripts: list[OrderScript] = []
        self._faults: list[list[Any]] = []  # [fault, remaining]
        self._window: tuple[int, int] = (-1, 0)  # (minute, requests in it)
        self._lock = threading.RLock()
        self._real_delay = threading.local()

    # -- configuring -----------------------------------------------------------------

    def script_next(self, *scripts: OrderScript) -> None:
        """Use these scripts, in order, for the next orders created."""
        with self._lock:
            self._next_scripts.extend(scripts)

    def script(self, order_id: str, script: OrderScript) -> None:
        """Change an existing order's script (for example, un-stall it)."""
        with self._lock:
            self._orders[order_id].script = script

    def settle(self, order_id: str, *, after: float = 0.0,
               outcome: Outcome = Outcome.COMPLETE) -> None:
        """Make a paid order (a stalled one, say) reach ``outcome`` ``after`` seconds from
        now, whatever the clock."""
        with self._lock:
            order = self._orders[order_id]
            if order.paid_at is None:
                raise ValueError(f"order {order_id} is not paid")
            since_payment = self.clock.monotonic() - order.paid_at
            paid_for = min(order.script.paid_for, since_payment)
            order.script = attrs.evolve(order.script, outcome=outcome, paid_for=paid_for,
                                        processing_for=since_payment - paid_for + after)

    def inject(self, *faults: Fault) -> None:
        """Apply these faults to the next matching requests, each ``fault.times`` times."""
        with self._lock:
            self._faults.extend([fault, fault.times] for fault in faults)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    # -- inspecting ------------------------------------------------------------------

    def count(self, method: str | None = None, path: str | None = None) -> int:
        """How many requests were received, optionally of one method and path glob."""
        probe = Fault(FaultKind.NOT_FOUND, method=method, path=path)
        return sum(probe.matches(r.method, r.path) for r in self.requests)

    def order_ids(self) -> list[str]:
        return list(self._orders)

    def status_of(self, order_id: str) -> str:
        with self._lock:
            return self._status(self._orders[order_id])[0]

    # -- plugging in -----------------------------------------------------------------

    def transport(self) -> SimTransport:
        """An httpx transport for :class:`httpx.Client` and :class:`httpx.AsyncClient`."""
        return SimTransport(self)

    def client(self, **kwargs: Any) -> FoxReload:
        """A :class:`foxpoll.FoxReload` wired to this simulator and its clock."""
        kwargs.setdefault("api_key", self.api_key)
        kwargs.setdefault("base_url", self.base_url)
        kwargs.setdefault("clock", self.clock)
        kwargs.setdefault("rng", random.Random(0))
        return FoxReload(http_client=httpx.Client(transport=self.transport()), **kwargs)

    def async_client(self, **kwargs: Any) -> AsyncFoxReload:
        """A :class:`foxpoll.AsyncFoxReload` wired to this simulator and its clock."""
        kwargs.setdefault("api_key", self.api_key)
        kwargs.setdefault("base_url", self.base_url)
        kwargs.setdefault("clock", self.clock)
        kwargs.setdefault("rng", random.Random(0))
        return AsyncFoxReload(http_client=httpx.AsyncClient(transport=self.transport()), **kwargs)

    # -- handling --------------------------------------------------------------------

    def handle(self, request: httpx.Request) -> httpx.Response:
        """Answer one request (or raise the transport error a fault calls for).

        On virtual time a slow answer moves the clock; on a real clock it really waits,
        outside the lock, so other requests are still served meanwhile.
        """
        self._real_delay.seconds = 0.0
        try:
            with self._lock:
                return self._handle_locked(request)
        finally:
            if self._real_delay.seconds:
                self.clock.sleep(self._real_delay.seconds)

    def _handle_locked(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        body = _json_body(request)
        if self.record_requests:
            self.requests.append(
                RecordedRequest(request.method, path, self.clock.monotonic(),
                                dict(request.headers), body)
            )
        fault = self._take_fault(request.method, path)
        if fault is not None and not fault.after_handling:
            early = self._apply_fault(fault, request)
            if early is not None:
                return early
        response = self._answer(request, path, body)
        if fault is not None and fault.after_handling:
            late = self._apply_fault(fault, request)
            if late is not None:
                return late
        return response

    def _take_fault(self, method: str, path: str) -> Fault | None:
        for entry in self._faults:
            fault, remaining = entry
            if remaining > 0 and fault.matches(method, path):
                entry[1] -= 1
                if entry[1] == 0:
                    self._faults.remove(entry)
                return fault  # type: ignore[no-any-return]
        return None

    def _apply_fault(self, fault: Fault, request: httpx.Request) -> httpx.Response | None:
        kind = fault.kind
        if kind is FaultKind.CONNECT_ERROR:
            raise httpx.ConnectError("simulated: connection refused", request=request)
        if kind is FaultKind.DISCONNECT:
            raise httpx.RemoteProtocolError(
                "simulated: server disconnected without sending a response", request=request
            )
        if kind in (FaultKind.TIMEOUT, FaultKind.SLOW):
            if not isinstance(self.clock, FakeClock):
                # Over real HTTP the client's own timeout fires while we wait.
                self._real_delay.seconds = fault.delay or 30.0
                return None
            read_timeout = request.extensions.get("timeout", {}).get("read")
            delay = fault.delay if fault.delay or kind is FaultKind.SLOW else float("inf")
            if read_timeout is not None and delay >= read_timeout:
                self.clock.advance(read_timeout)
                raise httpx.ReadTimeout("simulated: read timed out", request=request)
            self.clock.advance(0.0 if delay == float("inf") else delay)
            return None
        if kind is FaultKind.RATE_LIMIT:
            headers = {} if fault.retry_after is None else {"Retry-After": str(fault.retry_after)}
            return _error(429, "Too many requests", "RATE_LIMITED", headers)
        if kind is FaultKind.SERVER_ERROR:
            return httpx.Response(
                fault.status, text="<html><body>upstream error</body></html>",
                headers={"Content-Type": "text/html"},
            )
        if kind is FaultKind.NOT_FOUND:
            return _error(404, "Not found", "NOT_FOUND")
        return httpx.Response(  # MALFORMED_JSON
            200, content=b'{"id": "', headers={"Content-Type": "application/json"}
        )

    def _answer(self, request: httpx.Request, path: str, body: Any) -> httpx.Response:
        if request.headers.get("x-api-key") != self.api_key:
            return _error(401, "Invalid API key", "UNAUTHORIZED")
        if self._over_rate_limit():
            return _error(429, "Too many requests", "RATE_LIMITED", {"Retry-After": "60"})
        for method, pattern, handler in self._routes():
            if request.method == method and (match := pattern.fullmatch(path)):
                try:
                    status, payload = handler(request, body, *map(unquote, match.groups()))
                except _Reply as reply:
                    return _error(reply.status, reply.detail, reply.code)
                return httpx.Response(status, json=payload)
        return _error(404, "Not found", "NOT_FOUND")

    def _over_rate_limit(self) -> bool:
        if self.rate_limit_per_minute is None:
            return False
        minute = int(self.clock.monotonic() // 60)
        seen = self._window[1] + 1 if self._window[0] == minute else 1
        self._window = (minute, seen)
        return seen > self.rate_limit_per_minute

    def _routes(self) -> list[tuple[str, re.Pattern[str], Callable[..., tuple[int, Any]]]]:
        return [
            ("POST", re.compile(r"/api/orders/?"), self._create_order),
            ("GET", re.compile(r"/api/orders/?"), self._list_orders),
            ("POST", re.compile(r"/api/orders/([^/]+)/pay/?"), self._pay_order),
            ("GET", re.compile(r"/api/orders/([^/]+)/?"), self._get_order),
            ("GET", re.compile(r"/api/products/search/?"), self._search_products),
            ("GET", re.compile(r"/api/products/?"), self._list_products),
            ("GET", re.compile(r"/api/products/([^/]+)/?"), self._get_product),
            ("GET", re.compile(r"/api/categories/?"), self._list_categories),
        ]

    # -- orders ----------------------------------------------------------------------

    def _create_order(self, request: httpx.Request, body: Any) -> tuple[int, Any]:
        if not isinstance(body, dict) or not isinstance(body.get("items"), list):
            raise _Reply(400, "items is required")
        items = body["items"]
        if not 1 <= len(items) <= 10:
            raise _Reply(422, "an order has 1 to 10 items")
        total = Decimal(0)
        lines = []
        for item in items:
            product = self.products.get(str(item.get("itemId"))) if isinstance(item, dict) else None
            if product is None:
                raise _Reply(404, "Product not found", "NOT_FOUND")
            quantity = item.get("quantity", 1)
            if not isinstance(quantity, int) or not 1 <= quantity <= product.order_max_quantity:
                raise _Reply(422, "quantity out of range")
            note = item.get("note") or {}
            missing = [f for f in product.required_note_fields if f not in note]
            if missing:
                raise _Reply(422, f"note is missing {', '.join(missing)}")
            if product.stock < quantity:
                raise _Reply(409, "Out of stock", "OUT_OF_STOCK")
            total += product.price * quantity
            lines.append({"itemId": product.id, "quantity": quantity, "note": item.get("note")})
        expected = body.get("totalPrice")
        if expected is not None and Decimal(str(expected)) != total:
            raise _Reply(422, "Offer price changed", "OFFER_PRICE_NOT_MATCHED")
        for line in lines:
            self.products[line["itemId"]] = attrs.evolve(
                self.products[line["itemId"]],
                stock=self.products[line["itemId"]].stock - line["quantity"],
            )
        script = self._next_scripts.pop(0) if self._next_scripts else self.default_script
        order = _SimOrder(
            id=str(uuid.UUID(int=self._rng.getrandbits(128), version=4)),
            items=lines, total=total, is_mock=bool(body.get("isMock", False)),
            created_at=self.clock.monotonic(), script=script,
        )
        self._orders[order.id] = order
        return 201, self._render(order)

    def _find(self, order_id: str) -> _SimOrder:
        order = self._orders.get(order_id)
        if order is None or self.clock.monotonic() < order.created_at + order.script.visible_after:
            raise _Reply(404, "Order not found", "NOT_FOUND")
        return order

    def _get_order(self, request: httpx.Request, body: Any, order_id: str) -> tuple[int, Any]:
        return 200, self._render(self._find(order_id))

    def _list_orders(self, request: httpx.Request, body: Any) -> tuple[int, Any]:
        """The order history, newest first, optionally of one ``status``; offset-paged."""
        status = request.url.params.get("status")
        limit, offset = _int_param(request, "limit", 50), _int_param(request, "offset", 0)
        if limit < 1 or offset < 0:
            raise _Reply(422, "limit must be at least 1 and offset at least 0")
        now = self.clock.monotonic()
        # Orders are kept in creation order; only the page's rows are rendered, so a long
        # run's sweeps stay cheap.
        matching = [o for o in reversed(self._orders.values())
                    if now >= o.created_at + o.script.visible_after
                    and (status is None or self._status(o)[0] == status)]
        return 200, {"items": [self._render(o) for o in matching[offset : offset + limit]],
                     "limit": limit, "offset": offset, "total": len(matching)}

    def _pay_order(self, request: httpx.Request, body: Any, order_id: str) -> tuple[int, Any]:
        order = self._find(order_id)
        if self._status(order)[0] != "active":
            raise _Reply(409, "Order cannot be paid", "ORDER_PAYMENT_NOT_POSSIBLE")
        provider = body.get("paymentProvider") if isinstance(body, dict) else None
        if provider is None:
            if order.total > self.balance:
                raise _Reply(402, "Insufficient balance", "BALANCE_NOT_ENOUGH")
            self.balance -= order.total
            order.paid_at = self.clock.monotonic()
        return 200, self._render(order)

    def _status(self, order: _SimOrder) -> tuple[str, str | None]:
        now, script = self.clock.monotonic(), order.script
        if order.paid_at is None:
            if now >= order.created_at + script.payment_expires_after:
                return "cancelled", "payment_expiration"
            return "active", None
        since = now - order.paid_at
        if since < script.paid_for:
            return "paid", None
        if since < script.settles_after:
            return "processing", None
        if script.outcome is Outcome.COMPLETE:
            return "completed", None
        if script.outcome is Outcome.FAIL:
            return "failed", None
        return "cancelled", script.cancel_reason

    def _render(self, order: _SimOrder) -> dict[str, Any]:
        status, cancel_reason = self._status(order)
        if status == "completed" and not order.codes:
            order.codes = [self._make_codes(item) for item in order.items]
        coded = status == "completed" and order.paid_at is not None and (
            self.clock.monotonic() - order.paid_at
            >= order.script.settles_after + order.script.codes_after)
        items = []
        for index, item in enumerate(order.items):
            items.append({
                **item,
                "externalData": order.codes[index] if coded else None,
                "error": order.script.error if status == "failed" else None,
            })
        return {
            "id": order.id,
            "status": status,
            "items": items,
            "cancelReason": cancel_reason,
            "paymentExpiresAt": self._iso(order.created_at + order.script.payment_expires_after),
            "isMock": order.is_mock,
            "totalPrice": float(order.total),
            "currency": "usd",
            "createdAt": self._iso(order.created_at),
        }

    def _make_codes(self, item: Mapping[str, Any]) -> list[Any]:
        product = self.products[str(item["itemId"])]
        codes: list[Any] = []
        for _ in range(item["quantity"]):
            code = "-".join(f"{self._rng.getrandbits(16):04X}" for _ in range(4))
            if product.code_style == "object":
                codes.append({"code": code, "pin": f"{self._rng.randrange(10**6):06d}"})
            else:
                codes.append(code)
        return codes

    def _iso(self, monotonic: float) -> str:
        wall = self.clock.time() - self.clock.monotonic() + monotonic
        return datetime.fromtimestamp(wall, tz=timezone.utc).isoformat().replace("+00:00", "Z")

    # -- catalogue -------------------------------------------------------------------

    def _render_product(self, product: SimProduct) -> dict[str, Any]:
        return {
            "id": product.id, "name": product.name, "slug": product.id.replace("_", "-"),
            "categoryId": product.category, "price": str(product.price), "currency": "usd",
            "quantity": product.stock, "orderMinQuantity": 1,
            "orderMaxQuantity": product.order_max_quantity,
            "requiredNoteFields": list(product.required_note_fields),
        }

    def _list_products(self, request: httpx.Request, body: Any) -> tuple[int, Any]:
        category = request.url.params.get("category_id_or_slug")
        if not category:
            raise _Reply(422, "category_id_or_slug is required")
        in_stock = request.url.params.get("withStockOnly") == "true"
        found = [
            self._render_product(p) for p in self.products.values()
            if p.category == category and (p.stock > 0 or not in_stock)
        ]
        limit, offset = _int_param(request, "limit", 50), _int_param(request, "offset", 0)
        if not 1 <= limit <= 200:
            raise _Reply(422, "limit must be 1-200")
        return 200, {"items": found[offset : offset + limit], "limit": limit,
                     "offset": offset, "total": len(found)}

    def _search_products(self, request: httpx.Request, body: Any) -> tuple[int, Any]:
        query = request.url.params.get("query", "").lower()
        found = [
            self._render_product(p) for p in self.products.values() if query in p.name.lower()
        ]
        return 200, {"items": found, "limit": 50, "offset": 0, "total": len(found)}

    def _get_product(self, request: httpx.Request, body: Any, product_id: str) -> tuple[int, Any]:
        product = self.products.get(product_id)
        if product is None:
            raise _Reply(404, "Product not found", "NOT_FOUND")
        return 200, self._render_product(product)

    def _list_categories(self, request: httpx.Request, body: Any) -> tuple[int, Any]:
        names = sorted({p.category for p in self.products.values()})
        limit = _int_param(request, "limit", 50)
        start = _int_param(request, "cursor", 0)
        page = names[start : start + limit]
        more = start + limit < len(names)
        return 200, {
            "items": [{"id": n, "name": n.title(), "slug": n} for n in page],
            "limit": limit,
            "nextCursor": str(start + limit) if more else None,
        }


def _int_param(request: httpx.Request, name: str, default: int) -> int:
    value = request.url.params.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise _Reply(422, f"{name} must be an integer") from None


def _json_body(request: httpx.Request) -> Any:
    if not request.content:
        return None
    try:
        return json.loads(request.content)
    except ValueError:
        return None


def _error(
    status: int, detail: str, code: str | None, headers: Mapping[str, str] | None = None
) -> httpx.Response:
    payload: dict[str, Any] = {"detail": detail}
    if code is not None:
        payload["code"] = code
    return httpx.Response(status, json=payload, headers=headers)


class SimTransport(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """Routes an httpx client's requests into a :class:`FakeFoxReload`."""

    def __init__(self, sim: FakeFoxReload) -> None:
        self.sim = sim

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.read()
        return self.sim.handle(request)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        return self.sim.handle(request)
