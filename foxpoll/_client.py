"""``FoxReload`` and ``AsyncFoxReload``: thin I/O shells over one shared base.

:class:`BaseClient` holds the configuration and everything that is not I/O. The two
clients add only the HTTP client they own and the driver that runs flows with it, which
their resources reach through a runner (:class:`foxpoll._resources.Runner`).
"""

from __future__ import annotations

import functools
import random
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from decimal import Decimal
from types import TracebackType
from typing import Any, ClassVar, Generic, TypeVar

import attrs
import httpx

from . import _api, _io
from ._api import Runtime
from ._buy import BuySteps, Purchase, buy_flow, order_lines
from ._clock import Clock, SystemClock
from ._core import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_MAX_RETRY_AFTER,
    SIMULATOR_KEY,
    ClientConfig,
    check_max_retry_after,
    check_response_bytes,
    check_retries,
    check_timeout,
    make_config,
)
from ._effects import Flow, drive, drive_async, drive_stream, drive_stream_async
from ._gate import AsyncGate, Gate
from ._resources import (
    AsyncCategories,
    AsyncOrders,
    AsyncProducts,
    Categories,
    Orders,
    Products,
)
from ._senders import (
    DEFAULT_MAX_RESPONSE_BYTES,
    DEFAULT_TIMEOUT,
    AsyncClientSender,
    AsyncSender,
    AsyncTransportSender,
    ClientSender,
    Sender,
    TransportSender,
    default_async_client,
    default_client,
    proxy_for,
)
from ._watches import Watcher, WatchQueue
from .dedup.base import AsyncDedupStore, DedupStore
from .delivery import adeliver_once, deliver_once
from .errors import AmbiguousOrderError
from .events.base import AsyncPublisher, Publisher
from .models import Order, OrderItemRequest
from .polling import (
    DEFAULT_POLICY,
    NO_LISTENERS,
    Listener,
    Listeners,
    WaitPolicy,
    WaitResult,
    wait_flow,
    wait_many_flow,
)
from .ratelimit import BaseRateLimit

__all__ = ["AsyncFoxReload", "BaseClient", "FoxReload"]

T = TypeVar("T")
HttpT = TypeVar("HttpT", httpx.Client, httpx.AsyncClient)
TransportT = TypeVar("TransportT", httpx.BaseTransport, httpx.AsyncBaseTransport)
Self = TypeVar("Self", bound="BaseClient[Any, Any]")
SenderT = TypeVar("SenderT", Sender, AsyncSender)
GateT = TypeVar("GateT", Gate, AsyncGate)

#: What the blocking client's ``buy`` names when given an async function.
_ASYNC_BUY = "AsyncFoxReload.buy"

_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20)


@attrs.frozen
class _Runner(Generic[SenderT, GateT]):
    """A client's runtime, HTTP sender, gate and watches: what its resources run flows
    with."""

    runtime: Runtime
    http: SenderT
    gate: GateT
    watcher: Watcher | None

    def pay(self, order_id: str, *, payment_provider: str | None,
            payment_return_url: str | None) -> Flow[Order]:
        flow = _api.pay_order(self.runtime, order_id, payment_provider=payment_provider,
                              payment_return_url=payment_return_url)
        return flow if self.watcher is None else self.watcher.pay(order_id, flow)


class _SyncRunner(_Runner[Sender, Gate]):
    def run(self, flow: Flow[T], /) -> T:
        return drive(flow, self.http, self.runtime.clock, gate=self.gate)


class _AsyncRunner(_Runner[AsyncSender, AsyncGate]):
    async def run(self, flow: Flow[T], /) -> T:
        return await drive_async(flow, self.http, self.runtime.clock, gate=self.gate)


