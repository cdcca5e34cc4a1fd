"""The sans-io heart of the client: configuration, request building, retry decisions.

Nothing here performs I/O. :func:`call_flow` is a generator that yields
:class:`~foxpoll._effects.Send` and :class:`~foxpoll._effects.Sleep` effects (and, with a
request budget, ``Permit`` and ``Feedback``); the sync and async clients drive the same
generator. Every retry decision is a pure function below, and each one logs why it was
taken.
"""

from __future__ import annotations

import email.utils
import enum
import functools
import ipaddress
import logging
import math
import os
import platform
import random
import re
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

import attrs
import httpx

from ._clock import Clock
from ._effects import Budget, Feedback, Flow, Parse, Permit, Send, Sleep
from ._parse import load_json
from ._senders import (
    ACCEPT_ENCODING,
    DEFAULT_MAX_RESPONSE_BYTES,
    DEFAULT_TIMEOUT,
    UnreadableBody,
)
from ._version import __version__
from .errors import (
    AmbiguousOrderError,
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    APITimeoutError,
    RateLimitError,
    ResponseTooLarge,
    status_error_for,
)

__all__ = ["Call", "ClientConfig", "RetryMode", "call_flow", "make_config"]

log = logging.getLogger("foxpoll")

T = TypeVar("T")
R = TypeVar("R")

DEFAULT_BASE_URL = "https://public-api.foxreload.com"
DEFAULT_MAX_RETRIES = 3
DEFAULT_MAX_RETRY_AFTER = 60.0
#: The most ``max_retry_after`` may be, in seconds (an hour): also the longest pause a
#: request budget takes, so the client's cap is the one that binds.
RETRY_AFTER_CEILING = 3600.0
#: A call's lane in the request budget unless it names one: ``Priority.FRESH`` of
#: :mod:`foxpoll.ratelimit`, which sits above this core and numbers its lanes, lower first.
DEFAULT_LANE = 1
#: The simulator's published key (``foxpoll.testing.DEFAULT_API_KEY``): no secret, so it
#: may travel over ``http://`` to a simulator on another host.
SIMULATOR_KEY = "test-key"

#: Transport errors raised before any byte of the request left: always safe to retry. A
#: ProxyError is the proxy refusing the tunnel (CONNECT) or the SOCKS handshake, before
#: the request itself is written.
UNSENT_ERRORS: tuple[type[httpx.TransportError], ...] = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.ProxyError,
)
#: Transport errors of a request refused on this machine, before it was sent: a fault of
#: the request (a header value httpx or h11 will not write), the same on every attempt.
REFUSED_ERRORS: tuple[type[httpx.TransportError], ...] = (
    httpx.LocalProtocolError,
    httpx.UnsupportedProtocol,
)
RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


def _redacted(_: object) -> str:
    return "'<redacted>'"


@attrs.frozen
class ClientConfig:
    """Everything a client needs to build and retry requests. Immutable; see ``with_options``.

    Attributes:
        api_key: Sent as ``X-API-Key``. Never shown in a repr.
        base_url: Scheme and host (and an optional path prefix) of the API.
        timeout: Seconds allowed for one HTTP request.
        max_retries: Retries after the first attempt of a request that is safe to retry.
        retry_base: The first retry's backoff ceiling, in seconds (full jitter below it).
        retry_cap: The largest backoff ceiling, in seconds.
        max_retry_after: The longest ``Retry-After`` foxpoll obeys: a request asked to
            wait longer raises :class:`RateLimitError` at once, a wait polls again after at
            most this long, and a request budget is asked to pause no longer.
        max_response_bytes: The largest response body foxpoll reads, once decoded; a
            larger one raises :class:`ResponseTooLarge`.
        headers: Extra headers for every request (``X-Language``, ``X-Currency``...).
    """

    api_key: str = attrs.field(repr=_redacted)
    base_url: httpx.URL
    timeout: float = DEFAULT_TIMEOUT
    max_retries: int = DEFAULT_MAX_RETRIES
    retry_base: float = 0.5
    retry_cap: float = 8.0
    max_retry_after: float = DEFAULT_MAX_RETRY_AFTER
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    headers: Mapping[str, str] = attrs.field(factory=dict)

    #: The headers every request carries, computed once (requests are built per poll).
    base_headers: tuple[tuple[str, str], ...] = attrs.field(
        init=False, repr=False, eq=False,
        default=attrs.Factory(lambda self: _base_headers(self), takes_self=True),
    )

    def user_agent(self) -> str:
        return (
            f"foxpoll/{__version__} httpx/{httpx.__version__} "
            f"python/{platform.python_version()}"
        )

    def url(self, path: str) -> httpx.URL:
        """The absolute URL of ``path`` (already escaped) below the base URL."""
        prefix = self.base_url.raw_path.split(b"?")[0].rstrip(b"/")
        return self.base_url.copy_with(raw_path=prefix + path.encode("ascii"))


