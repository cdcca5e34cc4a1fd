"""Retry decisions, driving the sans-io call flow by hand: no network, no real time."""

from __future__ import annotations

import random
from datetime import datetime, timezone
from email.utils import format_datetime
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from foxpoll import (
    AmbiguousOrderError,
    APIConnectionError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    BadRequestError,
    FoxReload,
    InternalServerError,
    RateLimitError,
)
from foxpoll._core import (
    Call,
    ClientConfig,
    RetryMode,
    backoff_delay,
    call_flow,
    make_config,
    parse_retry_after,
)
from foxpoll._effects import Feedback, Permit, Send, Sleep
from foxpoll.backoff import Fixed
from foxpoll.polling import WaitPolicy
from foxpoll.ratelimit import Priority, RateLimit
from foxpoll.testing import FakeClock, FakeFoxReload, Fault, FaultKind, OrderScript

from .conftest import API_KEY

CONFIG = make_config(api_key=API_KEY, base_url="https://x.test", timeout=10, max_retries=3)
GET = Call("GET", "/api/orders/1", lambda data: data)
CREATE = Call("POST", "/api/orders/", lambda data: data, json={"items": [{"itemId": "p"}]},
              retry_mode=RetryMode.UNSENT_ONLY)


def respond(
    request: httpx.Request, status: int, body: Any = None, **headers: str
) -> httpx.Response:
    if body is None:
        return httpx.Response(status, headers=headers, request=request)
    return httpx.Response(status, json=body, headers=headers, request=request)


class Driver:
    """Steps a flow by hand, answering each Send from a script and recording sleeps."""

    def __init__(self, call: Call[Any], *, config: ClientConfig = CONFIG,
                 deadline: float | None = None) -> None:
        self.clock = FakeClock()
        self.flow = call_flow(config, call, clock=self.clock, rng=random.Random(7),
                              deadline=deadline)
        self.sent: list[httpx.Request] = []
        self.sleeps: list[float] = []

    def run(self, *answers: Any) -> Any:
        script = list(answers)
        effect = next(self.flow)
        try:
            while True:
                if isinstance(effect, Sleep):
                    self.sleeps.append(effect.seconds)
                    self.clock.advance(effect.seconds)
                    effect = self.flow.send(None)
                    continue
                assert isinstance(effect, Send)
                self.sent.append(effect.request)
                answer = script.pop(0)
                outcome = answer(effect.request) if callable(answer) else answer
                effect = self.flow.send(outcome)
        except StopIteration as stop:
            assert not script, "flow finished before using every scripted answer"
            return stop.value


def status(code: int, body: Any = None, **headers: str) -> Any:
    return lambda request: respond(request, code, body, **headers)


def error(kind: type[httpx.TransportError]) -> Any:
    return lambda request: kind("boom", request=request)


@pytest.mark.parametrize("code", [408, 429, 500, 502, 503, 504])
def test_reads_retry_transient_statuses(code: int) -> None:
    driver = Driver(GET)
    assert driver.run(status(code), status(200, {"ok": 1})) == {"ok": 1}
    assert len(driver.sent) == 2
    assert len(driver.sleeps) == 1


@pytest.mark.parametrize(
    "kind", [httpx.ConnectError, httpx.ConnectTimeout, httpx.ReadTimeout, httpx.ReadError,
             httpx.RemoteProtocolError, httpx.WriteError, httpx.PoolTimeout]
)
def test_reads_retry_transport_errors(kind: type[httpx.TransportError]) -> None:
    driver = Driver(GET)
    assert driver.run(error(kind), status(200, {"ok": 1})) == {"ok": 1}
    assert len(driver.sent) == 2


@pytest.mark.parametrize("code", [400, 401, 402, 403, 404, 409, 422])
def test_other_client_errors_are_never_retried(code: int) -> None:
    driver = Driver(GET)
    with pytest.raises(APIStatusError) as info:
        driver.run(status(code, {"detail": "no"}))
    assert info.value.status_code == code
    assert len(driver.sent) == 1
    assert driver.sleeps == []


def test_retries_stop_at_max_retries_with_the_last_error() -> None:
    driver = Driver(GET)
    with pytest.raises(InternalServerError):
        driver.run(*[status(503)] * 4)
    assert len(driver.sent) == 4  # the first attempt and 3 retries


def test_zero_retries_sends_once() -> None:
    config = make_config(api_key=API_KEY, base_url="https://x.test", timeout=5, max_retries=0)
    driver = Driver(GET, config=config)
    with pytest.raises(APITimeoutError):
        driver.run(error(httpx.ReadTimeout))
    assert len(driver.sent) == 1


def test_transport_errors_map_to_connection_and_timeout_errors() -> None:
    with pytest.raises(APIConnectionError) as info:
        Driver(GET).run(*[error(httpx.ConnectError)] * 4)
    assert not isinstance(info.value, APITimeoutError)
    assert isinstance(info.value.__cause__, httpx.ConnectError)
    with pytest.raises(APITimeoutError):
        Driver(GET).run(*[error(httpx.ReadTimeout)] * 4)


