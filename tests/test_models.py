from __future__ import annotations

import contextlib
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from foxpoll import APIResponseValidationError, CancelReason, Order, OrderStatus, Product
from foxpoll._parse import parse, parse_page
from foxpoll.models import Category, converter

COMPLETED = {
    "id": "2b1e0b5c-6f0e-4a53-9d70-3f4a3f4a1c2d",
    "status": "completed",
    "items": [
        {"itemId": "p1", "quantity": 2, "note": {"player_id": "42"},
         "externalData": ["AAAA-BBBB", {"code": "CCCC", "pin": "1234"}], "error": None},
        {"itemId": "p2", "quantity": 1, "externalData": ["DDDD"]},
    ],
    "cancelReason": None,
    "paymentExpiresAt": "2026-11-27T12:00:00Z",
    "isMock": True,
    "totalPrice": 21.5,
    "createdAt": "2026-11-27T11:45:00Z",
    "supplierRef": {"batch": 7},
}


def test_completed_order_reads_every_documented_field() -> None:
    order = parse(COMPLETED, Order)
    assert order.id == COMPLETED["id"]
    assert order.status is OrderStatus.COMPLETED
    assert order.is_terminal
    assert order.is_mock is True
    assert order.total_price == Decimal("21.5")
    assert order.payment_expires_at == "2026-11-27T12:00:00Z"
    assert order.items[0].item_id == "p1"
    assert order.items[0].quantity == 2
    assert order.items[0].note == {"player_id": "42"}


def test_codes_flatten_strings_and_objects_in_item_order() -> None:
    order = parse(COMPLETED, Order)
    assert order.codes == ("AAAA-BBBB", {"code": "CCCC", "pin": "1234"}, "DDDD")
    assert order.items[1].codes == ("DDDD",)


def test_codes_are_empty_before_completion() -> None:
    order = parse({"id": "x", "status": "processing",
                   "items": [{"itemId": "p", "externalData": None}]}, Order)
    assert order.codes == ()


def test_unknown_fields_are_kept_in_raw() -> None:
    order = parse(COMPLETED, Order)
    assert order.raw["supplierRef"] == {"batch": 7}
    assert order.raw == COMPLETED


@pytest.mark.parametrize("raw_value", ["server's own", {"nested": 1}, None, ["a"]])
def test_a_server_field_named_raw_stays_a_field_of_raw(raw_value: Any) -> None:
    item = {"itemId": "p", "raw": raw_value, "\x00raw": 5}
    payload = {"id": "x", "status": "active", "items": [item], "raw": raw_value, "\x00raw": 5}
    order = parse(payload, Order)
    assert order.raw == payload
    assert order.raw["raw"] == raw_value
    assert order.items[0].raw == item
    assert parse({"id": "p", "raw": raw_value}, Product).raw == {"id": "p", "raw": raw_value}
    assert parse({"id": "c", "raw": raw_value}, Category).raw == {"id": "c", "raw": raw_value}


def test_raw_is_a_copy_of_the_payload() -> None:
    payload = {"id": "x", "status": "active", "extra": 1}
    order = parse(payload, Order)
    payload["extra"] = 2
    assert order.raw["extra"] == 1


@pytest.mark.parametrize("value", ["on_hold", "REVIEW", "pending-kyc"])
def test_unknown_status_parses_and_is_not_terminal(value: str) -> None:
    order = parse({"id": "x", "status": value}, Order)
    assert isinstance(order.status, OrderStatus)
    assert order.status.value == value
    assert not order.status.is_known
    assert not order.is_terminal


def test_status_matching_ignores_case() -> None:
    assert parse({"id": "x", "status": "Completed"}, Order).status is OrderStatus.COMPLETED


@pytest.mark.parametrize(
    ("status", "terminal"),
    [("active", False), ("paid", False), ("processing", False),
     ("completed", True), ("cancelled", True), ("failed", True)],
)
def test_terminal_statuses(status: str, terminal: bool) -> None:
    assert OrderStatus(status).is_terminal is terminal


def test_status_str_is_its_value() -> None:
    assert str(OrderStatus.PAID) == "paid"
    assert f"{OrderStatus('weird')}" == "weird"


def test_cancel_reason_known_and_unknown() -> None:
    order = parse({"id": "x", "status": "cancelled", "cancelReason": "payment_expiration"}, Order)
    assert order.cancel_reason is CancelReason.PAYMENT_EXPIRATION
    odd = parse({"id": "x", "status": "cancelled", "cancelReason": "fraud_check"}, Order)
    assert odd.cancel_reason is not None
    assert odd.cancel_reason.value == "fraud_check"


def test_repr_hides_codes_and_notes() -> None:
    text = repr(parse(COMPLETED, Order))
    for secret in ("AAAA-BBBB", "CCCC", "1234", "DDDD", "42"):
        assert secret not in text
    assert "<redacted>" in text
    assert COMPLETED["id"] in text