def _base_headers(config: ClientConfig) -> tuple[tuple[str, str], ...]:
    headers = {
        "Accept": "application/json",
        "User-Agent": config.user_agent(),
        **config.headers,
        "Accept-Encoding": ACCEPT_ENCODING,  # what BodyReader decodes, with a bounded output
        "X-API-Key": config.api_key,
    }
    return tuple(headers.items())


def make_config(
    *,
    api_key: str | None,
    base_url: str | httpx.URL | None,
    timeout: float,
    max_retries: int,
    headers: Mapping[str, str] | None = None,
    language: str | None = None,
    currency: str | None = None,
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    max_retry_after: float = DEFAULT_MAX_RETRY_AFTER,
) -> ClientConfig:
    """Resolve arguments and the ``FOXRELOAD_*`` environment into a :class:`ClientConfig`."""
    key = api_key if api_key is not None else os.environ.get("FOXRELOAD_API_KEY")
    if key is not None and not isinstance(key, str):
        raise TypeError(f"api_key must be a str, not {type(key).__name__}")
    if not key:
        raise ValueError(
            "no API key: pass api_key=... or set the FOXRELOAD_API_KEY environment variable"
        )
    # Checked here, never quoted: a key httpx refuses would otherwise surface, key and
    # all, in a LocalProtocolError from deep inside the send.
    if any(ch in key for ch in "\r\n\x00"):
        raise ValueError("the API key contains a line break or NUL; check how it was loaded")
    if key != key.strip():
        raise ValueError("the API key starts or ends with whitespace; check how it was loaded")
    if not key.isascii() or not key.isprintable():
        raise ValueError("the API key must be printable ASCII; check how it was loaded")
    url = httpx.URL(base_url or os.environ.get("FOXRELOAD_BASE_URL") or DEFAULT_BASE_URL)
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError("base_url must be an absolute http(s) URL, such as https://host")
    if url.userinfo:
        # httpx would send it as Basic auth and log it, password and all, at INFO.
        raise ValueError(f"base_url holds a user name or password ({url.scheme}://...@"
                         f"{url.host}): foxpoll takes none in the URL; for a gateway that "
                         "asks for credentials, pass them in default_headers or in your "
                         "own http_client's auth=")
    if url.scheme == "http" and key != SIMULATOR_KEY and not is_loopback(url.host):
        raise ValueError(f"base_url http://{url.host} would carry the API key across the "
                         "network in clear: use https://; http:// is for a server on this "
                         "machine (localhost, 127.0.0.0/8, ::1) or the simulator's key")
    if url.path.rstrip("/").endswith("/api"):
        raise ValueError(f"base_url ends in /api ({url.path}): give the scheme and host "
                         "only, such as https://public-api.foxreload.com; the request paths "
                         "start with /api")
    check_timeout(timeout)
    check_retries(max_retries)
    check_response_bytes(max_response_bytes)
    check_max_retry_after(max_retry_after)
    extra = {name: check_header(name, value, "default_headers")
             for name, value in (headers or {}).items()}
    if language is not None:
        extra["X-Language"] = check_header("X-Language", language, "language")
    if currency is not None:
        extra["X-Currency"] = check_header("X-Currency", currency, "currency")
    return ClientConfig(
        api_key=key, base_url=url, timeout=timeout, max_retries=max_retries, headers=extra,
        max_response_bytes=max_response_bytes, max_retry_after=max_retry_after,
    )


