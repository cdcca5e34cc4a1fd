"""The FoxReload endpoints as sans-io flows, shared by the sync and async resources.

Each function validates its arguments, describes the request as a :class:`Call` and returns
the flow that performs it. Paths follow the API's convention: collections end with a slash,
single resources do not.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Mapping
from decimal import Decimal
from typing import Any, TypeVar
from urllib.parse import quote

import attrs

from ._clock import Clock
from ._core import Call, ClientConfig, RetryMode, call_flow
from ._effects import Flow
from ._parse import parse as parse_model
from ._parse import parse_page
from .errors import AmbiguousOrderError, APIError, OrderMismatch
from .models import (
    Category,
    Order,
    OrderItemRequest,
    OrderStatus,
    Page,
    Product,
    converter,
)
from .ratelimit import BaseRateLimit, Priority

__all__ = ["Runtime"]

log = logging.getLogger("foxpoll")

T = TypeVar("T")

MAX_ITEMS_PER_ORDER = 10
MAX_QUANTITY = 1_000_000  # far above any product's orderMaxQuantity; a guard against typos
MAX_ID_LENGTH = 256


@attrs.frozen
class Runtime:
    """A client's configuration with its clock and random source: all a flow needs."""

    config: ClientConfig
    clock: Clock
    rng: random.Random = attrs.field(repr=False)
    limit: BaseRateLimit | None = None

    def flow(self, call: Call[T], *, deadline: float | None = None) -> Flow[T]:
        return call_flow(self.config, call, clock=self.clock, rng=self.rng, deadline=deadline,
                         limit=self.limit)


def resource_path(prefix: str, resource_id: object, *, kind: str, suffix: str = "") -> str:
    """``prefix`` + the escaped id + ``suffix``, after checking the id is usable in a URL.

    Raises:
        ValueError: the id is not a non-empty string of printable characters, or is too long.
    """
    if not isinstance(resource_id, str):
        raise TypeError(f"{kind} id must be a str, not {type(resource_id).__name__}")
    if not resource_id.strip():
        raise ValueError(f"{kind} id is empty")
    if len(resource_id) > MAX_ID_LENGTH:
        raise ValueError(f"{kind} id is {len(resource_id)} characters (at most {MAX_ID_LENGTH})")
    if not resource_id.isprintable():
        raise ValueError(f"{kind} id contains control characters")
    if resource_id in (".", ".."):
        raise ValueError(f"{kind} id cannot be {resource_id!r}")
    return prefix + quote(resource_id, safe="") + suffix


def _order_parser(data: Any) -> Order:
    return parse_model(data, Order)


def _order_about(order_id: str) -> Callable[[Any], Order]:
    """The parser of a response about ``order_id``: one whose ``id`` is not exactly that
    (no case folding, no trimming) raises :class:`OrderMismatch`, logged at WARNING. Every
    read and payment of a known order goes through it, so no caller sees, or delivers,
    another order."""

    def parse(data: Any) -> Order:
        order = parse_model(data, Order)
        if order.id != order_id:
            mismatch = OrderMismatch(requested=order_id, received=order.id)
            # Logged here, where each response is read once, so once per answer, whatever
            # the caller makes of the error; its message quotes the ids, bounded, never a
            # code.
            log.warning("%s", mismatch)
            raise mismatch
        return order

    return parse


def _page_parser(kind: type[T]) -> Any:
    return lambda data: parse_page(data, kind)


def get_order(rt: Runtime, order_id: str, *, deadline: float | None = None,
              priority: Priority = Priority.FRESH) -> Flow[Order]:
    """GET one order."""
    path = resource_path("/api/orders/", order_id, kind="order")
    call = Call("GET", path, _order_about(order_id), priority=priority)
    return rt.flow(call, deadline=deadline)