def test_retry_after_seconds_is_honoured_exactly() -> None:
    driver = Driver(GET)
    driver.run(status(429, {"detail": "slow down"}, **{"Retry-After": "7"}), status(200, {}))
    assert driver.sleeps == [7.0]


def test_retry_after_http_date_is_honoured() -> None:
    driver = Driver(GET)
    when = datetime.fromtimestamp(driver.clock.time() + 12, tz=timezone.utc)
    driver.run(status(429, None, **{"Retry-After": format_datetime(when, usegmt=True)}),
               status(200, {}))
    assert driver.sleeps == [pytest.approx(12.0, abs=1.0)]


def test_a_retry_after_beyond_the_cap_raises_rate_limit_error_at_once() -> None:
    driver = Driver(GET)
    with pytest.raises(RateLimitError) as info:
        driver.run(status(429, {"detail": "quota"}, **{"Retry-After": "3600"}))
    assert info.value.retry_after == 3600
    assert driver.sleeps == []


def test_429_without_retry_after_uses_backoff() -> None:
    driver = Driver(GET)
    driver.run(status(429), status(200, {}))
    assert 0 <= driver.sleeps[0] <= CONFIG.retry_base


def test_backoff_grows_exponentially_with_full_jitter() -> None:
    driver = Driver(GET)
    with pytest.raises(InternalServerError):
        driver.run(*[status(500)] * 4)
    ceilings = [min(CONFIG.retry_cap, CONFIG.retry_base * 2**n) for n in range(3)]
    assert all(0 <= s <= c for s, c in zip(driver.sleeps, ceilings, strict=True))
    assert len(set(driver.sleeps)) == 3  # jittered, not fixed


@given(st.integers(0, 10_000), st.integers(0, 2**32))
def test_backoff_delay_bounds(retry: int, seed: int) -> None:
    delay = backoff_delay(CONFIG, retry, random.Random(seed))
    assert 0 <= delay <= min(CONFIG.retry_cap, CONFIG.retry_base * 2.0 ** min(retry, 32))


header_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40)


@given(st.one_of(header_text, st.floats(allow_nan=True).map(str),
                 st.integers(-10**6, 10**6).map(str)))
def test_parse_retry_after_never_crashes(value: str) -> None:
    headers = httpx.Headers({"Retry-After": value})
    result = parse_retry_after(headers, now=1_800_000_000)
    assert result is None or result >= 0


@pytest.mark.parametrize(("value", "expected"), [("0", 0.0), ("2.5", 2.5), ("-4", 0.0),
                                                  ("nan", None), ("soon", None), ("inf", None)])
def test_parse_retry_after_values(value: str, expected: float | None) -> None:
    assert parse_retry_after(httpx.Headers({"Retry-After": value}), now=0) == expected


def test_deadline_shortens_the_request_timeout() -> None:
    driver = Driver(GET, deadline=4.0)
    driver.run(status(200, {}))
    assert driver.sent[0].extensions["timeout"]["read"] == 4.0


def test_no_retry_sleeps_past_the_deadline() -> None:
    driver = Driver(GET, deadline=3.0)
    with pytest.raises(RateLimitError):
        driver.run(status(429, None, **{"Retry-After": "5"}))
    assert driver.sleeps == []


def test_a_passed_deadline_sends_nothing() -> None:
    driver = Driver(GET, deadline=-1.0)
    with pytest.raises(APITimeoutError, match="deadline"):
        driver.run()
    assert driver.sent == []


# -- the create rule: never a second POST once it may have left ------------------------


@pytest.mark.parametrize("kind", [httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout])
def test_create_is_retried_when_it_provably_never_left(kind: type[httpx.TransportError]) -> None:
    driver = Driver(CREATE)
    assert driver.run(error(kind), status(201, {"id": "o"})) == {"id": "o"}
    assert len(driver.sent) == 2


@pytest.mark.parametrize(
    "answer",
    [error(httpx.ReadTimeout), error(httpx.WriteTimeout), error(httpx.ReadError),
     error(httpx.WriteError), error(httpx.RemoteProtocolError), status(500), status(502),
     status(503), status(504), status(408)],
)
def test_create_that_may_have_happened_is_ambiguous_and_sent_once(answer: Any) -> None:
    driver = Driver(CREATE)
    with pytest.raises(AmbiguousOrderError) as info:
        driver.run(answer)
    assert len(driver.sent) == 1
    assert driver.sleeps == []
    assert info.value.request_body == CREATE.json
    assert info.value.cause is info.value.__cause__


def test_create_with_an_unreadable_success_body_is_ambiguous() -> None:
    driver = Driver(CREATE)
    with pytest.raises(AmbiguousOrderError) as info:
        driver.run(lambda r: httpx.Response(201, content=b"{oops", request=r))
    assert isinstance(info.value.cause, APIResponseValidationError)