# RFC 9110: a field name is a token; a value is visible ASCII, spaces and tabs, neither
# at its ends. h11 refuses the rest when it writes the request, which is too late to say
# which argument held it; httpx refuses non-ASCII when it builds the request.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(r"(?:[!-~](?:[ \t!-~]*[!-~])?)?")


def check_header(name: str, value: str, what: str) -> str:
    """``value``, if ``name: value`` is a header h11 writes as given; else a
    :class:`ValueError` naming ``what`` (never quoting the value, which may be a secret).
    """
    if not isinstance(name, str) or not isinstance(value, str):
        raise TypeError(f"{what}: header names and values must be str")
    if not _TOKEN.fullmatch(name):
        raise ValueError(f"{what}: {name[:40]!r} is not a valid header name")
    if not _FIELD_VALUE.fullmatch(value):
        raise ValueError(f"{what}: the value of {name} holds a line break, NUL, another "
                         "control character, non-ASCII text or whitespace at an end; "
                         "nothing was sent")
    return value


def is_loopback(host: str) -> bool:
    """Whether ``host`` (as :attr:`httpx.URL.host` gives it) names this machine:
    ``localhost``, 127.0.0.0/8 or ``::1``."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_timeout(timeout: float, what: str = "timeout") -> float:
    """``timeout``, if it is a finite number of seconds above zero."""
    return check_seconds(timeout, what)


def check_seconds(value: float, what: str, *, above_zero: bool = True,
                  below: float = math.inf) -> float:
    """``value``, if it is a finite number of seconds under ``below``, above zero (or,
    with ``above_zero=False``, zero or more); nan, infinities and bools are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            (value > 0 if above_zero else value >= 0) and value < below):
        bound = "above zero" if above_zero else "zero or more"
        limit = f", under {below:g}" if below < math.inf else ""
        raise ValueError(f"{what} must be a finite number of seconds {bound}{limit}")
    return value


def check_max_retry_after(seconds: float) -> float:
    """``seconds``, if it is a finite number above zero and at most an hour
    (:data:`RETRY_AFTER_CEILING`, the longest pause a budget takes)."""
    check_timeout(seconds, "max_retry_after")
    if seconds > RETRY_AFTER_CEILING:
        raise ValueError(f"max_retry_after must be at most {RETRY_AFTER_CEILING:.0f} seconds, "
                         "the longest pause a request budget takes")
    return seconds


def check_retries(max_retries: int) -> int:
    """``max_retries``, if it is a whole number, zero or more."""
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise ValueError("max_retries must be a whole number, zero or more")
    return max_retries


def check_response_bytes(max_bytes: int) -> int:
    """``max_bytes``, if it is a whole number above zero."""
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
        raise ValueError("max_response_bytes must be a whole number of bytes above zero")
    return max_bytes


class RetryMode(enum.Enum):
    """When a request may be sent again."""

    #: Reads: retry transport errors, 408, 429 and 5xx.
    IDEMPOTENT = "idempotent"
    #: Writes without an idempotency key: retry only errors that prove nothing was sent.
    UNSENT_ONLY = "unsent_only"


@attrs.frozen
class Call(Generic[T]):
    """One API call, described without doing it.

    Attributes:
        method: HTTP method.
        path: Path below the base URL, already escaped.
        parse: Turns the decoded JSON body into the result.
        params: Query parameters.
        json: The JSON body, for writes.
        retry_mode: Whether a failed attempt may be sent again.
        priority: Its lane in the client's rate limit (a ``Priority``; lower goes first).
    """

    method: str
    path: str
    parse: Callable[[Any], T]
    params: Mapping[str, Any] | None = None
    json: Any = None
    retry_mode: RetryMode = RetryMode.IDEMPOTENT
    priority: int = DEFAULT_LANE