def list_orders(
    rt: Runtime,
    params: Mapping[str, Any],
    *,
    status: OrderStatus | str | None = None,
    limit: int | None = None,
    offset: int | None = None,
    cursor: str | None = None,
    priority: Priority = Priority.FRESH,
) -> Flow[Page[Order]]:
    """GET one page of the order history, newest first.

    The listing's parameters are not published: ``status``, ``limit``, ``offset`` and
    ``cursor`` are sent under those names when given (checked here), and ``params`` is
    passed through as given, for the names a partner's onboarding documents.

    Raises:
        ValueError: ``limit`` is below 1, ``offset`` below 0, or a name is given twice.
    """
    named: dict[str, Any] = {}
    if status is not None:
        named["status"] = status.value if isinstance(status, OrderStatus) else status
        if not isinstance(named["status"], str) or not named["status"]:
            raise ValueError("status must be an OrderStatus or a non-empty string")
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError("limit must be a whole number, at least 1")
        named["limit"] = limit
    if offset is not None:
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError("offset must be a whole number, zero or more")
        named["offset"] = offset
    if cursor is not None:
        named["cursor"] = cursor
    twice = sorted(set(named) & set(params))
    if twice:
        raise ValueError(f"{', '.join(twice)} given twice")
    call = Call("GET", "/api/orders/", _page_parser(Order), params={**params, **named},
                priority=priority)
    return rt.flow(call)


def order_item_request(item: OrderItemRequest | Mapping[str, Any]) -> OrderItemRequest:
    """Accept an :class:`OrderItemRequest`, or a dict with camelCase or snake_case keys."""
    if isinstance(item, OrderItemRequest):
        result = item
    elif isinstance(item, Mapping):
        unknown = set(item) - {"itemId", "item_id", "quantity", "note"}
        if unknown:
            raise ValueError(f"unknown order item fields: {sorted(unknown)}")
        item_id = item.get("itemId", item.get("item_id"))
        result = OrderItemRequest(
            item_id=item_id,
            quantity=item.get("quantity", 1),
            note=item.get("note"),
        )
    else:  # untyped callers
        kind = type(item).__name__  # type: ignore[unreachable]
        raise TypeError(f"an order item is an OrderItemRequest or a dict, not {kind}")
    if not isinstance(result.item_id, str) or not result.item_id:
        raise ValueError("an order item needs a non-empty itemId")
    if isinstance(result.quantity, bool) or not isinstance(result.quantity, int):
        raise TypeError("quantity must be an int")
    if not 1 <= result.quantity <= MAX_QUANTITY:
        raise ValueError(f"quantity must be between 1 and {MAX_QUANTITY}")
    if result.note is not None and not isinstance(result.note, Mapping):
        raise TypeError("note must be a dict of the product's required note fields")
    return result


def create_order_body(
    items: Iterable[OrderItemRequest | Mapping[str, Any]],
    *,
    is_mock: bool,
    total_price: Decimal | float | int | str | None,
) -> dict[str, Any]:
    """The JSON body of a create-order request, validated."""
    if isinstance(items, (str, bytes, Mapping)):
        raise TypeError("items must be a list of order items")
    lines = [order_item_request(item) for item in items]
    if not 1 <= len(lines) <= MAX_ITEMS_PER_ORDER:
        raise ValueError(f"an order has 1 to {MAX_ITEMS_PER_ORDER} items, not {len(lines)}")
    encoded = []
    for line in lines:
        data = converter.unstructure(line)
        if data.get("note") is None:
            data.pop("note", None)
        encoded.append(data)
    body: dict[str, Any] = {"items": encoded, "isMock": bool(is_mock)}
    if total_price is not None:
        body["totalPrice"] = _json_number(total_price)
    return body


def _json_number(value: Decimal | float | int | str) -> float | int:
    try:
        number = Decimal(str(value))
    except ArithmeticError:  # decimal.InvalidOperation: "abc", "1,5"
        raise ValueError("total_price must be a number, such as 10.5 or '10.50'") from None
    if not number.is_finite() or number < 0:
        raise ValueError("total_price must be a finite, non-negative number")
    return int(number) if number == number.to_integral_value() else float(number)


