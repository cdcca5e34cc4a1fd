"""Reading a response costs bounded work and memory whatever the body holds: how deep it
nests, how many values it packs under the size cap, how many items, codes or results.

Past a bound a call raises ``ResponseTooLarge`` (an ``APIResponseValidationError``, so a
wait takes it for a passing error); nothing the decoder raises, ``RecursionError``
included, gets past as anything else. The client tests run over real sockets against
``foxpoll.testing.HostileServer``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from foxpoll import (
    APIResponseValidationError,
    APIStatusError,
    AsyncFoxReload,
    FoxReload,
    InternalServerError,
    Order,
    Product,
    ResponseTooLarge,
    WaitPolicy,
    _parse,
)
from foxpoll._effects import Parse
from foxpoll._parse import (
    MAX_CODES,
    MAX_DEPTH,
    MAX_ITEMS,
    MAX_RESULTS,
    MAX_VALUES,
    load_json,
    parse,
    parse_page,
)
from foxpoll.backoff import Fixed
from foxpoll.cli import main
from foxpoll.testing import HostileServer, Hostility

from .test_event_loop import ticking

KEY = "sk-live-bounds-9f1d"
MiB = 1024 * 1024
CAP = 10 * MiB  # the default max_response_bytes


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def array_of(element: bytes, count: int) -> bytes:
    return b"[" + b",".join([element] * count) + b"]"


# -- load_json: depth and values ---------------------------------------------------------


def test_a_body_as_deep_as_the_cap_reads() -> None:
    data = load_json(nested(MAX_DEPTH))
    for _ in range(MAX_DEPTH - 1):
        data = data[0]
    assert data == []


# Just past the cap (the decoder reads it, the check refuses it), past the decoder's own
# recursion limit, and so deep that the count refuses it before the decoder starts.
@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 20_000, 5_000_000])
def test_a_body_nested_past_the_cap_is_refused_never_a_recursion_error(depth: int) -> None:
    with pytest.raises(ResponseTooLarge, match=f"nested deeper than {MAX_DEPTH}"):
        load_json(nested(depth))
    with pytest.raises(ResponseTooLarge, match=f"nested deeper than {MAX_DEPTH}"):
        load_json(b'{"id":"o1","detail":' + nested(depth) + b"}")


# Each element and the values it holds: a scalar, empty containers (spaced too), a
# one-key object holding an array.
ELEMENTS = [(b"0", 1), (b"{}", 1), (b"[]", 1), (b'"a"', 1), (b" { } ", 1), (b'{"a":[]}', 2)]


@pytest.mark.parametrize(("element", "each"), ELEMENTS)
def test_a_body_of_as_many_values_as_the_cap_reads(element: bytes, each: int) -> None:
    count = (MAX_VALUES - 1) // each  # and the array itself
    assert len(load_json(array_of(element, count))) == count


@pytest.mark.parametrize(("element", "each"), ELEMENTS)
@pytest.mark.parametrize("count", [MAX_VALUES // 2, 2_000_000])
def test_a_body_of_more_values_than_the_cap_is_refused(
        element: bytes, each: int, count: int) -> None:
    if count * each < MAX_VALUES:
        count = MAX_VALUES // each
    with pytest.raises(ResponseTooLarge, match=f"over {MAX_VALUES} JSON values"):
        load_json(array_of(element, count))


@pytest.mark.parametrize("text", [",", "[", "{", '\\"', "\\\\", "\u0436"])
def test_commas_brackets_and_quotes_inside_strings_do_not_count(text: str) -> None:
    """The count starts with bytes.count, which sees every comma; a body over it is
    tokenized, and what sits inside its strings is not a value."""
    strings = [(text + ",") * 40] * 4_000  # 160,000 commas, in 4,002 values
    body = json.dumps({"id": "o1", "notes": strings}, ensure_ascii=False).encode()
    assert body.count(b",") > MAX_VALUES
    assert load_json(body)["notes"] == strings


@pytest.mark.parametrize("body", [
    b'"\\"' * 1_000_000,  # a string left open: scanned once, not once per quote
    b"]" * 5_000_000,
    b'"' + b"a" * 3_000_000,
    b"{" + b'"a":1,' * 200_000,
    b"\xff\xfe[1]",
    b"[1e999999999999]" + b"," * MAX_VALUES,
    b"[" + b"9" * 100_000 + b"]",
])
def test_any_malformed_body_is_a_value_error_in_bounded_time(body: bytes) -> None:
    started = time.process_time()
    with pytest.raises((ValueError, ResponseTooLarge)):
        load_json(body)
    assert time.process_time() - started < 2.0


def amplifying_in(encoding: str) -> bytes:
    """Over :data:`MAX_VALUES` values, in ``encoding``: U+2200 is ``00 22`` in UTF-16-LE,
    a byte the count would take for a quote, so that every value after it hides in a
    string."""
    count = 2 * MAX_VALUES
    return ('{"id":"o1","status":"completed","items":[],"x":["\u2200",' + "{}," * count
            + '"\u2200"]}').encode(encoding)


@pytest.mark.parametrize("encoding", [
    "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"])
def test_a_body_in_utf16_or_utf32_is_refused_before_it_is_decoded(encoding: str) -> None:
    started = time.process_time()
    with pytest.raises(ValueError, match="not UTF-8"):
        load_json(amplifying_in(encoding))
    with pytest.raises(ValueError, match="not UTF-8"):
        load_json(json.dumps(ORDER).encode(encoding))
    assert time.process_time() - started < 0.5


@pytest.mark.parametrize("body", [b'{"id":"o1\xff"}', b'"\xed\xa0\x80"', b"\xc0\xaf"])
def test_a_body_that_is_not_utf8_is_refused(body: bytes) -> None:
    with pytest.raises(ValueError, match="not UTF-8"):
        load_json(body)


def test_a_utf8_body_with_a_byte_order_mark_reads() -> None:
    assert load_json(b"\xef\xbb\xbf" + json.dumps(ORDER).encode()) == ORDER


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text() | st.text(alphabet='[]{},"\\ ', max_size=8),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=40)


@given(JSON)
def test_a_body_within_the_bounds_reads_as_json_loads_reads_it(doc: Any) -> None:
    body = json.dumps(doc, ensure_ascii=False).encode()
    assert load_json(body) == json.loads(body)


@given(st.binary(max_size=200) | st.text(alphabet='[]{},":\\ 0a', max_size=200).map(str.encode))
def test_any_bytes_read_or_raise_value_error_or_response_too_large(body: bytes) -> None:
    with contextlib.suppress(ValueError, ResponseTooLarge):
        load_json(body)


def values_and_depth(doc: Any) -> tuple[int, int]:
    if isinstance(doc, dict):
        doc = list(doc.values())
    if not isinstance(doc, list):
        return 1, 0
    counts = [values_and_depth(child) for child in doc]
    return 1 + sum(v for v, _ in counts), 1 + max((d for _, d in counts), default=0)


@given(JSON)
def test_the_count_refuses_exactly_the_bodies_past_the_bounds(doc: Any) -> None:
    """With small bounds, so that a body's commas and openers often pass them and the
    tokenizer decides: strings full of commas, quotes and backslashes included."""
    body = json.dumps(doc, ensure_ascii=False).encode()
    values, depth = values_and_depth(doc)
    with mock.patch.object(_parse, "MAX_VALUES", 6), mock.patch.object(_parse, "MAX_DEPTH", 3):
        try:
            load_json(body)
            refused = False
        except ResponseTooLarge:
            refused = True
    assert refused == (values > 6 or depth > 3)


# -- parse: items, codes and results -----------------------------------------------------


def order_with(items: int, codes_per_item: int = 0) -> dict[str, Any]:
    return {"id": "o1", "status": "completed", "items": [
        {"itemId": f"p{i}", "externalData": ["C"] * codes_per_item} for i in range(items)]}


def test_an_order_at_the_caps_reads() -> None:
    order = parse(order_with(MAX_ITEMS, MAX_CODES // MAX_ITEMS), Order)
    assert len(order.items) == MAX_ITEMS
    assert len(order.codes) == MAX_CODES


def test_an_order_past_the_item_cap_is_refused_naming_it() -> None:
    with pytest.raises(ResponseTooLarge, match=f"{MAX_ITEMS + 1} items, over the cap of "
                                               f"{MAX_ITEMS}"):
        parse(order_with(MAX_ITEMS + 1), Order)


def test_an_order_past_the_code_cap_is_refused_naming_it() -> None:
    with pytest.raises(ResponseTooLarge, match=f"{MAX_CODES + 10} codes, over the cap of "
                                               f"{MAX_CODES}"):
        parse(order_with(10, MAX_CODES // 10 + 1), Order)


def test_a_page_past_the_result_cap_is_refused_naming_it() -> None:
    products = [{"id": f"p{i}"} for i in range(MAX_RESULTS + 1)]
    with pytest.raises(ResponseTooLarge, match=f"over the cap of {MAX_RESULTS}"):
        parse_page({"items": products, "limit": 200}, Product)
    with pytest.raises(ResponseTooLarge, match=f"over the cap of {MAX_RESULTS}"):
        parse_page(products, Product)
    assert len(parse_page(products[:MAX_RESULTS], Product).items) == MAX_RESULTS


def test_each_order_of_a_page_is_held_to_the_caps() -> None:
    orders = [order_with(1)] * 3 + [order_with(MAX_ITEMS + 1)]
    with pytest.raises(ResponseTooLarge, match=r"order at \$\.items\[3\] has"):
        parse_page({"items": orders}, Order)


# -- the clients -------------------------------------------------------------------------


def mock_client(body: bytes, status: int = 200) -> FoxReload:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=body, request=request)

    return FoxReload(KEY, base_url="https://api.test", transport=httpx.MockTransport(answer),
                     max_retries=0)


@pytest.mark.parametrize("body", [b"\xff\xfe", b"[" * 20_000, b'{"id": "o1"', b"NaN"])
def test_whatever_the_decoder_raises_a_call_raises_a_validation_error(body: bytes) -> None:
    with mock_client(body) as client, pytest.raises(APIResponseValidationError) as info:
        client.orders.get("o1")
    assert info.value.response is not None
    assert info.value.request is not None


def test_a_utf16_body_over_a_socket_is_a_validation_error() -> None:
    async def aget(url: str) -> Order:
        async with AsyncFoxReload(KEY, base_url=url, max_retries=0) as client:
            return await client.orders.get("o1")

    with HostileServer(body=amplifying_in("utf-16-le")) as server:
        with FoxReload(KEY, base_url=server.url, max_retries=0) as client, pytest.raises(
                APIResponseValidationError, match="body is not JSON"):
            client.orders.get("o1")
        with pytest.raises(APIResponseValidationError, match="body is not JSON"):
            asyncio.run(aget(server.url))


def test_an_error_body_past_the_bounds_is_kept_as_text() -> None:
    body = b'{"detail":' + nested(20_000) + b"}"
    with mock_client(body, status=500) as client, pytest.raises(InternalServerError) as info:
        client.orders.get("o1")
    assert info.value.body == body.decode()
    assert info.value.detail is None


def padded(doc: dict[str, Any], size: int = CAP) -> bytes:
    """``doc`` as compact JSON, padded to ``size`` bytes with an ASCII string field."""
    body = json.dumps(dict(doc, pad=""), separators=(",", ":")).encode()
    return body[:-2] + b"x" * (size - len(body)) + b'"}'


def order_at_the_caps() -> dict[str, Any]:
    per_item = MAX_CODES // MAX_ITEMS
    return {"id": "o1", "status": "completed", "items": [
        {"itemId": f"product_{i:05d}", "quantity": 1, "note": {"playerId": str(i)},
         "externalData": [{"code": f"C{i}-{j}", "pin": "1234"} for j in range(per_item)]}
        for i in range(MAX_ITEMS)]}


ORDER = {"id": "o1", "status": "completed", "items": []}
# What a body under the byte cap can hold at the value cap, in the costliest shapes
# measured: one-key objects, distinct keys, an order at the item and code caps.
WORST_ACCEPTED = {
    "one-key-objects": lambda: padded(dict(ORDER, x=[{"a": []}] * (MAX_VALUES // 2 - 10))),
    "distinct-keys": lambda: padded(dict(ORDER, x={f"k{i}": 0 for i in range(MAX_VALUES - 10)})),
    "order-at-the-caps": lambda: padded(order_at_the_caps()),
}


@pytest.fixture
def server() -> Iterator[HostileServer]:
    with HostileServer() as hostile:
        yield hostile


def traced(call: Callable[[], Any]) -> tuple[Any, int]:
    """``call()``'s outcome and the peak of memory traced while it ran (every thread)."""
    tracemalloc.start()
    try:
        try:
            outcome = call()
        except Exception as exc:  # the outcome is what the test inspects
            outcome = exc
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return outcome, peak


