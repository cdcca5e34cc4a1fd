"""``client.orders``, ``client.products``, ``client.categories``: one line per method.

Each method hands a flow from :mod:`foxpoll._api` to its client's :class:`Runner`. The
sync and async classes differ only in ``await``; ``tests/test_public_api.py`` keeps their
signatures in step. Resources know their client only through the runner, so the clients
build them and nothing here imports a client.
"""

from __future__ import annotations

from collections.abc import Awaitable, Iterable, Mapping
from decimal import Decimal
from typing import Any, Protocol, TypeVar

from . import _api
from ._effects import Flow
from .models import Category, Order, OrderItemRequest, OrderStatus, Page, Product
from .ratelimit import Priority

__all__ = [
    "AsyncCategories",
    "AsyncOrders",
    "AsyncProducts",
    "AsyncRunner",
    "Categories",
    "Orders",
    "Products",
    "Runner",
]

T = TypeVar("T")

ItemsArg = Iterable["OrderItemRequest | Mapping[str, Any]"]


class _Bound(Protocol):
    @property
    def runtime(self) -> _api.Runtime:
        """The client's configuration, clock, random source and budget."""

    def pay(self, order_id: str, *, payment_provider: str | None,
            payment_return_url: str | None) -> Flow[Order]:
        """The flow that pays ``order_id``, recording its watch first when the client has
        a recovery queue."""


class Runner(_Bound, Protocol):
    """What a sync resource needs of its client."""

    def run(self, flow: Flow[T], /) -> T:
        """Run ``flow`` with the client's HTTP client, gate and clock."""


class AsyncRunner(_Bound, Protocol):
    """What an async resource needs of its client."""

    def run(self, flow: Flow[T], /) -> Awaitable[T]:
        """Run ``flow`` on the event loop with the client's HTTP client, gate and clock."""


class Orders:
    """Create, pay and read orders."""

    def __init__(self, runner: Runner) -> None:
        self._runner = runner

    def create(
        self,
        *,
        items: ItemsArg,
        is_mock: bool = False,
        total_price: Decimal | float | int | str | None = None,
    ) -> Order:
        """Create an order of 1-10 items; it starts ``active``, awaiting payment.

        Args:
            items: :class:`OrderItemRequest` objects, or dicts such as
                ``{"itemId": ..., "quantity": 1, "note": {...}}``.
            is_mock: Create a test order.
            total_price: The price you expect to pay; the current price when omitted.

        Raises:
            AmbiguousOrderError: the request may have reached the server and its outcome
                is unknown. It is never resent: FoxReload has no idempotency key.
            APIStatusError: the API refused the order (balance, stock, price...).
        """
        body = _api.create_order_body(items, is_mock=is_mock, total_price=total_price)
        return self._runner.run(_api.create_order(self._runner.runtime, body))

    def pay(
        self,
        order_id: str,
        *,
        payment_provider: str | None = None,
        payment_return_url: str | None = None,
    ) -> Order:
        """Pay an order; ``payment_provider=None`` pays from the account balance.

        With a client ``recovery_queue``, the order is first recorded there as a watch
        (see :class:`foxpoll.recovery.RecoveryQueue`); if that write fails, nothing is paid.

        Raises:
            AmbiguousOrderError: the payment's outcome is unknown, and the order read
                again is still ``active`` or could not be read; it was not resent. An
                answer about another order (:class:`OrderMismatch`) is such an outcome.
        """
        flow = self._runner.pay(
            order_id, payment_provider=payment_provider, payment_return_url=payment_return_url
        )
        return self._runner.run(flow)

    def get(self, order_id: str, *, priority: Priority = Priority.FRESH) -> Order:
        """Read one order; its codes are in ``order.codes`` once it is completed.

        Args:
            priority: Its lane in the client's rate limit; recovery re-checks use
                ``Priority.POLL``, behind buys and first polls.

        Raises:
            OrderMismatch: the response is about another order (its ``id`` is not
                exactly ``order_id``); nothing of it is returned.
        """
        flow = _api.get_order(self._runner.runtime, order_id, priority=priority)
        return self._runner.run(flow)

    def list(
        self,
        *,
        status: OrderStatus | str | None = None,
        limit: int | None = None,
        offset: int | None = None,
        cursor: str | None = None,
        **params: Any,
    ) -> Page[Order]:
        """One page of the order history, newest first.

        Its parameters are not published. These are sent under these names when given;
        other keyword arguments are sent as query parameters, as given.

        Args:
            status: Only orders in this status (``status=processing``).
            limit: Orders per page, at least 1.
            offset: Orders to skip, for offset paging (``page.total`` tells how many).
            cursor: ``page.next_cursor`` of the previous page, for cursor paging.

        Raises:
            ValueError: ``limit`` is below 1 or ``offset`` below 0.
        """
        flow = _api.list_orders(self._runner.runtime, params, status=status, limit=limit,
                                offset=offset, cursor=cursor)
        return self._runner.run(flow)


