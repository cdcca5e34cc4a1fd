"""Reading a response body as models, within bounds on its work: anything unreadable
becomes :class:`~foxpoll.errors.APIResponseValidationError`, whose message names the path
of the first bad field and what was wrong with it, never the field's value (it may be a
code).

The size cap (``max_response_bytes``) bounds a body's bytes, not what decoding it costs:
ten MiB of ``{},`` is three million dicts, 250 MiB of them. :func:`load_json` counts a
body's values before the decoder builds any of them, with ``bytes.count`` (an upper bound,
commas inside strings included; a tokenizer settles a body over it), and checks how deep
the result nests; :func:`parse` and :func:`parse_page` then cap the items and codes of an
order and the results of a page. Past any bound: :class:`~foxpoll.errors.ResponseTooLarge`,
naming the bound. A body is read as UTF-8, the API's encoding, and only so: never as the
UTF-16 or UTF-32 that ``json.loads`` would detect, whose values the count does not see.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import cattrs
from cattrs.errors import AttributeValidationNote, IterableValidationNote

from .errors import APIResponseValidationError, ResponseTooLarge
from .models import Order, Page, _camel, converter

__all__ = [
    "MAX_CODES",
    "MAX_DEPTH",
    "MAX_ITEMS",
    "MAX_RESULTS",
    "MAX_VALUES",
    "load_json",
    "parse",
    "parse_page",
]

T = TypeVar("T")

#: JSON values (objects, arrays, strings, numbers, literals) in one body. A page of 200
#: products or an order with 10,000 codes holds a few tens of thousands; a body at the
#: size cap with this many of the costliest values decodes to about 20 MiB of objects.
MAX_VALUES = 100_000
#: How deep arrays and objects nest (``{}`` is 1). An order's codes sit at 5, a page's at 7.
MAX_DEPTH = 32
#: Items in one order; the API takes 10 per order.
MAX_ITEMS = 1_000
#: Delivered codes in one order, all items together.
MAX_CODES = 10_000
#: Results in one page; the API serves at most 200.
MAX_RESULTS = 1_000

# The tokens that count: a string (escapes included, so a quote inside one does not end
# it; one left open runs to the end, so no quote is scanned twice), an empty array or
# object, the opener of a non-empty one, a closer, a comma.
_TOKEN = re.compile(rb'("[^"\\]*(?:\\.[^"\\]*)*"?)|([\[{]\s*[\]}])|([\[{])|([\]}])|,')
_EMPTY, _OPENER, _CLOSER = 2, 3, 4  # the groups; a string is 1, a comma none
# Each value brings at most an opener, a closer, a comma and a key: any more is not JSON.
_TOKENS_PER_VALUE = 4
# Python parses a long integer in quadratic time; since 3.10.7 it refuses one of over 4,300
# digits. An older interpreter gets the same refusal here.
_LOADS_OPTIONS: dict[str, Any] = (
    {} if hasattr(sys, "get_int_max_str_digits") else {"parse_int": lambda text: (
        int(text) if len(text) <= 4300 else _refuse("an integer of over 4300 digits"))})


def _refuse(what: str) -> Any:
    raise ValueError(f"not JSON foxpoll reads: {what}")


def load_json(body: bytes) -> Any:
    """Decode a response body as JSON, within :data:`MAX_VALUES` and :data:`MAX_DEPTH`.

    Raises:
        ResponseTooLarge: the body holds more values, or nests deeper, than the bounds.
        ValueError: the body is not UTF-8 JSON (UTF-16 and UTF-32 included), whatever
            the decoder raised (never the text).
    """
    # The API speaks UTF-8, and the count below reads bytes as UTF-8 (where every ASCII
    # byte is an ASCII character). json.loads of bytes would also take UTF-16 or UTF-32,
    # whose commas and quotes the count does not see; of a str, it detects no encoding.
    if b"\0" in body:  # no JSON holds a raw NUL; UTF-16 and UTF-32 of JSON always do
        raise ValueError("not UTF-8 JSON (a NUL byte)")
    try:
        text = body.decode("utf-8-sig")  # a byte order mark is ignored, as json.loads does
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 (an invalid byte at offset {exc.start})") from None
    # A body has at most one value more than its commas and openers, outside strings.
    if body.count(b",") + body.count(b"[") + body.count(b"{") >= MAX_VALUES:
        _count_values(body)
    try:
        data = json.loads(text, **_LOADS_OPTIONS)
    except RecursionError:  # the decoder's own bound, far beyond ours
        raise ResponseTooLarge(f"response body nested deeper than {MAX_DEPTH}") from None
    except Exception as exc:  # whatever the decoder raises, the body is not JSON
        raise ValueError(f"not JSON ({type(exc).__name__})") from None
    if _too_deep(data):
        raise ResponseTooLarge(f"response body nested deeper than {MAX_DEPTH}")
    return data


def _count_values(body: bytes) -> None:
    """Refuse ``body`` once its tokens show more than :data:`MAX_VALUES` values or
    :data:`MAX_DEPTH` levels. The scan stops at the bound, so a hostile body costs a
    bounded time; commas inside strings do not count."""
    # One value, plus one per comma and per non-empty array or object (its first element).
    values, depth = 1, 0
    for tokens, match in enumerate(_TOKEN.finditer(body), 1):
        kind = match.lastindex
        if kind in (_OPENER, _EMPTY):
            depth += 1
            if depth > MAX_DEPTH:
                raise ResponseTooLarge(f"response body nested deeper than {MAX_DEPTH}")
            if kind == _EMPTY:
                depth -= 1
            else:
                values += 1
        elif kind == _CLOSER:
            depth -= 1
        elif kind is None:
            values += 1
        if values > MAX_VALUES or tokens > _TOKENS_PER_VALUE * MAX_VALUES:
            raise ResponseTooLarge(f"response body holds over {MAX_VALUES} JSON values")


def _too_deep(data: object) -> bool:
    """Whether arrays and objects nest past :data:`MAX_DEPTH` in ``data``, found without
    recursing."""
    stack: list[tuple[object, int]] = [(data, 0)]
    while stack:
        item, level = stack.pop()
        if type(item) is dict:
            item = item.values()
        elif type(item) is not list:
            continue
        level += 1
        if level > MAX_DEPTH:
            return True
        stack.extend((child, level) for child in item
                     if type(child) is dict or type(child) is list)
    return False


def parse(data: object, kind: type[T], *, what: str | None = None) -> T:
    """Read decoded JSON as ``kind``, or raise :class:`APIResponseValidationError`.

    The message names the path of the first bad field and what was wrong with it, never
    the field's value (it may be a code).

    Raises:
        ResponseTooLarge: an order past :data:`MAX_ITEMS` items or :data:`MAX_CODES` codes.
        APIResponseValidationError: any other shape foxpoll cannot read.
    """
    if kind is Order:
        _check_order(data, "$")
    try:
        return converter.structure(data, kind)
    except Exception as exc:  # cattrs wraps everything a hook raises; report the first leaf
        where, reason = _first_failure(exc)
        label = what or getattr(kind, "__name__", str(kind))
        raise APIResponseValidationError(f"unexpected {label} shape at {where}: {reason}") from exc


def parse_page(data: object, kind: type[T]) -> Page[T]:
    """Read a listing page: ``{items, limit, offset, total}`` or ``{items, limit, nextCursor}``.

    A bare JSON array is accepted too, as a single page.

    Raises:
        ResponseTooLarge: past :data:`MAX_RESULTS` results, or an order of them past
            :data:`MAX_ITEMS` items or :data:`MAX_CODES` codes.
        APIResponseValidationError: any other shape foxpoll cannot read.
    """
    if isinstance(data, list):
        _check_results(data, kind, "$")
        return Page(items=parse(data, tuple[kind, ...], what=f"{kind.__name__} list"))  # type: ignore[valid-type]
    if not isinstance(data, Mapping):
        raise APIResponseValidationError(f"expected a page object, got {type(data).__name__}")
    if "items" not in data:
        raise APIResponseValidationError("unexpected page shape at $.items: field missing")
    _check_results(data["items"], kind, "$.items")
    items: tuple[T, ...] = parse(data["items"], tuple[kind, ...], what=f"{kind.__name__} list")  # type: ignore[valid-type]
    fields = {
        "limit": data.get("limit"),
        "offset": data.get("offset"),
        "total": data.get("total"),
        "next_cursor": data.get("nextCursor"),
    }
    for name, value in fields.items():
        expected = str if name == "next_cursor" else int
        if value is not None and (type(value) is not expected):
            raise APIResponseValidationError(
                f"unexpected page shape at $.{_camel(name)}: expected {expected.__name__}"
            )
    return Page(items=items, raw=dict(data), **fields)


def _check_results(results: object, kind: type[Any], where: str) -> None:
    if not isinstance(results, list):
        return  # not an array: structuring reports it
    if len(results) > MAX_RESULTS:
        raise ResponseTooLarge(
            f"page at {where} holds {len(results)} results, over the cap of {MAX_RESULTS}")
    if kind is Order:
        for index, order in enumerate(results):
            _check_order(order, f"{where}[{index}]")


def _check_order(order: object, where: str) -> None:
    """Refuse an order past :data:`MAX_ITEMS` items or :data:`MAX_CODES` codes before it
    is structured; a shape that is wrong in any other way is left to structuring."""
    items = order.get("items") if isinstance(order, Mapping) else None
    if not isinstance(items, list):
        return
    if len(items) > MAX_ITEMS:
        raise ResponseTooLarge(
            f"order at {where} has {len(items)} items, over the cap of {MAX_ITEMS}")
    codes = sum(len(codes) for item in items if isinstance(item, Mapping)
                and isinstance(codes := item.get("externalData"), list))
    if codes > MAX_CODES:
        raise ResponseTooLarge(
            f"order at {where} has {codes} codes, over the cap of {MAX_CODES}")


def _first_failure(exc: BaseException, path: str = "$") -> tuple[str, str]:
    if isinstance(exc, cattrs.BaseValidationError) and exc.exceptions:
        child = exc.exceptions[0]
        return _first_failure(child, path + _path_step(getattr(child, "__notes__", [])))
    if isinstance(exc, KeyError):
        return path, "required field missing"
    return path, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _path_step(notes: Sequence[object]) -> str:
    """The JSON path step a failed child adds: its attribute, then its index in an array."""
    attribute = next((n.name for n in notes if isinstance(n, AttributeValidationNote)), None)
    index = next((n.index for n in notes if isinstance(n, IterableValidationNote)), None)
    return (f".{_camel(attribute)}" if attribute else "") + (
        f"[{index}]" if index is not None else ""
    )