@pytest.mark.slow
@pytest.mark.parametrize("shape", list(WORST_ACCEPTED))
@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_body_at_the_cap_reads_in_under_five_times_its_size(
        shape: str, kind: str, server: HostileServer) -> None:
    server.body = WORST_ACCEPTED[shape]()
    assert CAP - 64 <= len(server.body) <= CAP
    if kind == "sync":
        with FoxReload(KEY, base_url=server.url, timeout=60) as client:
            order, peak = traced(lambda: client.orders.get("o1"))
    else:
        async def get() -> Order:
            async with AsyncFoxReload(KEY, base_url=server.url, timeout=60) as client:
                return await client.orders.get("o1")

        order, peak = traced(lambda: asyncio.run(get()))
    assert isinstance(order, Order), order
    assert peak < 5 * len(server.body), f"peak {peak / MiB:.1f} MiB"


def orders_page() -> bytes:
    """A page of orders near the value cap: a tenth of a second or more to read."""
    orders = [{"id": f"o{k}", "status": "completed", "items": [
        {"itemId": f"p{i}", "quantity": 1, "externalData": [f"C{k}-{i}-{j}" for j in range(4)]}
        for i in range(9)]} for k in range(MAX_RESULTS)]
    return json.dumps({"items": orders}).encode()