@pytest.mark.parametrize(
    ("payload", "where"),
    [
        ({"status": "active"}, "$.id"),
        ({"id": 7, "status": "active"}, "$.id"),
        ({"id": "x", "status": 3}, "$.status"),
        ({"id": "x", "status": "active", "items": "nope"}, "$.items"),
        ({"id": "x", "status": "active", "items": [{"itemId": "a"}, {"quantity": 1}]},
         "$.items[1].itemId"),
        ({"id": "x", "status": "completed",
          "items": [{"itemId": "a", "externalData": ["ok", None]}]},
         "$.items[0].externalData[1]"),
        ({"id": "x", "status": "active", "totalPrice": "lots"}, "$.totalPrice"),
        ({"id": "x", "status": "active", "isMock": "yes"}, "$.isMock"),
    ],
)
def test_bad_shapes_name_the_field(payload: dict[str, Any], where: str) -> None:
    with pytest.raises(APIResponseValidationError) as info:
        parse(payload, Order)
    assert f"at {where}:" in str(info.value)


def test_validation_message_does_not_quote_values() -> None:
    payload = {"id": "x", "status": "completed",
               "items": [{"itemId": "a", "externalData": "SECRET-CODE-123"}]}
    with pytest.raises(APIResponseValidationError) as info:
        parse(payload, Order)
    assert "SECRET-CODE-123" not in str(info.value)


def test_numeric_codes_are_kept_as_text() -> None:
    order = parse({"id": "x", "status": "completed",
                   "items": [{"itemId": "a", "externalData": [123456]}]}, Order)
    assert order.codes == ("123456",)


def test_product_reads_camel_case() -> None:
    product = parse({"id": "p", "name": "Steam", "categoryId": "c1", "price": "10.50",
                     "orderMinQuantity": 1, "orderMaxQuantity": 5,
                     "requiredNoteFields": ["player_id"], "noteFieldTypes": {"a": "b"}}, Product)
    assert product.category_id == "c1"
    assert product.price == Decimal("10.50")
    assert product.required_note_fields == ("player_id",)
    assert product.order_max_quantity == 5
    assert product.note_field_types == {"a": "b"}


def test_pages_offset_and_cursor() -> None:
    page = parse_page({"items": [{"id": "p"}], "limit": 1, "offset": 0, "total": 3}, Product)
    assert page.has_more
    assert page.items[0].id == "p"
    last = parse_page({"items": [{"id": "c"}], "limit": 5, "nextCursor": None}, Category)
    assert not last.has_more
    cursor = parse_page({"items": [], "limit": 5, "nextCursor": "abc"}, Category)
    assert cursor.has_more
    assert cursor.next_cursor == "abc"


def test_bare_list_is_one_page() -> None:
    assert parse_page([{"id": "c"}], Category).items[0].id == "c"


@pytest.mark.parametrize("bad", [{"limit": 1}, {"items": [], "total": "3"}, "x", None])
def test_bad_pages(bad: Any) -> None:
    with pytest.raises(APIResponseValidationError):
        parse_page(bad, Product)


def test_order_item_request_unstructures_to_camel_case() -> None:
    from foxpoll import OrderItemRequest

    assert converter.unstructure(OrderItemRequest("p", 3, {"player_id": "9"})) == {
        "itemId": "p", "quantity": 3, "note": {"player_id": "9"}
    }
    assert "9" not in repr(OrderItemRequest("p", 3, {"player_id": "9"}))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=20,
)
order_keys = st.sampled_from(
    ["id", "status", "items", "cancelReason", "paymentExpiresAt", "isMock", "totalPrice",
     "itemId", "quantity", "note", "externalData", "error", "currency"]
)
order_like = st.recursive(
    json_values,
    lambda children: st.dictionaries(order_keys | st.text(max_size=6), children, max_size=8)
    | st.lists(children, max_size=3),
    max_leaves=30,
)


@given(order_like)
def test_any_json_parses_or_raises_validation_error(data: Any) -> None:
    for kind in (Order, Product, Category):
        with contextlib.suppress(APIResponseValidationError):
            parse(data, kind)


@given(order_like)
def test_any_json_page_parses_or_raises_validation_error(data: Any) -> None:
    with contextlib.suppress(APIResponseValidationError):
        parse_page(data, Order)


codes = st.lists(
    st.text(min_size=1, max_size=12)
    | st.dictionaries(st.sampled_from(["code", "pin", "serial"]), st.text(max_size=6), min_size=1),
    max_size=3,
)
items = st.fixed_dictionaries(
    {"itemId": st.text(min_size=1, max_size=10), "quantity": st.integers(1, 10)},
    optional={"externalData": codes | st.none(), "error": st.text(max_size=10) | st.none(),
              "note": st.dictionaries(st.text(max_size=5), st.text(max_size=5))},
)
valid_orders = st.fixed_dictionaries(
    {"id": st.uuids().map(str), "status": st.text(min_size=1, max_size=12),
     "items": st.lists(items, max_size=10)},
    optional={"totalPrice": st.decimals(min_value=0, max_value=10**6, places=2).map(str),
              "isMock": st.booleans(), "cancelReason": st.none() | st.text(min_size=1),
              "extraField": json_values},
)


@given(valid_orders)
def test_valid_orders_keep_every_code_and_field(data: dict[str, Any]) -> None:
    order = parse(data, Order)
    expected = [c for item in data["items"] for c in (item.get("externalData") or [])]
    assert list(order.codes) == expected
    assert order.raw == data
    assert order.status.value.strip().lower() == data["status"].strip().lower() or (
        order.status.value == data["status"]
    )
