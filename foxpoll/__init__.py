"""foxpoll: buy from FoxReload, wait for orders without webhooks, deliver codes exactly once."""

import logging as _logging

from ._client import AsyncFoxReload, FoxReload
from ._clock import Clock, SystemClock
from ._version import __version__
from .delivery import DeliveryResult, adeliver_once, current_lease, deliver_once
from .errors import (
    AmbiguousOrderError,
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    CodesMissing,
    ConflictError,
    DedupError,
    DeliveryInProgress,
    FoxPollError,
    InternalServerError,
    LeaseLost,
    NotFoundError,
    OrderCancelled,
    OrderError,
    OrderFailed,
    OrderStalled,
    PermissionDeniedError,
    RateLimitError,
    ResponseTooLarge,
    StoreUnavailable,
    UnprocessableEntityError,
)
from .models import (
    CancelReason,
    Category,
    Code,
    Order,
    OrderItem,
    OrderItemRequest,
    OrderStatus,
    Page,
    Product,
)
from .polling import PollAttempt, StatusChange, WaitResult

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIResponseValidationError",
    "APIStatusError",
    "APITimeoutError",
    "AmbiguousOrderError",
    "AsyncFoxReload",
    "AuthenticationError",
    "BadRequestError",
    "CancelReason",
    "Category",
    "Clock",
    "Code",
    "CodesMissing",
    "ConflictError",
    "DedupError",
    "DeliveryInProgress",
    "DeliveryResult",
    "FoxPollError",
    "FoxReload",
    "InternalServerError",
    "LeaseLost",
    "NotFoundError",
    "Order",
    "OrderCancelled",
    "OrderError",
    "OrderFailed",
    "OrderItem",
    "OrderItemRequest",
    "OrderStalled",
    "OrderStatus",
    "Page",
    "PermissionDeniedError",
    "PollAttempt",
    "Product",
    "RateLimitError",
    "ResponseTooLarge",
    "StatusChange",
    "StoreUnavailable",
    "SystemClock",
    "UnprocessableEntityError",
    "WaitResult",
    "__version__",
    "adeliver_once",
    "current_lease",
    "deliver_once",
]

# A library logs, the application decides where it goes (and nothing reaches stderr unasked).
_logging.getLogger("foxpoll").addHandler(_logging.NullHandler())