def build_request(config: ClientConfig, call: Call[Any], timeout: float) -> httpx.Request:
    """The :class:`httpx.Request` for ``call``, with auth, JSON headers and a timeout."""
    params = {k: _query_value(v) for k, v in (call.params or {}).items() if v is not None}
    request = httpx.Request(
        call.method,
        config.url(call.path),
        params=params or None,
        json=call.json if call.method != "GET" else None,
        headers=config.base_headers,
        extensions={"timeout": httpx.Timeout(timeout).as_dict()},
    )
    if call.method != "GET" and call.json is not None:
        request.headers["Content-Type"] = "application/json"
    return request


def _query_value(value: object) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def decode_json(response: httpx.Response) -> Any:
    """The response body as JSON, within the bounds of :func:`foxpoll._parse.load_json`, or
    :class:`APIResponseValidationError` (:class:`ResponseTooLarge` past a bound; never the
    body text)."""
    if not response.content:
        raise APIResponseValidationError(
            f"empty body with HTTP {response.status_code}", response=response
        )
    try:
        return load_json(response.content)
    except ResponseTooLarge as exc:
        raise ResponseTooLarge(str(exc), response=response) from None
    except ValueError:
        ctype = response.headers.get("content-type", "no content type")
        raise APIResponseValidationError(
            f"body is not JSON (HTTP {response.status_code}, {ctype}, "
            f"{len(response.content)} bytes)",
            response=response,
        ) from None


def error_body(response: httpx.Response) -> object:
    """An error response's body: JSON when it parses within the bounds of
    :func:`foxpoll._parse.load_json`, else the text, else None."""
    if not response.content:
        return None
    try:
        return load_json(response.content)
    except (ValueError, ResponseTooLarge):
        return response.text


def parse_retry_after(headers: httpx.Headers, now: float) -> float | None:
    """Seconds asked for by ``Retry-After`` (delta-seconds or an HTTP date), or None."""
    value = headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            moment = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        seconds = moment.timestamp() - now
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def backoff_delay(config: ClientConfig, retry: int, rng: random.Random) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2**retry)]."""
    ceiling = min(config.retry_cap, config.retry_base * (2.0 ** min(retry, 32)))
    return rng.uniform(0.0, ceiling)


def error_from(outcome: httpx.Response | httpx.TransportError, clock: Clock,
               body: object = None) -> APIError:
    """The foxpoll exception for a failed attempt (an error status or a transport error);
    ``body`` is an error response's, as :func:`error_body` reads it."""
    if isinstance(outcome, httpx.Response):
        retry_after = (
            parse_retry_after(outcome.headers, clock.time()) if outcome.status_code == 429 else None
        )
        return status_error_for(outcome, body, retry_after=retry_after)
    request = _transport_request(outcome)
    if isinstance(outcome, UnreadableBody):
        if outcome.too_large:
            return ResponseTooLarge(str(outcome), request=request)
        return APIResponseValidationError(str(outcome), request=request)
    where = _where(request)
    if isinstance(outcome, httpx.ProxyError):
        # The proxy's answer to CONNECT (such as "502 Bad Gateway"): the API never saw it.
        said = " ".join(str(outcome).split())[:80]
        return APIConnectionError(f"the proxy refused the connection ({said}){where}",
                                  request=request)
    if isinstance(outcome, httpx.TimeoutException):
        return APITimeoutError(f"request timed out ({type(outcome).__name__}){where}",
                               request=request)
    return APIConnectionError(f"connection failed ({type(outcome).__name__}){where}",
                              request=request)


def refused(request: httpx.Request, exc: httpx.TransportError) -> ValueError:
    """The error of a request the HTTP stack refused to write: never sent, so never
    retried nor ambiguous. Its message names the request but not ``exc``'s, which quotes
    the header value at fault (a secret, perhaps)."""
    return ValueError(f"{request.method} {request.url.path} was refused before it was sent "
                      f"({type(exc).__name__}: a header value or the request line is not "
                      "valid HTTP); nothing reached FoxReload")


def _where(request: httpx.Request | None) -> str:
    """`` for GET http://host:port/path``: which server did not answer (never the query
    or the headers, where a key could be)."""
    if request is None:
        return ""
    url = request.url
    return f" for {request.method} {url.scheme}://{url.netloc.decode('ascii')}{url.path}"


def _transport_request(exc: httpx.TransportError) -> httpx.Request | None:
    try:
        return exc.request
    except RuntimeError:
        return None


