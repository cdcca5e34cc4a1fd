"""Reading decoded JSON as models: anything unreadable becomes
:class:`~foxpoll.errors.APIResponseValidationError`, whose message names the path of the
first bad field and what was wrong with it, never the field's value (it may be a code)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypeVar

import cattrs
from cattrs.errors import AttributeValidationNote, IterableValidationNote

from .errors import APIResponseValidationError
from .models import Page, _camel, converter

__all__ = ["parse", "parse_page"]

T = TypeVar("T")


def parse(data: object, kind: type[T], *, what: str | None = None) -> T:
    """Read decoded JSON as ``kind``, or raise :class:`APIResponseValidationError`.

    The message names the path of the first bad field and what was wrong with it, never
    the field's value (it may be a code).
    """
    try:
        return converter.structure(data, kind)
    except Exception as exc:  # cattrs wraps everything a hook raises; report the first leaf
        where, reason = _first_failure(exc)
        label = what or getattr(kind, "__name__", str(kind))
        raise APIResponseValidationError(f"unexpected {label} shape at {where}: {reason}") from exc


def parse_page(data: object, kind: type[T]) -> Page[T]:
    """Read a listing page: ``{items, limit, offset, total}`` or ``{items, limit, nextCursor}``.

    A bare JSON array is accepted too, as a single page.
    """
    if isinstance(data, list):
        return Page(items=parse(data, tuple[kind, ...], what=f"{kind.__name__} list"))  # type: ignore[valid-type]
    if not isinstance(data, Mapping):
        raise APIResponseValidationError(f"expected a page object, got {type(data).__name__}")
    if "items" not in data:
        raise APIResponseValidationError("unexpected page shape at $.items: field missing")
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