class BaseClient(Generic[HttpT, TransportT]):
    """Configuration and option handling shared by both clients; their arguments are
    documented on ``__init__``."""

    _owns_http: bool
    #: Whether the HTTP client takes its proxies from the environment: the one foxpoll
    #: builds does, and so does yours with ``trust_env`` (httpx's default).
    _env_proxies: bool
    _runtime: Runtime
    #: Run the recovery queue's blocking calls in a worker thread (the async client).
    _watches_in_thread: ClassVar[bool] = False

    def __init__(
        self,
        api_key: str | None = None,
        *,
        base_url: str | httpx.URL | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        http_client: HttpT | None = None,
        transport: TransportT | None = None,
        default_headers: Mapping[str, str] | None = None,
        language: str | None = None,
        currency: str | None = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        recovery_queue: WatchQueue | None = None,
        rate_limit: BaseRateLimit | None = None,
        max_in_flight: int = _LIMITS.max_connections or 100,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        max_retry_after: float = DEFAULT_MAX_RETRY_AFTER,
        wait_policy: WaitPolicy | None = None,
        listeners: Iterable[Listener] = (),
    ) -> None:
        """A client for one API key.

        Args:
            api_key: Your key; ``FOXRELOAD_API_KEY`` when omitted.
            base_url: The API's scheme and host, such as
                ``https://public-api.foxreload.com`` (without ``/api``: the paths carry
                it); ``FOXRELOAD_BASE_URL``, else the public API. ``http://`` only to this
                machine (or with the simulator's key), and not through a proxy from the
                environment (with your ``http_client`` too, unless it has
                ``trust_env=False``); no user info (see "The key on the wire" in the docs).
            timeout: Seconds allowed for one HTTP request, from connecting to the last byte
                of its body: a deadline, not a per-read timeout (see the bounds in
                ``docs/bounds.md``). A wait's deadline is its policy's ``timeout``.
            max_retries: Retries of a failed request that is safe to resend (never a create
                that may have reached the server).
            http_client: Your own :class:`httpx.Client` (or :class:`httpx.AsyncClient` for the
                async client) for a proxy given in code, transports or event hooks;
                foxpoll does not close it.
            transport: An httpx transport to send to directly, with no :class:`httpx.Client`
                around it (so no event hooks, cookies or proxies): the fastest path, such as
                :class:`foxpoll.transports.AiohttpTransport`. foxpoll closes it. Not together
                with ``http_client``.
            default_headers: Extra headers for every request; like ``language`` and
                ``currency``, checked here: a value HTTP cannot carry (a line break, NUL,
                non-ASCII) raises :class:`ValueError`.
            language: ``X-Language`` (``en``, ``ru``).
            currency: ``X-Currency`` (``usd``, ``rub``).
            clock: Time and sleep; a :class:`foxpoll.testing.FakeClock` in tests.
            rng: Random source for jitter.
            max_in_flight: Requests this client has in flight at once, from every thread or
                task; the others queue in foxpoll, buys first, never inside the HTTP
                client's pool (where they would time out). The default, 100, is the size of
                the client's own connection pool; with your ``http_client``, match it to
                that client's pool. ``wait_many(max_in_flight=...)`` lowers it for one
                call.
            max_response_bytes: The largest response body read, once decoded (10 MiB by
                default); a larger one raises :class:`foxpoll.ResponseTooLarge`, as does
                one past a bound on the work of reading it (``docs/bounds.md``).
            max_retry_after: The longest ``Retry-After`` foxpoll obeys, in seconds (60 by
                default): a request asked to wait longer is not retried (its
                :class:`foxpoll.RateLimitError` is raised), a wait polls again after at
                most this long, and the pause a 429 asks of the ``rate_limit`` is cut to it.
                At most an hour, the longest pause a budget takes.
            wait_policy: How :meth:`wait_for_completion` and :meth:`wait_many` wait when a
                call names no ``policy`` (:class:`foxpoll.WaitPolicy`; the vendor's schedule
                by default). A watch written by ``orders.pay`` covers its horizon.
            listeners: Objects told of every wait's events (:class:`foxpoll.Listener`):
                metrics, logging. A call's own ``listener`` is told after these.
            rate_limit: The API key's request budget (:mod:`foxpoll.ratelimit`), shared with
                every process that uses the key: each request takes a permit first, buys
                before first polls before later polls, and a 429 pauses every holder.
            recovery_queue: A :mod:`foxpoll.recovery` queue that keeps paid orders from being
                lost. ``orders.pay`` records a *watch* before it pays, and every wait records
                one as it starts: a job that fires if the wait dies with its process. A wait
                that ends settles its watch; one that stalls enqueues its order for recovery.
                The async client runs each queue call in a worker thread
                (:func:`asyncio.to_thread`): a slow queue never blocks its event loop.
        """
        self._gate = self._make_gate(max_in_flight)
        config = make_config(
            api_key=api_key,
            base_url=base_url,
            timeout=timeout,
            max_retries=max_retries,
            headers=default_headers,
            language=language,
            currency=currency,
            max_response_bytes=max_response_bytes,
            max_retry_after=max_retry_after,
        )
        if wait_policy is not None and not isinstance(wait_policy, WaitPolicy):
            raise TypeError("wait_policy must be a foxpoll.WaitPolicy")
        self._wait_policy = DEFAULT_POLICY if wait_policy is None else wait_policy
        if rate_limit is not None and not isinstance(rate_limit, BaseRateLimit):
            raise TypeError("rate_limit must be a foxpoll.ratelimit budget, such as "
                            "RateLimit(per_minute=100)")
        self._runtime = Runtime(config, clock or SystemClock(), rng or random.Random(),
                                rate_limit)
        self._watcher = (None if recovery_queue is None else Watcher(
            recovery_queue, self._runtime.clock, self._wait_policy,
            in_thread=self._watches_in_thread))
        given: list[object] = list(listeners)
        # The watcher is told first: a watch is recorded before any other listener runs.
        self._listeners = Listeners.of(
            ([] if self._watcher is None else [self._watcher]) + given)
        self._orphan_hooks = _orphan_hooks(given)
        if http_client is not None and transport is not None:
            raise ValueError("pass http_client or transport, not both")
        self._env_proxies = transport is None and (
            http_client is None or bool(getattr(http_client, "trust_env", True)))
        _check_route(config, self._env_proxies)
        self._owns_http = http_client is None
        if transport is not None:
            self._http: Any = self._direct_sender(transport)
        else:
            self._http = self._client_sender(http_client or self._default_http_client())
        self._bind_resources()

    def _default_http_client(self) -> HttpT:
        raise NotImplementedError

    def _make_gate(self, size: int) -> Any:
        raise NotImplementedError

    def _client_sender(self, client: HttpT) -> Any:
        raise NotImplementedError

    def _direct_sender(self, transport: TransportT) -> Any:
        raise NotImplementedError

    def _bind_resources(self) -> None:
        raise NotImplementedError

    @property
    def base_url(self) -> httpx.URL:
        """The API's base URL."""
        return self._runtime.config.base_url

    @property
    def timeout(self) -> float:
        """Seconds allowed for one HTTP request."""
        return self._runtime.config.timeout

    @property
    def max_retries(self) -> int:
        """Retries of a failed request that is safe to resend."""
        return self._runtime.config.max_retries

    @property
    def rate_limit(self) -> BaseRateLimit | None:
        """The request budget every request takes a permit from, if any."""
        return self._runtime.limit

    @property
    def clock(self) -> Clock:
        """The clock used for sleeps, backoff and deadlines."""
        return self._runtime.clock

    @property
    def wait_policy(self) -> WaitPolicy:
        """How a wait that names no policy waits."""
        return self._wait_policy

    @property
    def max_retry_after(self) -> float:
        """The longest ``Retry-After`` foxpoll obeys, in seconds."""
        return self._runtime.config.max_retry_after

    def with_options(
        self: Self,
        *,
        api_key: str | None = None,
        base_url: str | httpx.URL | None = None,
        timeout: float | None = None,
        max_retries: int | None = None,
        max_retry_after: float | None = None,
        max_response_bytes: int | None = None,
    ) -> Self:
        """A copy with some options changed, sharing this client's connection pool.

        The copy does not own the pool: closing it leaves this client open.
        """
        config = self._runtime.config
        changes: dict[str, Any] = {}
        if api_key is not None:
            changes["api_key"] = make_config(
                api_key=api_key, base_url=config.base_url, timeout=1.0, max_retries=0
            ).api_key
        if base_url is not None:
            changes["base_url"] = make_config(
                api_key=config.api_key, base_url=base_url, timeout=1.0, max_retries=0
            ).base_url
        if timeout is not None:
            changes["timeout"] = check_timeout(timeout)
        if max_retries is not None:
            changes["max_retries"] = check_retries(max_retries)
        if max_retry_after is not None:
            changes["max_retry_after"] = check_max_retry_after(max_retry_after)
        if max_response_bytes is not None:
            changes["max_response_bytes"] = check_response_bytes(max_response_bytes)
        changed = attrs.evolve(config, **changes)
        _check_route(changed, self._env_proxies)
        clone = object.__new__(type(self))
        clone._runtime = attrs.evolve(self._runtime, config=changed)
        clone._http = self._http
        clone._owns_http = False
        clone._env_proxies = self._env_proxies
        clone._watcher = self._watcher
        clone._wait_policy = self._wait_policy
        clone._listeners = self._listeners
        clone._orphan_hooks = self._orphan_hooks
        clone._gate = self._gate  # the same pool: the same slots
        clone._bind_resources()
        return clone

    def __repr__(self) -> str:
        # base_url holds no user info (make_config refuses it): nothing in it is secret.
        return f"{type(self).__name__}(base_url={str(self.base_url)!r}, api_key='<redacted>')"

    def _wait_args(self, policy: WaitPolicy | None, timeout: float | None,
                   listener: object | None) -> tuple[WaitPolicy, Listeners]:
        """The policy and listeners of one wait: the call's, over the client's."""
        if policy is not None and not isinstance(policy, WaitPolicy):
            raise TypeError("policy must be a foxpoll.WaitPolicy")
        chosen = (self._wait_policy if policy is None else policy).deadline(timeout)
        extra = NO_LISTENERS if listener is None else Listeners.of([listener])
        return chosen, self._listeners + extra

    def _wait_for_completion_flow(
        self, order: str | Order, policy: WaitPolicy | None, timeout: float | None,
        raise_on_failure: bool, listener: object | None,
    ) -> Flow[Order]:
        chosen, listeners = self._wait_args(policy, timeout, listener)
        return wait_flow(self._runtime, _order_id(order), chosen, listeners=listeners,
                         raise_on_failure=raise_on_failure, heartbeat=self._watcher)

    def _wait_many_flow(
        self,
        orders: Iterable[str | Order],
        policy: WaitPolicy | None,
        timeout: float | None,
        listener: object | None,
        *,
        max_requests_per_minute: float | None,
        max_in_flight: int | None,
    ) -> Flow[None]:
        chosen, listeners = self._wait_args(policy, timeout, listener)
        return wait_many_flow(
            self._runtime,
            _order_ids(orders),
            chosen,
            listeners=listeners,
            max_requests_per_minute=max_requests_per_minute,
            max_in_flight=self._gate.size if max_in_flight is None else max_in_flight,
            heartbeat=self._watcher,
        )

    def _buy_flow(
        self,
        steps: BuySteps,
        items: Iterable[OrderItemRequest | Mapping[str, Any]],
        *,
        deliver: Callable[[Order], Any],
        store: DedupStore | AsyncDedupStore,
        note: Mapping[str, Any] | None,
        is_mock: bool,
        total_price: Decimal | float | int | str | None,
        policy: WaitPolicy | None,
        timeout: float | None,
        listener: Listener | None,
        publisher: Publisher | AsyncPublisher | None,
        lease: float,
        require_codes: bool,
    ) -> _io.Flow[Purchase]:
        lines = order_lines(items, note)
        self._wait_args(policy, timeout, listener)  # a bad policy is refused before buying
        if not callable(deliver):
            raise TypeError("deliver must be a function that takes the completed order")
        hooks = self._orphan_hooks + (() if listener is None else _orphan_hooks([listener]))
        return buy_flow(steps, lines, deliver=deliver, store=store, publisher=publisher,
                        is_mock=is_mock, total_price=total_price, policy=policy,
                        timeout=timeout, listener=listener, lease=lease,
                        require_codes=require_codes, recovering=self._watcher is not None,
                        orphan_hooks=hooks, clock=self.clock)