@pytest.mark.slow
async def test_an_async_client_reads_a_large_body_off_the_event_loop(
        server: HostileServer) -> None:
    server.body = orders_page()
    # A collection of a heap that earlier tests grew holds the GIL, and with it the
    # loop, for tens of milliseconds, wherever it runs: freeze what exists already.
    gc.collect()
    gc.freeze()
    try:
        await read_ticking(server)
    finally:
        gc.unfreeze()


async def read_ticking(server: HostileServer) -> None:
    with FoxReload(KEY, base_url=server.url) as blocking:
        started = time.monotonic()
        assert len(blocking.orders.list().items) == MAX_RESULTS
        blocked = time.monotonic() - started
    # On the event loop, the read would hold every tick this long.
    assert blocked > 0.04
    async with AsyncFoxReload(KEY, base_url=server.url) as client:
        await client.orders.list()  # the first request imports httpx's async backend
        async with ticking() as ticks:
            for _ in range(3):
                assert len((await client.orders.list()).items) == MAX_RESULTS
    assert ticks.worst < blocked / 2, f"a tick came {ticks.worst * 1000:.0f} ms late"


@pytest.mark.slow
@pytest.mark.parametrize("status", [400, 500])
async def test_an_async_client_reads_a_large_error_body_off_the_event_loop(
        status: int, server: HostileServer) -> None:
    server.body = WORST_ACCEPTED["one-key-objects"]()
    server.status = status
    gc.collect()
    gc.freeze()  # as above
    try:
        with FoxReload(KEY, base_url=server.url, max_retries=0) as blocking:
            started = time.monotonic()
            with pytest.raises(APIStatusError) as info:
                blocking.orders.get("o1")
            blocked = time.monotonic() - started
        assert info.value.status_code == status
        assert isinstance(info.value.body, dict)  # read as JSON, within the bounds
        assert blocked > 0.04
        async with AsyncFoxReload(KEY, base_url=server.url, max_retries=0) as client:
            with pytest.raises(APIStatusError):
                await client.orders.get("o1")
            async with ticking() as ticks:
                for _ in range(3):
                    with pytest.raises(APIStatusError) as info:
                        await client.orders.get("o1")
                    assert isinstance(info.value.body, dict)
    finally:
        gc.unfreeze()
    assert ticks.worst < blocked / 2, f"a tick came {ticks.worst * 1000:.0f} ms late"