def retry_delay(
    config: ClientConfig,
    call: Call[Any],
    outcome: httpx.Response | httpx.TransportError,
    error: APIError,
    retry: int,
    rng: random.Random,
) -> float | None:
    """How long to wait before sending ``call`` again, or None when it must not be resent.

    Raises:
        AmbiguousOrderError: ``call`` is a write that may have reached the server.
    """
    # A 429 is a definite "not done", for a write too: it is retried like a read.
    unsent = isinstance(outcome, UNSENT_ERRORS) or (
        isinstance(outcome, httpx.Response) and outcome.status_code == 429)
    if call.retry_mode is RetryMode.UNSENT_ONLY and not unsent:
        if _may_have_happened(outcome):
            raise AmbiguousOrderError(
                request_body=call.json, cause=error, request=error.request
            ) from error
        return None
    if isinstance(outcome, httpx.Response) and outcome.status_code not in RETRYABLE_STATUSES:
        return None
    if isinstance(outcome, UnreadableBody):  # the same server would send the same body
        return None
    if retry >= config.max_retries:
        log.debug("%s %s: not retrying, %d retries used", call.method, call.path, retry)
        return None
    if isinstance(error, RateLimitError) and error.retry_after is not None:
        if error.retry_after > config.max_retry_after:
            log.warning(
                "%s %s: Retry-After %.0fs exceeds max_retry_after %.0fs; giving up",
                call.method, call.path, error.retry_after, config.max_retry_after,
            )
            return None
        delay = error.retry_after
    else:
        delay = backoff_delay(config, retry, rng)
    log.info(
        "%s %s: retry %d/%d in %.2fs after %s",
        call.method, call.path, retry + 1, config.max_retries, delay, _describe(outcome),
    )
    return delay


def _may_have_happened(outcome: httpx.Response | httpx.TransportError) -> bool:
    """A write whose attempt ended like this may have been carried out by the server."""
    if isinstance(outcome, httpx.Response):
        # A rejection (4xx but 408) is a definite "not done"; 408 and 5xx are not.
        return outcome.status_code == 408 or outcome.status_code >= 500
    return True


def _describe(outcome: httpx.Response | httpx.TransportError) -> str:
    if isinstance(outcome, httpx.Response):
        return f"HTTP {outcome.status_code}"
    return type(outcome).__name__


def permit_flow(
    limit: Budget, priority: int, clock: Clock, deadline: float | None
) -> Flow[None]:
    """Wait for a permit of ``limit``; a wait that would cross ``deadline`` ends the call,
    and each call of the budget runs within what is left of it.

    Raises:
        APITimeoutError: no permit before ``deadline``.
        BudgetUnavailable: the budget's backend cannot be reached (it fails closed).
    """
    while True:
        wait = yield from Permit(limit, priority, _left(clock, deadline, "a permit"))
        if isinstance(wait, Exception):
            raise wait
        if wait <= 0:
            return
        if deadline is not None and clock.monotonic() + wait >= deadline:
            raise APITimeoutError("no permit from the rate limit before the deadline")
        yield from Sleep(max(wait, _MIN_PERMIT_WAIT))


def feedback_flow(limit: Budget, throttled: bool, retry_after: float | None, clock: Clock,
                  deadline: float | None) -> Flow[None]:
    """Tell ``limit`` how a request was answered, within what is left of ``deadline``
    (a 429 reported when none is left would hold the call past it: it is not)."""
    timeout = None
    if throttled and deadline is not None:
        timeout = deadline - clock.monotonic()
        if timeout <= 0:
            log.info("the deadline has passed: the 429 is not reported to the rate limit")
            return
    failed = yield from Feedback(limit, throttled, retry_after, timeout)
    if failed is not None:
        raise failed


def _left(clock: Clock, deadline: float | None, what: str) -> float | None:
    """Seconds left before ``deadline`` (None: no deadline).

    Raises:
        APITimeoutError: none is left.
    """
    if deadline is None:
        return None
    left = deadline - clock.monotonic()
    if left <= 0:
        raise APITimeoutError(f"the deadline passed before {what} from the rate limit")
    return left