def _orphan_hooks(listeners: Iterable[object]
                  ) -> tuple[Callable[[AmbiguousOrderError], Any], ...]:
    """The ``on_possible_orphan`` methods of ``listeners`` that have one (the metrics
    objects do): told of each create ``buy()`` could not tell the outcome of."""
    found = (getattr(listener, "on_possible_orphan", None) for listener in listeners)
    return tuple(hook for hook in found if callable(hook))


def _check_route(config: ClientConfig, env_proxies: bool) -> None:
    """Refuse an ``http://`` base_url that the environment routes through a proxy, when
    the HTTP client takes its proxies from the environment (``env_proxies``: the client
    foxpoll builds, or yours with ``trust_env``): the proxy would read the API key.

    httpx has no public way to ask a client where it sends a URL, so a client of your own
    is judged by the environment's rule, which httpx applies to it with ``trust_env``
    (:func:`proxy_for`); a proxy given to it in code is yours to vet.
    """
    url = config.base_url
    if not env_proxies or url.scheme != "http" or config.api_key == SIMULATOR_KEY:
        return
    proxy = proxy_for(url)
    if proxy is not None:
        at = proxy.host if proxy.port is None else f"{proxy.host}:{proxy.port}"
        raise ValueError(
            f"base_url http://{url.host} goes through the proxy at {at} "
            "(HTTP_PROXY or ALL_PROXY), which would read the API key in clear: use "
            f"https://, or add {url.host} to NO_PROXY (or build your own http_client "
            "with trust_env=False)")


