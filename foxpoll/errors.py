"""Every exception foxpoll raises, in one tree.

::

    FoxPollError
    ├── APIError
    │   ├── APIConnectionError
    │   │   └── APITimeoutError
    │   ├── APIStatusError                (.status_code, .body, .response, .detail, .code)
    │   │   ├── BadRequestError           400
    │   │   ├── AuthenticationError       401
    │   │   ├── PermissionDeniedError     403
    │   │   ├── NotFoundError             404
    │   │   ├── ConflictError             409
    │   │   ├── UnprocessableEntityError  422
    │   │   ├── RateLimitError            429 (.retry_after)
    │   │   └── InternalServerError       5xx
    │   ├── APIResponseValidationError    body not JSON, or not the expected shape
    │   │   ├── ResponseTooLarge          body past max_response_bytes, or past a bound of its work
    │   │   └── OrderMismatch             an order other than the one asked for
    │   └── AmbiguousOrderError           a create that may or may not have happened
    ├── OrderError                        (.order)
    │   ├── OrderFailed
    │   ├── OrderCancelled                (.cancel_reason)
    │   ├── OrderStalled                  (.attempts, .elapsed)
    │   └── CodesMissing                  completed, but no codes yet (polls_for_codes)
    └── StoreError                        a store, queue, budget or event stream failed
        ├── StoreUnavailable              its server not reached, or not in time
        │   └── BudgetUnavailable         a request budget's: also an APIConnectionError
        ├── DedupError                    a dedup store refused a step, or a record is corrupt
        │   ├── LeaseLost
        │   └── DeliveryInProgress        (.lease_until)
        ├── EventError                    a message on a stream is not an OrderEvent
        └── recovery.UnreadableJobs       queue rows that cannot be read (.unreadable, .jobs)

``DedupError`` and ``EventError`` sit under ``StoreError`` because a store raises every one
of them: ``except StoreError`` is the one handler for "the data layer said no, the order
itself is fine", and ``except StoreUnavailable`` the one for "try again when the server is
back", whichever store, queue, budget or stream it was.

Messages never contain the API key or delivered codes: status errors quote only the
``detail`` and ``code`` fields of an error body, validation errors name the offending
field and type but not its value (an ``OrderMismatch`` quotes the two order ids, cut
short).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import httpx

from .models import CancelReason, Order

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIResponseValidationError",
    "APIStatusError",
    "APITimeoutError",
    "AmbiguousOrderError",
    "AuthenticationError",
    "BadRequestError",
    "BudgetUnavailable",
    "CodesMissing",
    "ConflictError",
    "DedupError",
    "DeliveryInProgress",
    "EventError",
    "FoxPollError",
    "InternalServerError",
    "LeaseLost",
    "NotFoundError",
    "OrderCancelled",
    "OrderError",
    "OrderFailed",
    "OrderMismatch",
    "OrderStalled",
    "PermissionDeniedError",
    "RateLimitError",
    "ResponseTooLarge",
    "StoreError",
    "StoreUnavailable",
    "UnprocessableEntityError",
]


class FoxPollError(Exception):
    """Base class of every foxpoll exception."""


class APIError(FoxPollError):
    """A call to the FoxReload API did not produce the expected result.

    Attributes:
        request: The request that failed, when one was built.
    """

    def __init__(self, message: str, *, request: httpx.Request | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.request = request


class APIConnectionError(APIError):
    """The request could not be sent or no response arrived (DNS, refused, reset)."""


class APITimeoutError(APIConnectionError):
    """The request timed out (connect, read, write or pool), or the deadline ran out."""


class APIResponseValidationError(APIError):
    """The response body is not JSON, or is JSON of a shape foxpoll cannot read.

    Attributes:
        response: The offending response, when there was one.
    """

    def __init__(
        self,
        message: str,
        *,
        response: httpx.Response | None = None,
        request: httpx.Request | None = None,
    ) -> None:
        if request is None and response is not None:
            request = _request_of(response)
        super().__init__(message, request=request)
        self.response = response


class ResponseTooLarge(APIResponseValidationError):
    """The response body (decoded) passed the client's ``max_response_bytes``, so foxpoll
    stopped reading it; or it is under that cap but past a bound on the work of reading
    it (how many JSON values it holds, how deep they nest, an order's items or codes, a
    page's results: ``docs/bounds.md``), and foxpoll refused it before building it. The
    message names the bound. Not retried: the same server would send the same body."""


class OrderMismatch(APIResponseValidationError):
    """The response to a read or payment of one order is about another: its ``id`` is not,
    exactly, the id asked for (a buggy server, a cache or a proxy in between).

    The order in it is dropped, never returned: its codes would go out under the wrong
    dedup key. A wait counts it as a passing poll error, a recovery re-check as a failed
    one; a payment answered so is reconciled as an :class:`AmbiguousOrderError`. Each
    such answer is logged once, at WARNING, with this message.

    Attributes:
        requested: The order id asked for.
        received: The ``id`` the response carried.
    """

    def __init__(
        self,
        *,
        requested: str,
        received: str,
        response: httpx.Response | None = None,
        request: httpx.Request | None = None,
    ) -> None:
        super().__init__(
            f"asked for order {_short_id(requested)}, the response is about order "
            f"{_short_id(received)}; it was dropped",
            response=response, request=request,
        )
        self.requested = requested
        self.received = received


class APIStatusError(APIError):
    """The API answered with an error status: 4xx, 5xx, or a redirect (3xx), which foxpoll
    never follows, so that the API key never goes to another address.

    Attributes:
        status_code: The HTTP status.
        body: The decoded JSON body, or the text when it was not JSON, or None.
        response: The :class:`httpx.Response`.
        detail: The body's ``detail`` field, when present.
        code: The body's ``code`` field (for example ``BALANCE_NOT_ENOUGH``), when present.
    """

    def __init__(self, response: httpx.Response, body: object) -> None:
        self.status_code = response.status_code
        self.response = response
        self.body = body
        fields: Mapping[str, Any] = body if isinstance(body, Mapping) else {}
        self.detail = _short_text(fields.get("detail"))
        self.code = _short_text(fields.get("code"))
        request = _request_of(response)
        where = f" for {request.method} {request.url.path}" if request is not None else ""
        message = f"HTTP {response.status_code}{where}"
        if self.code:
            message += f" [{self.code}]"
        if self.detail:
            message += f": {self.detail}"
        if 300 <= response.status_code < 400:
            target = httpx.URL(response.headers.get("location", "")).host or "elsewhere"
            message += (f": redirected to {target}; foxpoll follows no redirect (the API "
                        "key would go along): set base_url to the API's own address")
        super().__init__(message, request=request)


class BadRequestError(APIStatusError):
    """400: the request was malformed."""


class AuthenticationError(APIStatusError):
    """401: the API key is missing, wrong, or not allowed from this address."""


class PermissionDeniedError(APIStatusError):
    """403: the key may not do this."""


class NotFoundError(APIStatusError):
    """404: no such order, product or category."""


class ConflictError(APIStatusError):
    """409: the request conflicts with the resource's state (for example out of stock)."""


class UnprocessableEntityError(APIStatusError):
    """422: the body was understood but rejected (validation, price mismatch)."""


class RateLimitError(APIStatusError):
    """429: too many requests.

    Attributes:
        retry_after: Seconds the server asked us to wait, when it said.
    """

    def __init__(
        self, response: httpx.Response, body: object, *, retry_after: float | None = None
    ) -> None:
        super().__init__(response, body)
        self.retry_after = retry_after


class InternalServerError(APIStatusError):
    """5xx: the server failed."""


class AmbiguousOrderError(APIError):
    """A create-order request may have reached the server, and its outcome is unknown.

    FoxReload has no idempotency key, so foxpoll never sends the POST a second time: that
    could create, charge and fulfil a second order. Reconcile instead, for example by
    listing recent orders, before deciding to create again.

    Attributes:
        request_body: The JSON body that was sent, to match against the order history.
        cause: What went wrong after sending (a timeout, reset or 5xx status error).
    """

    def __init__(
        self,
        *,
        request_body: Mapping[str, Any],
        cause: BaseException,
        request: httpx.Request | None = None,
    ) -> None:
        what = f"{request.method} {request.url.path}" if request is not None else "the write"
        super().__init__(
            f"outcome of {what} is unknown: it may have reached FoxReload "
            f"({type(cause).__name__}); it was not resent, reconcile before trying again",
            request=request,
        )
        self.request_body = request_body
        self.cause = cause


class OrderError(FoxPollError):
    """An order reached an outcome other than ``completed``.

    Attributes:
        order: The order as last seen.
    """

    def __init__(self, message: str, *, order: Order) -> None:
        super().__init__(message)
        self.order = order


class OrderFailed(OrderError):
    """Fulfilment failed; per-item reasons are in ``order.items[i].error``."""

    def __init__(self, order: Order) -> None:
        # The items' own reasons, each once and kept short: the message is logged.
        reasons = list(dict.fromkeys(i.error for i in order.items if i.error))
        said = "; ".join(reason[:200] for reason in reasons[:3])
        super().__init__(f"order {order.id} failed" + (f": {said}" if said else ""),
                         order=order)


class OrderCancelled(OrderError):
    """The order was cancelled.

    Attributes:
        cancel_reason: Why, when FoxReload said.
    """

    def __init__(self, order: Order) -> None:
        self.cancel_reason: CancelReason | None = order.cancel_reason
        reason = f" ({order.cancel_reason.value})" if order.cancel_reason else ""
        super().__init__(f"order {order.id} was cancelled{reason}", order=order)


class CodesMissing(OrderError):
    """The order is ``completed`` but carries no codes, and codes were required.

    Top-ups credited to a player id complete without codes; gift cards and eSIMs should
    not. Asked for with ``WaitPolicy(polls_for_codes=N)`` (``wait_for_completion``,
    ``wait_many``) or ``deliver_once(require_codes=True)``, this is raised instead of
    delivering nothing.
    """

    def __init__(self, order: Order) -> None:
        super().__init__(f"order {order.id} is completed but has no codes", order=order)


class OrderStalled(OrderError):
    """The order did not reach a terminal status within the attempts or the deadline.

    It may still complete: hand it to a recovery queue rather than giving up on it.

    Attributes:
        order: The order as last seen (None when it was never seen at all).
        attempts: Polls made.
        elapsed: Seconds spent waiting.
    """

    def __init__(
        self, order_id: str, *, order: Order | None, attempts: int, elapsed: float
    ) -> None:
        status = order.status.value if order is not None else "never seen"
        FoxPollError.__init__(
            self,
            f"order {order_id} still {status} after {attempts} polls in {elapsed:.1f}s",
        )
        self.order_id = order_id
        self.order = order  # type: ignore[assignment]  # None only when never seen
        self.attempts = attempts
        self.elapsed = elapsed


class StoreError(FoxPollError):
    """A dedup store, recovery queue, request budget or event stream failed."""


class StoreUnavailable(StoreError):
    """A store, queue, budget or stream could not be reached, or did not answer within its
    timeouts. Try again when its server is back; what a call left undone is said where
    the call is documented (``deliver_once``: nothing was delivered)."""


class BudgetUnavailable(StoreUnavailable, APIConnectionError):
    """A request budget (:mod:`foxpoll.ratelimit`) could not be reached, or did not answer
    in time, so the request that needed its permit was not sent. It is also an
    :class:`APIConnectionError`, the error of a request that never left: a wait counts it
    as a passing error, on its error budget. A single call (``orders.get``, a catalog
    read) raises it at once, without retrying: its ``max_retries`` are for requests that
    were sent, and the budget's own timeout has already been waited."""


class DedupError(StoreError):
    """A dedup store refused a delivery step, or holds a record it cannot read."""


class LeaseLost(DedupError):
    """The claim's token no longer owns the record: another worker took it over."""


class DeliveryInProgress(DedupError):
    """Another worker holds a live claim on this order.

    Attributes:
        lease_until: When that claim expires (store clock, seconds since the epoch).
    """

    def __init__(self, order_id: str, *, lease_until: float) -> None:
        super().__init__(f"order {order_id} is being delivered by another worker")
        self.order_id = order_id
        self.lease_until = lease_until


class EventError(StoreError):
    """A message read from an event stream is not an :class:`~foxpoll.events.OrderEvent`
    (its text is never quoted: it may hold codes)."""


@contextmanager
def unavailable_on(what: str, *kinds: type[BaseException],
                   when: Callable[[BaseException], bool] | None = None) -> Iterator[None]:
    """Turn a driver's errors of ``kinds`` (a server not reached, or not in time), raised
    inside, into :class:`StoreUnavailable`; with ``when``, only those it says yes to
    (others pass as they are). The message names ``what`` and the error's type, never
    its text, which may quote a connection string."""
    try:
        yield
    except kinds as exc:
        if when is not None and not when(exc):
            raise
        raise StoreUnavailable(f"{what} is unavailable: {type(exc).__name__}") from exc


#: Codes of Redis error replies that redis-py gives no class of their own, and that mean
#: the server is not serving now, not that it refuses the command for good: UNBLOCKED, a
#: blocking read cut short when the server became a replica (a failover); BUSY, a script
#: running past its time limit; MISCONF, writes refused while snapshots fail; NOREPLICAS,
#: writes refused while too few replicas are connected.
_REDIS_OUTAGE_CODES = frozenset({"UNBLOCKED", "BUSY", "MISCONF", "NOREPLICAS"})


def is_redis_outage(exc: BaseException) -> bool:
    """Whether redis-py's ``exc`` means "Redis is not serving now; try again later": what
    every Redis store, queue, budget and stream raises as :class:`StoreUnavailable`.

    - ``ConnectionError`` (``BusyLoadingError``: a server still loading its data after a
      restart; ``MaxClientsReachedError``), ``TimeoutError``: not reached, or not in time.
    - ``ReadOnlyError``: the server was demoted to a replica (a Sentinel failover) and
      refuses writes until the client reaches the new master.
    - ``OutOfMemoryError``: the server is at ``maxmemory`` and refuses writes until
      memory is freed or raised.
    - ``TryAgainError``, ``ClusterDownError`` (``MasterDownError``): a cluster moving
      slots, or without a master for them; a replica that lost its master.
    - A reply coded ``UNBLOCKED``, ``BUSY``, ``MISCONF`` or ``NOREPLICAS``.

    Every other ``ResponseError`` (a key of the wrong type, a missing permission, an
    unknown command) is a refusal that retrying will not change.
    """
    from redis import exceptions as redis_errors  # redis is an optional extra

    if isinstance(exc, (redis_errors.ConnectionError, redis_errors.TimeoutError,
                        redis_errors.ReadOnlyError, redis_errors.OutOfMemoryError,
                        redis_errors.TryAgainError, redis_errors.ClusterDownError)):
        return True
    return (isinstance(exc, redis_errors.ResponseError)
            and str(exc).split(" ", 1)[0] in _REDIS_OUTAGE_CODES)


_STATUS_ERRORS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    422: UnprocessableEntityError,
    429: RateLimitError,
}


def status_error_for(
    response: httpx.Response, body: object, *, retry_after: float | None = None
) -> APIStatusError:
    """Build the exception for an error status: the subclass keyed by the code, else by range."""
    if response.status_code == 429:
        return RateLimitError(response, body, retry_after=retry_after)
    cls = _STATUS_ERRORS.get(response.status_code)
    if cls is None:
        cls = InternalServerError if response.status_code >= 500 else APIStatusError
    return cls(response, body)


def _request_of(response: httpx.Response) -> httpx.Request | None:
    try:
        return response.request
    except RuntimeError:  # a Response built by hand has no request
        return None


def _short_id(value: str) -> str:
    """An id for a message: quoted, so that ``"o1 "`` shows its space, its control
    characters escaped, and bounded (the server chose it)."""
    return repr(value if len(value) <= 80 else value[:77] + "...")


def _short_text(value: object) -> str | None:
    """A body field for a message: strings only, bounded, so a huge body stays out of logs."""
    if not isinstance(value, str) or not value:
        return None
    return value if len(value) <= 300 else value[:297] + "..."