_MIN_PERMIT_WAIT = 1e-3  # a shorter wait may not move a float clock at all


def call_flow(
    config: ClientConfig,
    call: Call[T],
    *,
    clock: Clock,
    rng: random.Random,
    deadline: float | None = None,
    limit: Budget | None = None,
) -> Flow[T]:
    """Send ``call``, retrying as :func:`retry_delay` decides, and return its parsed result.

    Args:
        deadline: A ``clock.monotonic()`` instant no request or sleep may run past; each
            request's timeout is shortened to fit, and a backoff that would cross it ends
            the call with the last error.
        limit: The rate limit every attempt takes a permit from, in ``call.priority``'s
            lane, and tells how it was answered.

    Raises:
        APIError: the subclass for the last failure.
    """
    retry = 0
    while True:
        if limit is not None:
            yield from permit_flow(limit, call.priority, clock, deadline)
        timeout = config.timeout
        if deadline is not None:
            remaining = deadline - clock.monotonic()
            if remaining <= 0:
                raise APITimeoutError(f"deadline passed before {call.method} {call.path}")
            timeout = min(timeout, remaining)
        request = build_request(config, call, timeout)
        started = clock.monotonic()
        outcome = yield from Send(request, call.priority, timeout, config.max_response_bytes)
        elapsed = clock.monotonic() - started
        if limit is not None and isinstance(outcome, httpx.Response):
            throttled = outcome.status_code == 429
            retry_after = parse_retry_after(outcome.headers, clock.time()) if throttled else None
            if retry_after is not None:  # the budget pauses no longer than the client obeys
                retry_after = min(retry_after, config.max_retry_after)
            yield from feedback_flow(limit, throttled, retry_after, clock, deadline)
        if isinstance(outcome, httpx.Response) and outcome.is_success:
            log.debug(
                "%s %s -> %d in %.3fs", call.method, call.path, outcome.status_code, elapsed
            )
            return (yield from _parse_success(call, outcome))
        log.debug("%s %s -> %s in %.3fs", call.method, call.path, _describe(outcome), elapsed)
        if isinstance(outcome, REFUSED_ERRORS):
            raise refused(request, outcome)
        body = None
        if isinstance(outcome, httpx.Response):
            body = yield from read_body(error_body, outcome)
        error = error_from(outcome, clock, body)
        delay = retry_delay(config, call, outcome, error, retry, rng)
        if delay is not None and deadline is not None and clock.monotonic() + delay >= deadline:
            log.info("%s %s: no retry, the deadline comes first", call.method, call.path)
            delay = None
        if delay is None:
            if isinstance(outcome, httpx.TransportError):
                raise error from outcome
            raise error
        yield from Sleep(delay)
        retry += 1


#: Bodies larger than this, successes and errors alike, are read through a :class:`Parse`
#: effect, which the async drivers perform in a worker thread: a body this size reads in
#: about a millisecond, a body at the size cap in up to a fifth of a second, too long to
#: hold an event loop.
PARSE_INLINE_BYTES = 64 * 1024


def read_body(read: Callable[[httpx.Response], R], response: httpx.Response
              ) -> Flow[R | APIResponseValidationError]:
    """``read(response)``, or the validation error it raised: inline for a small body,
    else through a :class:`Parse` effect."""
    parse = Parse(read, response)
    return (yield from parse) if len(response.content) > PARSE_INLINE_BYTES else parse()


def _parse_success(call: Call[T], response: httpx.Response) -> Flow[T]:
    outcome = yield from read_body(functools.partial(_read, call.parse), response)
    if isinstance(outcome, APIResponseValidationError):
        exc = outcome
        if exc.response is None:
            exc.response = response
            exc.request = response.request
        if call.retry_mode is RetryMode.UNSENT_ONLY:
            # The write succeeded but we cannot read what it made: the caller must reconcile.
            raise AmbiguousOrderError(
                request_body=call.json, cause=exc, request=response.request
            ) from exc
        raise exc
    return outcome


def _read(parse: Callable[[Any], T], response: httpx.Response) -> T:
    return parse(decode_json(response))