def _order_id(order: str | Order) -> str:
    return order.id if isinstance(order, Order) else order


def _order_ids(orders: Iterable[str | Order]) -> Iterator[str]:
    if isinstance(orders, (str, bytes, Order)):  # one order, which would iterate by letter
        raise TypeError("wait_many takes a list of orders or order ids, not a single one; "
                        "wrap it in a list, or use wait_for_completion")
    return (_order_id(order) for order in orders)


class FoxReload(BaseClient[httpx.Client, httpx.BaseTransport]):
    """The FoxReload API, with blocking I/O. Its arguments are on ``__init__``.

    Build one per process and share it with all its threads; after a fork, build a new
    one (see the docs' "Sharing across threads and tasks").

    ::

        with FoxReload() as client:               # FOXRELOAD_API_KEY, FOXRELOAD_BASE_URL
            order = client.orders.create(items=[{"itemId": "product_...", "quantity": 1}])

    Attributes:
        orders: Create, pay, read and list orders (:class:`foxpoll.Orders`).
        products: The catalog: list, search, get (:class:`foxpoll.Products`).
        categories: The catalog's categories (:class:`foxpoll.Categories`).
    """

    orders: Orders
    products: Products
    categories: Categories

    _http: Sender
    _gate: Gate
    _runner: _SyncRunner

    def _default_http_client(self) -> httpx.Client:
        # The deadline of each request reaches its socket reads only through this transport.
        return default_client(_LIMITS)

    def _make_gate(self, size: int) -> Gate:
        return Gate(size)

    def _client_sender(self, client: httpx.Client) -> Sender:
        return ClientSender(client)

    def _direct_sender(self, transport: httpx.BaseTransport) -> Sender:
        return TransportSender(transport)

    def _bind_resources(self) -> None:
        self._runner = _SyncRunner(self._runtime, self._http, self._gate, self._watcher)
        self.orders = Orders(self._runner)
        self.products = Products(self._runner)
        self.categories = Categories(self._runner)

    def wait_for_completion(
        self,
        order: str | Order,
        *,
        policy: WaitPolicy | None = None,
        timeout: float | None = None,
        raise_on_failure: bool = True,
        listener: Listener | None = None,
    ) -> Order:
        """Poll an order until it is completed, failed or cancelled.

        Args:
            order: The order or its id.
            policy: How to wait (:class:`foxpoll.WaitPolicy`); the client's
                ``wait_policy`` when None.
            timeout: The wait's deadline, in seconds, over every poll, sleep and HTTP
                retry, in place of the policy's ``timeout`` for this call.
            raise_on_failure: Raise :class:`OrderFailed` / :class:`OrderCancelled`; when
                False, return the failed or cancelled order instead.
            listener: An object told of this wait's events (:class:`foxpoll.Listener`),
                after the client's ``listeners``.

        Returns:
            The completed order (or, with ``raise_on_failure=False``, the failed or
            cancelled one).

        Raises:
            OrderFailed, OrderCancelled: the order ended without codes.
            OrderStalled: attempts, errors or the deadline ran out first; it may still
                complete, so hand it to a recovery queue.
            CodesMissing: the policy's ``polls_for_codes`` polls found no codes.
            APIStatusError: a non-transient error, such as 401.
        """
        return self._runner.run(self._wait_for_completion_flow(
            order, policy, timeout, raise_on_failure, listener))

    def wait_many(
        self,
        orders: Iterable[str | Order],
        *,
        policy: WaitPolicy | None = None,
        timeout: float | None = None,
        listener: Listener | None = None,
        max_in_flight: int | None = None,
        max_requests_per_minute: float | None = None,
    ) -> Iterator[WaitResult]:
        """Poll many orders in one loop and yield a :class:`WaitResult` as each finishes.

        Each order keeps its own schedule; all polls share one request budget: the
        client's ``rate_limit``, else one of ``max_requests_per_minute`` for this call
        (else a learned one), and a 429 slows the whole budget. Failures are
        results (``result.error``), never raised. ``policy``, ``timeout`` (each order's
        deadline) and ``listener`` are those of :meth:`wait_for_completion`.

        ``max_in_flight`` is the most requests this call has in flight at once, within
        the client's own ``max_in_flight`` (its default). This client's requests block,
        so its polls go one at a time: any ``max_in_flight`` but 1 raises
        :class:`ValueError`; :meth:`AsyncFoxReload.wait_many` runs several at once.
        """
        if max_in_flight is not None and (type(max_in_flight) is not int or max_in_flight != 1):
            raise ValueError("the sync client polls one order at a time (max_in_flight=1); "
                             "AsyncFoxReload.wait_many runs polls concurrently")
        flow = self._wait_many_flow(orders, policy, timeout, listener,
                                    max_requests_per_minute=max_requests_per_minute,
                                    max_in_flight=1)
        return drive_stream(flow, self._http, self._runtime.clock, gate=self._gate)

    def buy(
        self,
        items: Iterable[OrderItemRequest | Mapping[str, Any]],
        *,
        deliver: Callable[[Order], Any],
        store: DedupStore,
        note: Mapping[str, Any] | None = None,
        is_mock: bool = False,
        total_price: Decimal | float | int | str | None = None,
        policy: WaitPolicy | None = None,
        timeout: float | None = None,
        listener: Listener | None = None,
        publisher: Publisher | None = None,
        lease: float = 60.0,
        require_codes: bool = False,
    ) -> Purchase:
        """Buy and deliver: create an order, pay it from the balance, wait for it, and
        deliver its codes exactly once; return what happened.

        It is :meth:`Orders.create`, :meth:`Orders.pay`, :meth:`wait_for_completion` and
        :func:`~foxpoll.deliver_once`, in that order, and nothing else (``docs/buy.md``):

        - A create whose outcome is unknown is never paid: it has no id, so if it made an
          order, that order expires unpaid. ``buy`` creates again, once, on a fresh
          request, logs the first request (notes redacted) and tells the
          ``on_possible_orphan(error)`` of the client's listeners and ``listener`` (the
          metrics count ``foxpoll_possible_orphans_total``). A second unknown outcome
          raises its :class:`AmbiguousOrderError`: nothing was paid, so calling ``buy``
          again is safe.
        - ``pay`` writes the order's watch first, with a ``recovery_queue``; a payment of
          unknown outcome is never resent, and the wait reads the order to find out.
        - The wait runs on ``policy`` (the client's ``wait_policy`` when None). A stall
          is a result, not an error: with a ``recovery_queue`` the order is queued there
          for a :class:`~foxpoll.recovery.RecoveryWorker` (``recovering``); without one,
          nothing re-checks it but you.
        - A completed order goes through ``deliver_once(order, deliver, store)``; the
          completion event goes to ``publisher`` inside the same claim, and a failed or
          cancelled order's event once the wait ends.

        A process killed anywhere in here leaves either nothing paid, or a paid order
        watched in the recovery queue that a worker on the same ``store`` delivers, once.

        Args:
            items: 1-10 :class:`OrderItemRequest` objects or dicts
                (``{"itemId": ..., "quantity": 1}``), as for :meth:`Orders.create`.
            deliver: Sends the codes to your customer, as for ``deliver_once``.
            store: The dedup store shared with every worker (and the recovery worker).
            note: Note fields for every item that has no ``note`` of its own.
            is_mock: Create test orders.
            total_price: The price you expect to pay (the current price when None).
            policy: How to wait (:class:`WaitPolicy`); the client's ``wait_policy``.
            timeout: The wait's deadline in seconds, as for :meth:`wait_for_completion`.
            listener: Told of the wait's events, and of possible orphans.
            publisher: Gets one :class:`~foxpoll.events.OrderEvent` for the finished order.
            lease: The delivery claim's lease, as for ``deliver_once``.
            require_codes: Refuse a completed order without codes, as for ``deliver_once``.

        Returns:
            A :class:`Purchase`: delivered, already delivered, failed or cancelled (with
            the reason), or stalled (and whether recovery holds it).

        Raises:
            AmbiguousOrderError: two creates in a row had unknown outcomes; none was paid.
            APIStatusError: the API refused the create or the payment (balance, stock,
                price...); nothing was paid. Or a non-transient error ended the wait of a
                paid order, which its watch keeps.
            StoreError: the watch could not be written before paying (nothing was paid),
                the dedup store failed, or the publisher did.
            Exception: what ``deliver`` raised (its claim released); the recovery queue's
                delivery check finishes the order after its ``delivery_grace``.
            CodesMissing, DeliveryInProgress, LeaseLost: as ``wait_for_completion`` and
                ``deliver_once`` raise them.
        """
        # Refused before anything is bought: found after the wait, an order would be paid
        # and completed with nothing to deliver it.
        for name, function in (("deliver", deliver),
                               ("publisher.publish", getattr(publisher, "publish", None))):
            if _io.is_async(function):
                raise TypeError(f"{name} is async: give it to AsyncFoxReload.buy, or pass a "
                                "blocking one")
        steps = BuySteps(create=self.orders.create, pay=self.orders.pay,
                         wait=self.wait_for_completion, deliver_once=deliver_once,
                         run=functools.partial(_io.run, clock=self.clock, async_twin=_ASYNC_BUY))
        flow = self._buy_flow(
            steps, items, deliver=deliver, store=store, note=note, is_mock=is_mock,
            total_price=total_price, policy=policy, timeout=timeout, listener=listener,
            publisher=publisher, lease=lease, require_codes=require_codes)
        return _io.run(flow, clock=self.clock, async_twin=_ASYNC_BUY)

    def close(self) -> None:
        """Close the connection pool, if this client created it."""
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> FoxReload:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncFoxReload(BaseClient[httpx.AsyncClient, httpx.AsyncBaseTransport]):
    """The FoxReload API on asyncio: :class:`FoxReload` with ``await``. Its arguments are
    on ``__init__``.

    Build one inside each event loop and share it with all that loop's tasks: it belongs
    to the loop that first uses it.

    Attributes:
        orders: Create, pay, read and list orders (:class:`foxpoll.AsyncOrders`).
        products: The catalog: list, search, get (:class:`foxpoll.AsyncProducts`).
        categories: The catalog's categories (:class:`foxpoll.AsyncCategories`).
    """

    orders: AsyncOrders
    products: AsyncProducts
    categories: AsyncCategories

    _http: AsyncSender
    _gate: AsyncGate
    _runner: _AsyncRunner

    def _default_http_client(self) -> httpx.AsyncClient:
        return default_async_client(_LIMITS)

    def _make_gate(self, size: int) -> AsyncGate:
        return AsyncGate(size)

    def _client_sender(self, client: httpx.AsyncClient) -> AsyncSender:
        return AsyncClientSender(client)

    def _direct_sender(self, transport: httpx.AsyncBaseTransport) -> AsyncSender:
        return AsyncTransportSender(transport)

    _watches_in_thread = True

    def _bind_resources(self) -> None:
        self._runner = _AsyncRunner(self._runtime, self._http, self._gate, self._watcher)
        self.orders = AsyncOrders(self._runner)
        self.products = AsyncProducts(self._runner)
        self.categories = AsyncCategories(self._runner)

    async def wait_for_completion(
        self,
        order: str | Order,
        *,
        policy: WaitPolicy | None = None,
        timeout: float | None = None,
        raise_on_failure: bool = True,
        listener: Listener | None = None,
    ) -> Order:
        """See :meth:`FoxReload.wait_for_completion`; listener methods may be sync or
        async."""
        return await self._runner.run(self._wait_for_completion_flow(
            order, policy, timeout, raise_on_failure, listener))

    def wait_many(
        self,
        orders: Iterable[str | Order],
        *,
        policy: WaitPolicy | None = None,
        timeout: float | None = None,
        listener: Listener | None = None,
        max_in_flight: int | None = None,
        max_requests_per_minute: float | None = None,
    ) -> AsyncIterator[WaitResult]:
        """See :meth:`FoxReload.wait_many`; use with ``async for``. Up to
        ``max_in_flight`` polls run at once (the client's ``max_in_flight`` when None,
        whose slots every request of the client shares); listener methods may be sync
        or async."""
        flow = self._wait_many_flow(orders, policy, timeout, listener,
                                    max_requests_per_minute=max_requests_per_minute,
                                    max_in_flight=max_in_flight)
        return drive_stream_async(flow, self._http, self._runtime.clock, gate=self._gate)

    async def buy(
        self,
        items: Iterable[OrderItemRequest | Mapping[str, Any]],
        *,
        deliver: Callable[[Order], Any],
        store: AsyncDedupStore | DedupStore,
        note: Mapping[str, Any] | None = None,
        is_mock: bool = False,
        total_price: Decimal | float | int | str | None = None,
        policy: WaitPolicy | None = None,
        timeout: float | None = None,
        listener: Listener | None = None,
        publisher: AsyncPublisher | Publisher | None = None,
        lease: float = 60.0,
        require_codes: bool = False,
    ) -> Purchase:
        """See :meth:`FoxReload.buy`; ``deliver``, the publisher and the listeners'
        ``on_possible_orphan`` may be async, and it delivers with
        :func:`~foxpoll.adeliver_once`."""
        steps = BuySteps(create=self.orders.create, pay=self.orders.pay,
                         wait=self.wait_for_completion, deliver_once=adeliver_once,
                         run=functools.partial(_io.arun, clock=self.clock))
        flow = self._buy_flow(
            steps, items, deliver=deliver, store=store, note=note, is_mock=is_mock,
            total_price=total_price, policy=policy, timeout=timeout, listener=listener,
            publisher=publisher, lease=lease, require_codes=require_codes)
        return await _io.arun(flow, clock=self.clock)

    async def aclose(self) -> None:
        """:meth:`FoxReload.close`, for asyncio."""
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncFoxReload:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