class AsyncOrders:
    """Async :class:`Orders`."""

    def __init__(self, runner: AsyncRunner) -> None:
        self._runner = runner

    async def create(
        self,
        *,
        items: ItemsArg,
        is_mock: bool = False,
        total_price: Decimal | float | int | str | None = None,
    ) -> Order:
        """See :meth:`Orders.create`."""
        body = _api.create_order_body(items, is_mock=is_mock, total_price=total_price)
        return await self._runner.run(_api.create_order(self._runner.runtime, body))

    async def pay(
        self,
        order_id: str,
        *,
        payment_provider: str | None = None,
        payment_return_url: str | None = None,
    ) -> Order:
        """See :meth:`Orders.pay`."""
        flow = self._runner.pay(
            order_id, payment_provider=payment_provider, payment_return_url=payment_return_url
        )
        return await self._runner.run(flow)

    async def get(self, order_id: str, *, priority: Priority = Priority.FRESH) -> Order:
        """See :meth:`Orders.get`."""
        flow = _api.get_order(self._runner.runtime, order_id, priority=priority)
        return await self._runner.run(flow)

    async def list(
        self,
        *,
        status: OrderStatus | str | None = None,
        limit: int | None = None,
        offset: int | None = None,
        cursor: str | None = None,
        **params: Any,
    ) -> Page[Order]:
        """See :meth:`Orders.list`."""
        flow = _api.list_orders(self._runner.runtime, params, status=status, limit=limit,
                                offset=offset, cursor=cursor)
        return await self._runner.run(flow)


class Products:
    """Browse and search the catalogue."""

    def __init__(self, runner: Runner) -> None:
        self._runner = runner

    def list(
        self,
        *,
        category: str,
        limit: int | None = None,
        offset: int | None = None,
        with_stock_only: bool | None = None,
    ) -> Page[Product]:
        """One page of a category's products (``limit`` 1-200, the API's default 50)."""
        flow = _api.list_products(
            self._runner.runtime,
            category=category,
            limit=limit,
            offset=offset,
            with_stock_only=with_stock_only,
        )
        return self._runner.run(flow)

    def search(self, query: str, **params: Any) -> Page[Product]:
        """Products matching ``query``; extra keyword arguments become query parameters."""
        return self._runner.run(_api.search_products(self._runner.runtime, query, params))

    def get(self, product_id: str) -> Product:
        """One product, with its ``required_note_fields``."""
        return self._runner.run(_api.get_product(self._runner.runtime, product_id))


class AsyncProducts:
    """Async :class:`Products`."""

    def __init__(self, runner: AsyncRunner) -> None:
        self._runner = runner

    async def list(
        self,
        *,
        category: str,
        limit: int | None = None,
        offset: int | None = None,
        with_stock_only: bool | None = None,
    ) -> Page[Product]:
        """See :meth:`Products.list`."""
        flow = _api.list_products(
            self._runner.runtime,
            category=category,
            limit=limit,
            offset=offset,
            with_stock_only=with_stock_only,
        )
        return await self._runner.run(flow)

    async def search(self, query: str, **params: Any) -> Page[Product]:
        """See :meth:`Products.search`."""
        return await self._runner.run(_api.search_products(self._runner.runtime, query, params))

    async def get(self, product_id: str) -> Product:
        """See :meth:`Products.get`."""
        return await self._runner.run(_api.get_product(self._runner.runtime, product_id))


class Categories:
    """Browse the category tree."""

    def __init__(self, runner: Runner) -> None:
        self._runner = runner

    def list(
        self,
        *,
        with_stock_only: bool | None = None,
        tag: str | None = None,
        parent: str | None = None,
        cursor: str | None = None,
        limit: int | None = None,
    ) -> Page[Category]:
        """One page of categories; pass ``page.next_cursor`` as ``cursor`` for the next."""
        flow = _api.list_categories(
            self._runner.runtime,
            with_stock_only=with_stock_only,
            tag=tag,
            parent=parent,
            cursor=cursor,
            limit=limit,
        )
        return self._runner.run(flow)


class AsyncCategories:
    """Async :class:`Categories`."""

    def __init__(self, runner: AsyncRunner) -> None:
        self._runner = runner

    async def list(
        self,
        *,
        with_stock_only: bool | None = None,
        tag: str | None = None,
        parent: str | None = None,
        cursor: str | None = None,
        limit: int | None = None,
    ) -> Page[Category]:
        """See :meth:`Categories.list`."""
        flow = _api.list_categories(
            self._runner.runtime,
            with_stock_only=with_stock_only,
            tag=tag,
            parent=parent,
            cursor=cursor,
            limit=limit,
        )
        return await self._runner.run(flow)