def test_a_create_or_payment_refused_with_429_is_retried_after_its_retry_after() -> None:
    driver = Driver(CREATE)  # a 429 is a definite "not done": nothing was bought
    created = driver.run(status(429, {"detail": "slow"}, **{"Retry-After": "7"}),
                         status(201, {"id": "o1"}))
    assert created == {"id": "o1"}
    assert (len(driver.sent), driver.sleeps) == (2, [7.0])


def test_a_create_refused_with_429_every_time_is_a_rate_limit_error_not_ambiguous() -> None:
    driver = Driver(CREATE)
    with pytest.raises(RateLimitError):
        driver.run(*[status(429, {"detail": "slow"}, **{"Retry-After": "1"})] * 4)
    assert len(driver.sent) == 4  # max_retries is 3


def test_a_create_asked_to_wait_past_max_retry_after_is_not_resent() -> None:
    driver = Driver(CREATE)
    with pytest.raises(RateLimitError):
        driver.run(status(429, {"detail": "slow"}, **{"Retry-After": "3600"}))
    assert len(driver.sent) == 1


def test_create_rejected_with_4xx_raises_the_status_error() -> None:
    driver = Driver(CREATE)
    with pytest.raises(BadRequestError) as info:
        driver.run(status(400, {"detail": "bad item", "code": "BAD_ITEM"}))
    assert info.value.code == "BAD_ITEM"


def test_create_connect_failures_still_respect_max_retries() -> None:
    driver = Driver(CREATE)
    with pytest.raises(APIConnectionError):
        driver.run(*[error(httpx.ConnectError)] * 4)
    assert len(driver.sent) == 4


def test_malformed_success_body_of_a_read_is_a_validation_error() -> None:
    driver = Driver(GET)
    with pytest.raises(APIResponseValidationError) as info:
        driver.run(lambda r: httpx.Response(200, content=b"<html>", request=r))
    assert info.value.response is not None
    assert info.value.response.status_code == 200


def test_a_call_takes_its_permit_in_the_fresh_lane_unless_it_names_one() -> None:
    clock = FakeClock()
    limit = RateLimit(60, clock=clock)
    for call, lane in [(GET, Priority.FRESH), (CREATE, Priority.FRESH),
                       (Call("GET", "/api/orders/1", str, priority=Priority.POLL),
                        Priority.POLL)]:
        flow = call_flow(CONFIG, call, clock=clock, rng=random.Random(7), limit=limit)
        permit = next(flow)
        assert isinstance(permit, Permit)
        assert permit.priority == lane
        send = flow.send(0.0)  # taken
        assert isinstance(send, Send)
        assert send.priority == lane  # and it queues for a slot in the same lane
        feedback = flow.send(respond(send.request, 200, {"id": "1"}))
        assert isinstance(feedback, Feedback)
        assert not feedback.throttled
        flow.close()


# -- max_retry_after: one cap on every Retry-After ---------------------------------------


@pytest.mark.parametrize("asked", ["30", "999999"])
def test_the_client_max_retry_after_caps_the_pause_it_asks_of_its_budget(asked: str) -> None:
    clock = FakeClock()
    sim = FakeFoxReload(clock=clock, default_script=OrderScript.complete(after=20))
    limit = RateLimit(6000, clock=clock)
    with sim.client(rate_limit=limit, max_retry_after=5) as client:
        assert client.max_retry_after == 5
        order = client.orders.create(items=[{"itemId": "product_steam_10"}])
        client.orders.pay(order.id)
        sim.inject(Fault(FaultKind.RATE_LIMIT, method="GET", retry_after=asked))
        client.wait_for_completion(order.id, policy=WaitPolicy(backoff=Fixed(1)))
        assert limit.throttles == 1
    gets = [r.at for r in sim.requests if r.method == "GET"]
    assert 5 - 1e-6 <= gets[1] - gets[0] <= 5 + 1e-6  # the cap, not what the server asked


def test_max_retry_after_is_checked_by_the_constructor() -> None:
    with pytest.raises(ValueError, match="max_retry_after"):
        FoxReload("key", base_url="https://api.test", max_retry_after=0)


@pytest.mark.parametrize("seconds", [3600.5, 7200, 1e9])
def test_max_retry_after_is_at_most_the_longest_pause_a_budget_takes(seconds: float) -> None:
    """One cap: a max_retry_after above the budget's own bound would let the wait obey a
    Retry-After that the budget, shared with other processes, cuts short."""
    from foxpoll.ratelimit import MAX_PAUSE

    with pytest.raises(ValueError, match="at most 3600"):
        FoxReload("key", base_url="https://api.test", max_retry_after=seconds)
    with FoxReload("key", base_url="https://api.test", max_retry_after=MAX_PAUSE) as client:
        assert client.max_retry_after == MAX_PAUSE
        with pytest.raises(ValueError, match="at most 3600"):
            client.with_options(max_retry_after=seconds)
