"""Exact request shapes of every endpoint, checked with respx."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import respx

from foxpoll import AsyncFoxReload, FoxReload, OrderItemRequest, __version__

from .conftest import API_KEY

BASE = "https://api.example.test"
ORDER = {"id": "0b6f7a52-5a1e-4f55-8f6c-7c9b1d2e3f40", "status": "active",
         "items": [{"itemId": "product_1", "quantity": 1}]}
ABC = {**ORDER, "id": "abc"}  # an answer about order abc, for the requests that ask for it
PAGE: dict[str, Any] = {"items": [], "limit": 50, "offset": 0, "total": 0}


@pytest.fixture
def api() -> Iterator[respx.MockRouter]:
    with respx.mock(base_url=BASE, assert_all_called=True) as router:
        yield router


@pytest.fixture
def client() -> Iterator[FoxReload]:
    with FoxReload(API_KEY, base_url=BASE, max_retries=0) as c:
        yield c


def sent(route: respx.Route) -> httpx.Request:
    assert route.call_count == 1
    return route.calls.last.request


def test_every_request_carries_auth_json_and_user_agent(
    api: respx.MockRouter, client: FoxReload
) -> None:
    route = api.get("/api/orders/abc").respond(200, json=ABC)
    client.orders.get("abc")
    request = sent(route)
    assert request.headers["X-API-Key"] == API_KEY
    assert request.headers["Accept"] == "application/json"
    assert request.headers["User-Agent"].startswith(f"foxpoll/{__version__} httpx/")
    assert "content-type" not in request.headers  # a GET has no body


def test_create_order_shape(api: respx.MockRouter, client: FoxReload) -> None:
    route = api.post("/api/orders/").respond(201, json=ORDER)
    order = client.orders.create(
        items=[{"itemId": "product_1", "quantity": 2, "note": {"player_id": "77"}},
               OrderItemRequest("product_2")],
        is_mock=True,
    )
    request = sent(route)
    assert request.method == "POST"
    assert request.url.path == "/api/orders/"
    assert request.headers["Content-Type"] == "application/json"
    assert json.loads(request.content) == {
        "items": [
            {"itemId": "product_1", "quantity": 2, "note": {"player_id": "77"}},
            {"itemId": "product_2", "quantity": 1},
        ],
        "isMock": True,
    }
    assert order.id == ORDER["id"]


def test_create_accepts_snake_case_dicts_and_total_price(
    api: respx.MockRouter, client: FoxReload
) -> None:
    route = api.post("/api/orders/").respond(201, json=ORDER)
    client.orders.create(items=[{"item_id": "p", "quantity": 1}], total_price="10.50")
    assert json.loads(sent(route).content) == {
        "items": [{"itemId": "p", "quantity": 1}], "isMock": False, "totalPrice": 10.5
    }


def test_pay_from_balance_shape(api: respx.MockRouter, client: FoxReload) -> None:
    route = api.post("/api/orders/abc/pay").respond(200, json={**ABC, "status": "paid"})
    order = client.orders.pay("abc")
    assert json.loads(sent(route).content) == {"paymentProvider": None}
    assert order.status == "paid"


def test_pay_with_provider_shape(api: respx.MockRouter, client: FoxReload) -> None:
    route = api.post("/api/orders/abc/pay").respond(200, json=ABC)
    client.orders.pay("abc", payment_provider="pally", payment_return_url="https://shop/x")
    assert json.loads(sent(route).content) == {
        "paymentProvider": "pally", "paymentReturnUrl": "https://shop/x"
    }


def test_list_orders_passes_params_through(api: respx.MockRouter, client: FoxReload) -> None:
    route = api.get("/api/orders/").respond(200, json=PAGE)
    client.orders.list(status="completed", limit=10, page=2)
    assert dict(sent(route).url.params) == {"status": "completed", "limit": "10", "page": "2"}


def test_list_products_shape(api: respx.MockRouter, client: FoxReload) -> None:
    route = api.get("/api/products/").respond(200, json=PAGE)
    client.products.list(category="steam", limit=20, offset=40, with_stock_only=True)
    assert dict(sent(route).url.params) == {
        "category_id_or_slug": "steam", "limit": "20", "offset": "40", "withStockOnly": "true"
    }


def test_list_products_omits_unset_params(api: respx.MockRouter, client: FoxReload) -> None:
    route = api.get("/api/products/").respond(200, json=PAGE)
    client.products.list(category="steam")
    assert dict(sent(route).url.params) == {"category_id_or_slug": "steam"}


def test_search_products_shape(api: respx.MockRouter, client: FoxReload) -> None:
    route = api.get("/api/products/search").respond(200, json=PAGE)
    client.products.search("steam card", limit=5)
    assert dict(sent(route).url.params) == {"query": "steam card", "limit": "5"}


def test_get_product_shape(api: respx.MockRouter, client: FoxReload) -> None:
    route = api.get("/api/products/product_1/").respond(200, json={"id": "product_1"})
    assert client.products.get("product_1").id == "product_1"
    assert sent(route).method == "GET"


def test_list_categories_shape(api: respx.MockRouter, client: FoxReload) -> None:
    route = api.get("/api/categories/").respond(
        200, json={"items": [{"id": "c"}], "limit": 10, "nextCursor": "n2"}
    )
    page = client.categories.list(with_stock_only=False, tag="games", parent="root",
                                  cursor="n1", limit=10)
    assert dict(sent(route).url.params) == {
        "withStockOnly": "false", "tag": "games", "parent_id_or_slug": "root",
        "cursor": "n1", "limit": "10",
    }
    assert page.next_cursor == "n2"


@pytest.mark.parametrize(
    ("order_id", "raw_path"),
    [
        ("a/b", "/api/orders/a%2Fb"),
        ("a?b#c", "/api/orders/a%3Fb%23c"),
        ("ünï", "/api/orders/%C3%BCn%C3%AF"),
        ("x" * 256, "/api/orders/" + "x" * 256),
    ],
)
def test_odd_order_ids_are_escaped_into_one_path_segment(
    api: respx.MockRouter, client: FoxReload, order_id: str, raw_path: str
) -> None:
    route = api.route(method="GET").respond(200, json={**ORDER, "id": order_id})
    client.orders.get(order_id)
    assert sent(route).url.raw_path.decode() == raw_path


@pytest.mark.parametrize("order_id", ["", "   ", ".", "..", "x" * 257, "a\nb", "a\x00b"])
def test_unusable_order_ids_are_rejected_before_sending(client: FoxReload, order_id: str) -> None:
    with respx.mock(assert_all_mocked=True) as router:
        with pytest.raises(ValueError, match="order id"):
            client.orders.get(order_id)
        assert router.calls.call_count == 0


def test_non_string_order_id_is_a_type_error(client: FoxReload) -> None:
    with pytest.raises(TypeError):
        client.orders.get(123)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("items", "error"),
    [
        ([], ValueError),
        ([{"itemId": "p"}] * 11, ValueError),
        ([{"itemId": ""}], ValueError),
        ([{"itemId": "p", "quantity": 0}], ValueError),
        ([{"itemId": "p", "quantity": "2"}], TypeError),
        ([{"itemId": "p", "qty": 2}], ValueError),
        ([{"itemId": "p", "note": "player 1"}], TypeError),
        ({"itemId": "p"}, TypeError),
        (["p"], TypeError),
    ],
)
def test_bad_create_input_is_rejected_before_sending(
    client: FoxReload, items: Any, error: type[Exception]
) -> None:
    with respx.mock(assert_all_mocked=True) as router:
        with pytest.raises(error):
            client.orders.create(items=items)
        assert router.calls.call_count == 0


def test_base_path_prefix_is_kept(api: respx.MockRouter) -> None:
    route = api.get("/partner/v2/api/orders/abc").respond(200, json=ABC)
    with FoxReload(API_KEY, base_url=BASE + "/partner/v2/") as c:
        c.orders.get("abc")
    assert route.called


def test_environment_supplies_key_and_base_url(
    api: respx.MockRouter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FOXRELOAD_API_KEY", "env-key")
    monkeypatch.setenv("FOXRELOAD_BASE_URL", BASE)
    route = api.get("/api/orders/abc").respond(200, json=ABC)
    with FoxReload() as c:
        c.orders.get("abc")
    assert sent(route).headers["X-API-Key"] == "env-key"


def test_arguments_beat_the_environment(
    api: respx.MockRouter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FOXRELOAD_API_KEY", "env-key")
    monkeypatch.setenv("FOXRELOAD_BASE_URL", "https://elsewhere.test")
    route = api.get("/api/orders/abc").respond(200, json=ABC)
    with FoxReload("arg-key", base_url=BASE) as c:
        c.orders.get("abc")
    assert sent(route).headers["X-API-Key"] == "arg-key"


def test_missing_key_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FOXRELOAD_API_KEY", raising=False)
    with pytest.raises(ValueError, match="FOXRELOAD_API_KEY"):
        FoxReload()


@pytest.mark.parametrize("url", ["ftp://x", "not a url", "/relative"])
def test_bad_base_url(url: str) -> None:
    with pytest.raises(ValueError, match="base_url"):
        FoxReload(API_KEY, base_url=url)


def test_language_currency_and_default_headers(api: respx.MockRouter) -> None:
    route = api.get("/api/orders/abc").respond(200, json=ABC)
    with FoxReload(API_KEY, base_url=BASE, language="ru", currency="rub",
                   default_headers={"X-Partner": "shop-1"}) as c:
        c.orders.get("abc")
    headers = sent(route).headers
    assert (headers["X-Language"], headers["X-Currency"], headers["X-Partner"]) == (
        "ru", "rub", "shop-1"
    )


def test_default_headers_cannot_replace_the_key(api: respx.MockRouter) -> None:
    route = api.get("/api/orders/abc").respond(200, json=ABC)
    with FoxReload(API_KEY, base_url=BASE, default_headers={"X-API-Key": "other"}) as c:
        c.orders.get("abc")
    assert sent(route).headers["X-API-Key"] == API_KEY


def test_per_request_timeout_is_the_configured_one(api: respx.MockRouter) -> None:
    route = api.get("/api/orders/abc").respond(200, json=ABC)
    with FoxReload(API_KEY, base_url=BASE, timeout=7.5) as c:
        c.orders.get("abc")
    assert sent(route).extensions["timeout"] == httpx.Timeout(7.5).as_dict()


def test_with_options_changes_a_copy_and_shares_the_pool(api: respx.MockRouter) -> None:
    route = api.get("/api/orders/abc").respond(200, json=ABC)
    with FoxReload(API_KEY, base_url=BASE, timeout=30) as c:
        quick = c.with_options(timeout=2.0, max_retries=0)
        assert (quick.timeout, quick.max_retries) == (2.0, 0)
        assert (c.timeout, c.max_retries) == (30, 3)
        quick.orders.get("abc")
        quick.close()  # the copy does not own the pool...
        c.orders.get("abc")  # ...so the original still works
    assert route.calls[0].request.extensions["timeout"]["read"] == 2.0
    assert route.calls[1].request.extensions["timeout"]["read"] == 30


def test_injected_http_client_is_used_and_not_closed(api: respx.MockRouter) -> None:
    api.get("/api/orders/abc").respond(200, json=ABC)
    http = httpx.Client()
    with FoxReload(API_KEY, base_url=BASE, http_client=http) as c:
        c.orders.get("abc")
    assert not http.is_closed
    http.close()


async def test_async_client_sends_the_same_shapes(api: respx.MockRouter) -> None:
    create = api.post("/api/orders/").respond(201, json=ORDER)
    pay = api.post(f"/api/orders/{ORDER['id']}/pay").respond(200, json=ORDER)
    get = api.get(f"/api/orders/{ORDER['id']}").respond(200, json=ORDER)
    products = api.get("/api/products/").respond(200, json=PAGE)
    search = api.get("/api/products/search").respond(200, json=PAGE)
    product = api.get("/api/products/p/").respond(200, json={"id": "p"})
    categories = api.get("/api/categories/").respond(200, json={"items": [], "limit": 50})
    orders = api.get("/api/orders/").respond(200, json=PAGE)
    async with AsyncFoxReload(API_KEY, base_url=BASE) as c:
        order = await c.orders.create(items=[{"itemId": "product_1"}])
        await c.orders.pay(order.id)
        await c.orders.get(order.id)
        await c.orders.list(status="paid")
        await c.products.list(category="steam")
        await c.products.search("steam")
        await c.products.get("p")
        await c.categories.list()
    assert json.loads(sent(create).content) == {
        "items": [{"itemId": "product_1", "quantity": 1}], "isMock": False
    }
    assert json.loads(sent(pay).content) == {"paymentProvider": None}
    for route in (get, products, search, product, categories, orders):
        assert sent(route).headers["X-API-Key"] == API_KEY


def test_with_options_changes_key_and_base_url_for_the_copy_only() -> None:
    with respx.mock(assert_all_called=True) as router:
        old = router.get("https://a.test/api/orders/abc").respond(200, json=ABC)
        new = router.get("https://b.test/v2/api/orders/abc").respond(200, json=ABC)
        with FoxReload("key-one", base_url="https://a.test") as client:
            client.orders.get("abc")  # fills the URL cache of the original
            copy = client.with_options(api_key="key-two", base_url="https://b.test/v2")
            copy.orders.get("abc")
            client.orders.get("abc")
    assert [c.request.headers["X-API-Key"] for c in old.calls] == ["key-one", "key-one"]
    assert new.calls.last.request.headers["X-API-Key"] == "key-two"


@pytest.mark.parametrize("url", ["https://api.test/api", "https://api.test/api/",
                                 "https://proxy.test/foxreload/api"])
def test_a_base_url_with_the_api_path_is_refused_with_a_hint(url: str) -> None:
    with pytest.raises(ValueError, match="scheme and host only"):
        FoxReload("key", base_url=url)


def test_help_shows_the_arguments_and_the_resources() -> None:
    import pydoc

    for cls in (FoxReload, AsyncFoxReload):
        text = pydoc.render_doc(cls, renderer=pydoc.plaintext)
        assert "Initialize self" not in text
        for name in ("api_key", "base_url", "without ``/api``", "rate_limit",
                     "recovery_queue", "max_in_flight", "orders", "products", "categories"):
            assert name in text, (cls.__name__, name)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"api_key": 123}, TypeError, "api_key must be a str"),
    ({"api_key": "MY-REAL-KEY-42 "}, ValueError, "whitespace"),
    ({"api_key": "kéy"}, ValueError, "printable ASCII"),
    ({"timeout": float("nan")}, ValueError, "timeout"),
    ({"timeout": float("inf")}, ValueError, "timeout"),
    ({"max_retries": float("inf")}, ValueError, "max_retries"),
    ({"max_retries": 1.5}, ValueError, "max_retries"),
])
def test_bad_client_settings_are_refused_without_quoting_the_key(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match) as info:
        FoxReload(**{"api_key": "key", "base_url": "https://api.test", **kwargs})
    assert "MY-REAL-KEY" not in str(info.value)


@pytest.mark.parametrize("kwargs", [{"max_retry_after": -1}, {"timeout": float("nan")},
                                    {"max_retries": -2}])
def test_with_options_checks_as_the_constructor_does(kwargs: dict[str, Any]) -> None:
    [name] = kwargs
    with FoxReload("key", base_url="https://api.test") as client, \
            pytest.raises(ValueError, match=name):
        client.with_options(**kwargs)


def test_odd_order_arguments_are_clear_errors() -> None:
    from foxpoll.testing import FakeFoxReload

    sim = FakeFoxReload()
    with sim.client() as client:
        with pytest.raises(ValueError, match="total_price must be a number"):
            client.orders.create(items=[{"itemId": "p"}], total_price="abc")
        with pytest.raises(ValueError, match="quantity"):
            client.orders.create(items=[{"itemId": "p", "quantity": 10**30}])
        with pytest.raises(TypeError, match="not a single one"):
            list(client.wait_many("0b7c5f3e"))
        with pytest.raises(ValueError, match="timeout"):
            client.wait_for_completion("o1", timeout=float("inf"))
    assert sim.count() == 0  # nothing was sent
