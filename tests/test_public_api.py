"""The public surface: sorted exports, and sync/async twins that stay in step."""

from __future__ import annotations

import importlib
import inspect

import pytest

import foxpoll
from foxpoll import _resources


@pytest.mark.parametrize("module", ["foxpoll", "foxpoll.backoff", "foxpoll.dedup",
                                    "foxpoll.delivery", "foxpoll.errors", "foxpoll.events",
                                    "foxpoll.metrics", "foxpoll.models", "foxpoll.recovery",
                                    "foxpoll.polling", "foxpoll.ratelimit", "foxpoll.testing"])
def test_all_is_sorted_and_resolves(module: str) -> None:
    mod = importlib.import_module(module)
    assert list(mod.__all__) == sorted(mod.__all__)
    for name in mod.__all__:
        assert hasattr(mod, name), name


def test_package_exports_only_public_names() -> None:
    submodules = {"backoff", "cli", "dedup", "delivery", "errors", "events", "metrics",
                  "models", "polling", "ratelimit", "recovery", "testing", "transports"}
    public = {n for n in dir(foxpoll) if not n.startswith("_")} - submodules
    assert public <= set(foxpoll.__all__)


def test_py_typed_ships() -> None:
    from importlib.resources import files

    assert files("foxpoll").joinpath("py.typed").is_file()


TWINS = [
    (foxpoll.FoxReload, foxpoll.AsyncFoxReload),
    (_resources.Orders, _resources.AsyncOrders),
    (_resources.Products, _resources.AsyncProducts),
    (_resources.Categories, _resources.AsyncCategories),
]


@pytest.mark.parametrize(("sync", "async_"), TWINS)
def test_sync_and_async_signatures_match(sync: type, async_: type) -> None:
    def public(cls: type) -> dict[str, inspect.Signature]:
        return {
            name: inspect.signature(member)
            for name, member in inspect.getmembers(cls, inspect.isfunction)
            if not name.startswith("_") or name == "__init__"
        }

    sync_methods, async_methods = public(sync), public(async_)
    assert sync_methods.keys() - {"close"} == async_methods.keys() - {"close"}
    for name, signature in sync_methods.items():
        other = async_methods[name]
        sync_params = [(p.name, p.kind, p.default) for p in signature.parameters.values()]
        async_params = [(p.name, p.kind, p.default) for p in other.parameters.values()]
        if name == "__init__":  # the http client's type differs, by design
            sync_params = [p for p in sync_params if p[0] != "http_client"]
            async_params = [p for p in async_params if p[0] != "http_client"]
        assert sync_params == async_params, name
        if name == "wait_many":  # an async iterator, for `async for`
            assert "AsyncIterator" in str(other.return_annotation)
        elif name not in ("__init__", "with_options"):
            assert inspect.iscoroutinefunction(getattr(async_, name)), name


def test_clients_take_their_own_kind_of_http_client() -> None:
    import httpx

    hints = {
        cls: inspect.signature(cls).parameters["http_client"] for cls in
        (foxpoll.FoxReload, foxpoll.AsyncFoxReload)
    }
    assert all(p.default is None and p.kind is p.KEYWORD_ONLY for p in hints.values())
    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        return httpx.Response(200, json={"id": "o1", "status": "active", "items": []})

    with httpx.Client(transport=httpx.MockTransport(answer)) as http:
        foxpoll.FoxReload("k", http_client=http).orders.get("o1")
    assert seen == ["/api/orders/o1"]  # sent through the caller's client
