from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

import foxpoll
from foxpoll import errors
from foxpoll.errors import status_error_for

from .conftest import API_KEY


def response(code: int, body: Any = None, text: str | None = None) -> httpx.Response:
    request = httpx.Request("GET", "https://x.test/api/orders/1", headers={"X-API-Key": API_KEY})
    if text is not None:
        return httpx.Response(code, text=text, request=request)
    return httpx.Response(code, json=body, request=request)


@pytest.mark.parametrize(
    ("code", "cls"),
    [(400, errors.BadRequestError), (401, errors.AuthenticationError),
     (403, errors.PermissionDeniedError), (404, errors.NotFoundError),
     (409, errors.ConflictError), (422, errors.UnprocessableEntityError),
     (429, errors.RateLimitError), (500, errors.InternalServerError),
     (502, errors.InternalServerError), (503, errors.InternalServerError),
     (402, errors.APIStatusError), (418, errors.APIStatusError)],
)
def test_status_codes_pick_their_class(code: int, cls: type[errors.APIStatusError]) -> None:
    error = status_error_for(response(code, {"detail": "d"}), {"detail": "d"})
    assert type(error) is cls
    assert error.status_code == code
    assert isinstance(error, errors.APIError)
    assert isinstance(error, errors.FoxPollError)


def test_detail_and_code_are_exposed_and_in_the_message() -> None:
    body = {"detail": "Insufficient balance", "code": "BALANCE_NOT_ENOUGH"}
    error = status_error_for(response(402, body), body)
    assert error.detail == "Insufficient balance"
    assert error.code == "BALANCE_NOT_ENOUGH"
    assert error.body == body
    assert str(error) == "HTTP 402 for GET /api/orders/1 [BALANCE_NOT_ENOUGH]: Insufficient balance"


@pytest.mark.parametrize("body", [None, "plain text", ["list"], {"detail": 5}, {"code": None}])
def test_odd_error_bodies_are_tolerated(body: Any) -> None:
    error = status_error_for(response(500, body), body)
    assert error.detail is None
    assert str(error) == "HTTP 500 for GET /api/orders/1"


def test_huge_detail_is_truncated() -> None:
    body = {"detail": "x" * 10_000}
    assert len(str(status_error_for(response(400, body), body))) < 400


def test_tree_shape() -> None:
    assert issubclass(errors.APITimeoutError, errors.APIConnectionError)
    assert issubclass(errors.AmbiguousOrderError, errors.APIError)
    assert issubclass(errors.APIResponseValidationError, errors.APIError)
    for cls in (errors.OrderFailed, errors.OrderCancelled, errors.OrderStalled):
        assert issubclass(cls, errors.OrderError)
    for cls in (errors.LeaseLost, errors.DeliveryInProgress):
        assert issubclass(cls, errors.DedupError)
    for cls in (errors.StoreUnavailable, errors.DedupError, errors.EventError):
        assert issubclass(cls, errors.StoreError)
    # Neutral: a queue, budget or stream that cannot reach its server is not a dedup error.
    assert not issubclass(errors.StoreUnavailable, errors.DedupError)
    assert not issubclass(errors.OrderError, errors.APIError)


def test_the_tree_in_the_docstring_is_the_class_tree() -> None:
    drawn: dict[str, str] = {}
    parents: list[str] = []
    for line in (errors.__doc__ or "").splitlines():
        found = re.match(r"^    ([│├└─ ]*)([A-Z]\w+)", line)
        if found is None:
            continue
        depth = len(found.group(1)) // 4
        del parents[depth:]
        if parents:
            drawn[found.group(2)] = parents[-1]
        parents.append(found.group(2))
    real = {name: getattr(errors, name).__bases__[0].__name__ for name in errors.__all__
            if name[0].isupper() and name != "FoxPollError"}
    assert drawn == real


def test_every_error_class_is_exported_from_the_package() -> None:
    for name in errors.__all__:
        if name[0].isupper():
            assert getattr(foxpoll, name) is getattr(errors, name)


def test_the_tree_in_the_docstring_names_every_class() -> None:
    doc = errors.__doc__ or ""
    for name in errors.__all__:
        if name[0].isupper():
            assert name in doc, name


def test_order_errors_carry_the_order() -> None:
    from foxpoll._parse import parse
    from foxpoll.models import Order

    cancelled = parse({"id": "o1", "status": "cancelled", "cancelReason": "user_request"}, Order)
    error = errors.OrderCancelled(cancelled)
    assert error.order is cancelled
    assert error.cancel_reason == "user_request"
    assert str(error) == "order o1 was cancelled (user_request)"
    failed = parse({"id": "o2", "status": "failed"}, Order)
    assert str(errors.OrderFailed(failed)) == "order o2 failed"
    stalled = errors.OrderStalled("o3", order=None, attempts=40, elapsed=1200.0)
    assert (stalled.attempts, stalled.elapsed, stalled.order) == (40, 1200.0, None)
    assert "never seen" in str(stalled)


def test_a_failed_order_s_message_says_why() -> None:
    from foxpoll._parse import parse
    from foxpoll.models import Order

    failed = parse({"id": "o3", "status": "failed", "items": [
        {"itemId": "a", "quantity": 1, "error": "supplier out of stock"},
        {"itemId": "b", "quantity": 1, "error": "supplier out of stock"},
        {"itemId": "c", "quantity": 1, "error": "x" * 5000},
        {"itemId": "d", "quantity": 1}]}, Order)
    message = str(errors.OrderFailed(failed))
    assert message.startswith("order o3 failed: supplier out of stock; xxx")
    assert message.count("supplier out of stock") == 1  # each reason once
    assert len(message) < 300  # kept short: messages are logged


@pytest.mark.parametrize(("kind", "cls", "said"), [
    (httpx.ConnectError, errors.APIConnectionError, "connection failed (ConnectError)"),
    (httpx.ReadTimeout, errors.APITimeoutError, "request timed out (ReadTimeout)"),
])
def test_a_network_error_names_the_server_but_not_the_query_or_key(
    kind: type[httpx.TransportError], cls: type[errors.APIError], said: str
) -> None:
    import respx

    from foxpoll import FoxReload

    base_url = "https://api.test:8443"  # one with user info is refused (test_wire_hygiene)
    with respx.mock(base_url=base_url) as mock:
        mock.get("/api/products/").mock(side_effect=kind("down"))
        with FoxReload(API_KEY, base_url=base_url, max_retries=0) as client, \
                pytest.raises(cls) as info:
            client.products.list(category="secret-category")
    message = str(info.value)
    assert message.startswith(f"{said} for GET https://api.test:8443/api/products/")
    assert "secret-category" not in message
    assert API_KEY not in message