def create_order(rt: Runtime, body: Mapping[str, Any]) -> Flow[Order]:
    """POST a new order. Never resent once it may have left (no idempotency key exists)."""
    call = Call("POST", "/api/orders/", _order_parser, json=body,
                retry_mode=RetryMode.UNSENT_ONLY, priority=Priority.BUY)
    return rt.flow(call)


def pay_order(
    rt: Runtime,
    order_id: str,
    *,
    payment_provider: str | None,
    payment_return_url: str | None,
) -> Flow[Order]:
    """POST a payment, then, if its outcome is unknown, look at the order to find out.

    Paying is not resent either. When the attempt ends ambiguously (a success body about
    another order, :class:`OrderMismatch`, is one way), the order itself tells: anything
    but ``active`` means the payment went through, so that order is returned; still
    ``active``, or not readable, re-raises the :class:`AmbiguousOrderError`, since an
    external payment may still be in flight.
    """
    path = resource_path("/api/orders/", order_id, kind="order", suffix="/pay")
    body: dict[str, Any] = {"paymentProvider": payment_provider}
    if payment_return_url is not None:
        body["paymentReturnUrl"] = payment_return_url
    call = Call("POST", path, _order_about(order_id), json=body,
                retry_mode=RetryMode.UNSENT_ONLY, priority=Priority.BUY)
    try:
        return (yield from rt.flow(call))
    except AmbiguousOrderError as ambiguous:
        try:
            order = yield from get_order(rt, order_id, priority=Priority.BUY)
        except APIError as unread:
            # The payment's outcome is still unknown: that, not the failed look, is the
            # answer (the look's error stays attached as the context).
            log.info("order %s: the payment's outcome is unknown and the order could not "
                     "be read (%s)", order_id, type(unread).__name__)
            raise ambiguous from ambiguous.cause
        if order.status is OrderStatus.ACTIVE:
            raise ambiguous from ambiguous.cause
        return order


def list_products(
    rt: Runtime,
    *,
    category: str,
    limit: int | None,
    offset: int | None,
    with_stock_only: bool | None,
) -> Flow[Page[Product]]:
    """GET the products of a category (``limit`` 1-200)."""
    if not isinstance(category, str) or not category:
        raise ValueError("category (an id or slug) is required")
    if limit is not None and not 1 <= limit <= 200:
        raise ValueError("limit must be between 1 and 200")
    if offset is not None and offset < 0:
        raise ValueError("offset must be zero or more")
    params = {
        "category_id_or_slug": category,
        "limit": limit,
        "offset": offset,
        "withStockOnly": with_stock_only,
    }
    return rt.flow(Call("GET", "/api/products/", _page_parser(Product), params=params))


def search_products(
    rt: Runtime, query: str, params: Mapping[str, Any]
) -> Flow[Page[Product]]:
    """GET products matching ``query``."""
    if not isinstance(query, str) or not query.strip():
        raise ValueError("query must be a non-empty string")
    call = Call(
        "GET", "/api/products/search", _page_parser(Product), params={"query": query, **params}
    )
    return rt.flow(call)


def get_product(rt: Runtime, product_id: str) -> Flow[Product]:
    """GET one product."""
    path = resource_path("/api/products/", product_id, kind="product", suffix="/")
    return rt.flow(Call("GET", path, lambda data: parse_model(data, Product)))


def list_categories(
    rt: Runtime,
    *,
    with_stock_only: bool | None,
    tag: str | None,
    parent: str | None,
    cursor: str | None,
    limit: int | None,
) -> Flow[Page[Category]]:
    """GET one page of categories (cursor-paginated)."""
    params = {
        "withStockOnly": with_stock_only,
        "tag": tag,
        "parent_id_or_slug": parent,
        "cursor": cursor,
        "limit": limit,
    }
    return rt.flow(Call("GET", "/api/categories/", _page_parser(Category), params=params))
