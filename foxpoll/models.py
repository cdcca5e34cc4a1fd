"""The FoxReload resources as frozen attrs classes, and the one converter that reads them.

The API is only partly documented, so reading is tolerant: unknown fields are kept in
``raw``, an unknown status parses (as a non-terminal :class:`OrderStatus`), and delivered
codes may be strings or objects. :mod:`foxpoll._parse` reads a response's JSON with
this module's converter, and turns anything it cannot read into
:class:`~foxpoll.errors.APIResponseValidationError` and nothing else.

Codes and notes are secrets: they never appear in a ``repr``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any, Generic, TypeVar

import attrs
import cattrs
from cattrs.errors import IterableValidationNote
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

__all__ = [
    "CancelReason",
    "Category",
    "Code",
    "Order",
    "OrderItem",
    "OrderItemRequest",
    "OrderStatus",
    "Page",
    "Product",
    "converter",
]

T = TypeVar("T")

#: One delivered code: a plain string, or an object such as ``{"code": ..., "pin": ...}``.
Code = str | Mapping[str, Any]

_REDACTED = "<redacted>"


def _redact(value: object) -> str:
    return "None" if value is None else _REDACTED


class _TolerantEnum(str, enum.Enum):
    """A str enum that accepts values it does not know, as pseudo-members.

    The pseudo-member keeps the server's value, so nothing is lost and callers can log it,
    while ``is_known`` tells them foxpoll did not recognise it.
    """

    @classmethod
    def _missing_(cls, value: object) -> Any:
        if not isinstance(value, str):
            return None
        folded = value.strip().lower()
        if folded in cls._value2member_map_:
            return cls._value2member_map_[folded]
        member = str.__new__(cls, value)
        member._name_ = "UNKNOWN"
        member._value_ = value
        return member

    @property
    def is_known(self) -> bool:
        """Whether this is one of the documented values."""
        return self._value_ in type(self)._value2member_map_

    def __repr__(self) -> str:
        return f"<{type(self).__name__}.{self._name_}: {self._value_!r}>"

    def __str__(self) -> str:
        return str(self._value_)


class OrderStatus(_TolerantEnum):
    """Where an order is in its lifecycle: active → paid → processing → a terminal status."""

    ACTIVE = "active"
    PAID = "paid"
    PROCESSING = "processing"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"

    @property
    def is_terminal(self) -> bool:
        """True for completed, cancelled and failed; an unknown status is not terminal."""
        return self in _TERMINAL


_TERMINAL = frozenset({OrderStatus.COMPLETED, OrderStatus.CANCELLED, OrderStatus.FAILED})


class CancelReason(_TolerantEnum):
    """Why an order was cancelled."""

    PAYMENT_FAILURE = "payment_failure"
    PAYMENT_EXPIRATION = "payment_expiration"
    USER_REQUEST = "user_request"


@attrs.frozen
class OrderItem:
    """One line of an order.

    Attributes:
        item_id: The product id.
        quantity: How many.
        note: Product-specific fields (player id, phone number...). Redacted in repr.
        external_data: Delivered codes, once the order is completed; None before.
            Redacted in repr.
        error: Why this item failed, on failed items.
        raw: The item as received, unknown fields included. Redacted in repr.
    """

    item_id: str
    quantity: int = 1
    note: Mapping[str, Any] | None = attrs.field(default=None, repr=_redact)
    external_data: tuple[Code, ...] | None = attrs.field(default=None, repr=_redact)
    error: str | None = None
    raw: Mapping[str, Any] = attrs.field(factory=dict, repr=False, eq=False)

    @property
    def codes(self) -> tuple[Code, ...]:
        """The delivered codes of this item; empty until it is completed."""
        return self.external_data or ()


@attrs.frozen
class Order:
    """A FoxReload order.

    Attributes:
        id: The order id (a UUID string).
        status: The lifecycle status; unknown values parse and are not terminal.
        items: The order lines.
        cancel_reason: Why it was cancelled, for cancelled orders.
        payment_expires_at: When an unpaid order expires, as sent (ISO 8601 text).
        is_mock: A test order.
        total_price: The order total.
        currency: The currency, when sent.
        created_at: Creation time, when sent (ISO 8601 text).
        updated_at: Last change, when sent (ISO 8601 text).
        raw: The order as received, unknown fields included. Redacted in repr.
    """

    id: str
    status: OrderStatus
    items: tuple[OrderItem, ...] = ()
    cancel_reason: CancelReason | None = None
    payment_expires_at: str | None = None
    is_mock: bool = False
    total_price: Decimal | None = None
    currency: str | None = None
    created_at: str | None = None
    updated_at: str | None = None
    raw: Mapping[str, Any] = attrs.field(factory=dict, repr=False, eq=False)

    @property
    def codes(self) -> tuple[Code, ...]:
        """Every delivered code of every item, in item order."""
        return tuple(code for item in self.items for code in item.codes)

    @property
    def is_terminal(self) -> bool:
        """Whether the order will never change again."""
        return self.status.is_terminal


@attrs.frozen
class OrderItemRequest:
    """One line of a create-order request.

    Attributes:
        item_id: The product id to buy.
        quantity: How many (the product's ``order_min_quantity``..``order_max_quantity``).
        note: The fields the product lists in ``required_note_fields``. Redacted in repr.
    """

    item_id: str
    quantity: int = 1
    note: Mapping[str, Any] | None = attrs.field(default=None, repr=_redact)


@attrs.frozen
class Product:
    """A product that can be ordered."""

    id: str
    name: str | None = None
    slug: str | None = None
    category_id: str | None = None
    description: str | None = None
    attributes: Any = None
    price: Decimal | None = None
    currency: str | None = None
    quantity: int | None = None
    order_min_quantity: int | None = None
    order_max_quantity: int | None = None
    required_note_fields: tuple[str, ...] = ()
    note_field_options: Any = None
    note_field_types: Any = None
    raw: Mapping[str, Any] = attrs.field(factory=dict, repr=False, eq=False)


@attrs.frozen
class Category:
    """A product category."""

    id: str
    name: str | None = None
    slug: str | None = None
    parent_id: str | None = None
    raw: Mapping[str, Any] = attrs.field(factory=dict, repr=False, eq=False)


@attrs.frozen
class Page(Generic[T]):
    """One page of a listing.

    Offset-paginated listings fill ``offset`` and ``total``; cursor-paginated ones fill
    ``next_cursor`` (None on the last page).
    """

    items: tuple[T, ...]
    limit: int | None = None
    offset: int | None = None
    total: int | None = None
    next_cursor: str | None = None
    raw: Mapping[str, Any] = attrs.field(factory=dict, repr=False, eq=False)

    @property
    def has_more(self) -> bool:
        """Whether another page follows, by cursor or by offset."""
        if self.next_cursor:
            return True
        if self.total is not None and self.offset is not None:
            return self.offset + len(self.items) < self.total
        return False


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _structure_decimal(value: object, _: type) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, (int, float, str, Decimal)):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    try:
        result = Decimal(str(value))
    except InvalidOperation:
        raise ValueError("not a decimal number") from None
    if not result.is_finite():
        raise ValueError("not a finite number")
    return result


def _structure_strict(kind: type[Any]) -> Any:
    def structure(value: object, _: type) -> Any:
        # JSON booleans are ints in Python, and cattrs would happily turn 12 into "12".
        if type(value) is kind:
            return value
        if kind is float and type(value) is int:
            return float(value)
        if kind is int and type(value) is float and value.is_integer():
            return int(value)
        raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")

    return structure


def _structure_code(value: object, _: type) -> Code:
    if isinstance(value, (str, Mapping)):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # a numeric PIN is still a code; keep it, as text
    raise TypeError(f"expected a string or an object, got {type(value).__name__}")


def _structure_mapping(value: object, _: type) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise TypeError(f"expected an object, got {type(value).__name__}")
    return dict(value)


def _structure_tuple_of(element: Any) -> Any:
    def structure(value: object, _: type) -> tuple[Any, ...]:
        if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
            raise TypeError(f"expected an array, got {type(value).__name__}")
        result = []
        for index, item in enumerate(value):
            try:
                result.append(converter.structure(item, element))
            except Exception as exc:
                _add_note(exc, IterableValidationNote(f"@ index {index}", index, element))
                raise
        return tuple(result)

    return structure


def _add_note(exc: BaseException, note: IterableValidationNote) -> None:
    # BaseException.add_note arrived in 3.11; cattrs reads __notes__ the same way on 3.10.
    notes = getattr(exc, "__notes__", None)
    if notes is None:
        notes = []
        exc.__notes__ = notes  # type: ignore[attr-defined,unused-ignore]
    notes.append(note)


def _structure_enum(value: object, kind: type[_TolerantEnum]) -> _TolerantEnum:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return kind(value)


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=False)
    # By class (singledispatch, most specific wins): the _TolerantEnum hook must beat the
    # str hook, since OrderStatus subclasses str.
    conv.register_structure_hook(_TolerantEnum, _structure_enum)
    conv.register_structure_hook(Decimal, _structure_decimal)
    for kind in (str, int, bool, float):
        conv.register_structure_hook(kind, _structure_strict(kind))
    # Parametrised generics cannot be dispatched by class.
    exact_hooks: dict[Any, Any] = {
        Code: _structure_code,
        Mapping[str, Any]: _structure_mapping,
        Any: lambda value, _: value,
        tuple[Code, ...]: _structure_tuple_of(Code),
        tuple[str, ...]: _structure_tuple_of(str),
        tuple[OrderItem, ...]: _structure_tuple_of(OrderItem),
        tuple[Product, ...]: _structure_tuple_of(Product),
        tuple[Category, ...]: _structure_tuple_of(Category),
        tuple[Order, ...]: _structure_tuple_of(Order),
    }
    conv.register_structure_hook_func(exact_hooks.__contains__, lambda v, t: exact_hooks[t](v, t))

    for cls in (OrderItem, Order, Product, Category):
        renames = {
            a.name: override(rename=_camel(a.name)) for a in attrs.fields(cls) if a.name != "raw"
        }
        # raw is not read from the payload: a server field named "raw" stays in raw.
        fn = make_dict_structure_fn(
            cls, conv, raw=override(omit=True), **renames  # type: ignore[arg-type]
        )
        conv.register_structure_hook(cls, _with_raw(fn))

    request_renames = {
        a.name: override(rename=_camel(a.name)) for a in attrs.fields(OrderItemRequest)
    }
    conv.register_unstructure_hook(
        OrderItemRequest,
        make_dict_unstructure_fn(OrderItemRequest, conv, **request_renames),  # type: ignore[arg-type]
    )
    return conv


def _with_raw(fn: Any) -> Any:
    def structure(value: object, cls: type) -> Any:
        if not isinstance(value, Mapping):
            raise TypeError(f"expected an object, got {type(value).__name__}")
        return attrs.evolve(fn(value, cls), raw=dict(value))

    return structure


#: The converter for every model: camelCase JSON in, snake_case attributes out (and back
#: for request bodies).
converter = _make_converter()