@pytest.mark.slow
async def test_an_async_client_reads_one_large_body_at_a_time(server: HostileServer) -> None:
    """Each read holds the GIL while the decoder runs: reads in threads at once would hold
    the event loop as long as all of them (ticks 0.5 to 0.9 s late for eight)."""
    server.body = WORST_ACCEPTED["one-key-objects"]()
    reading, most = 0, 0
    count = threading.Lock()
    read = Parse.__call__

    def counted(parse: Parse[Any]) -> Any:
        nonlocal reading, most
        with count:
            reading += 1
            most = max(most, reading)
        try:
            return read(parse)
        finally:
            with count:
                reading -= 1

    with mock.patch.object(Parse, "__call__", counted):
        async with AsyncFoxReload(KEY, base_url=server.url, timeout=60) as client:
            orders = await asyncio.gather(*[client.orders.get("o1") for _ in range(4)],
                                          client.with_options(timeout=60).orders.get("o1"))
            server.status = 500
            errors = await asyncio.gather(
                *[client.with_options(max_retries=0).orders.get("o1") for _ in range(3)],
                return_exceptions=True)
    assert [order.id for order in orders] == ["o1"] * 5
    assert [type(error) for error in errors] == [InternalServerError] * 3
    assert most == 1


@pytest.mark.slow
def test_a_wait_takes_a_deep_body_for_a_passing_error(server: HostileServer) -> None:
    server.hostility = Hostility.DEEP_BODY
    seen: list[Any] = []

    class Heal:
        def on_poll(self, attempt: Any) -> None:
            seen.append(attempt.error)
            server.hostility = Hostility.WELL_BEHAVED

    with FoxReload(KEY, base_url=server.url, max_retries=0) as client:
        order = client.wait_for_completion("o1", policy=WaitPolicy(backoff=Fixed(0.05)),
                                           timeout=10, listener=Heal())
    assert order.codes == ("HOSTILE-TEST-CODE",)
    assert isinstance(seen[0], ResponseTooLarge)
    assert len(server.requests) == 2


@pytest.mark.slow
@pytest.mark.parametrize(("hostility", "reason"), [
    (Hostility.DEEP_BODY, f"response body nested deeper than {MAX_DEPTH}"),
    (Hostility.AMPLIFYING_BODY, f"response body holds over {MAX_VALUES} JSON values")])
def test_the_cli_reports_an_unreadable_body_in_one_line(
        hostility: Hostility, reason: str, server: HostileServer, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    server.hostility = hostility
    monkeypatch.setenv("FOXRELOAD_API_KEY", KEY)
    monkeypatch.setenv("FOXRELOAD_BASE_URL", server.url)
    assert main(["orders", "get", "o1"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if "error" in line] == [
        f"foxpoll: error: ResponseTooLarge: {reason}"]
