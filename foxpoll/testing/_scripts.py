"""How a simulated order behaves (:class:`OrderScript`) and what goes wrong (:class:`Fault`)."""

from __future__ import annotations

import enum
import fnmatch

import attrs

__all__ = ["Fault", "FaultKind", "OrderScript", "Outcome"]


class Outcome(enum.Enum):
    """Where a paid order ends up."""

    COMPLETE = "complete"
    FAIL = "fail"
    CANCEL = "cancel"
    STALL = "stall"  # stays `processing` until the script is changed


@attrs.frozen
class OrderScript:
    """The lifecycle of one simulated order, in seconds of (virtual) time.

    After payment the order is ``paid`` for ``paid_for`` seconds, then ``processing`` for
    ``processing_for`` seconds, then reaches ``outcome``. An unpaid order is cancelled with
    ``payment_expiration`` after ``payment_expires_after`` seconds.

    Attributes:
        visible_after: GET answers 404 for this long after the create (replication lag).
        codes_after: A completed order's codes appear this long after it completes
            (infinity: never, as for a top-up credited to a player id).
    """

    outcome: Outcome = Outcome.COMPLETE
    paid_for: float = 1.0
    processing_for: float = 5.0
    cancel_reason: str = "payment_failure"
    error: str = "supplier rejected the request"
    payment_expires_after: float = 900.0
    visible_after: float = 0.0
    codes_after: float = 0.0

    @property
    def settles_after(self) -> float:
        """Seconds from payment to the terminal status (infinite for a stall)."""
        if self.outcome is Outcome.STALL:
            return float("inf")
        return self.paid_for + self.processing_for

    @classmethod
    def complete(cls, after: float = 6.0, **kwargs: object) -> OrderScript:
        """Completes ``after`` seconds after payment."""
        return cls(Outcome.COMPLETE, **_split(after), **kwargs)  # type: ignore[arg-type]

    @classmethod
    def fail(cls, after: float = 6.0, **kwargs: object) -> OrderScript:
        """Fails ``after`` seconds after payment, with a per-item error."""
        return cls(Outcome.FAIL, **_split(after), **kwargs)  # type: ignore[arg-type]

    @classmethod
    def cancel(
        cls, after: float = 2.0, reason: str = "payment_failure", **kwargs: object
    ) -> OrderScript:
        """Is cancelled ``after`` seconds after payment."""
        return cls(Outcome.CANCEL, cancel_reason=reason, **_split(after), **kwargs)  # type: ignore[arg-type]

    @classmethod
    def stall(cls, **kwargs: object) -> OrderScript:
        """Stays ``processing`` forever (until :meth:`FakeFoxReload.script` changes it)."""
        return cls(Outcome.STALL, **kwargs)  # type: ignore[arg-type]


def _split(after: float) -> dict[str, float]:
    if after < 0:
        raise ValueError("after must be zero or more")
    paid_for = min(1.0, after / 2)
    return {"paid_for": paid_for, "processing_for": after - paid_for}


class FaultKind(enum.Enum):
    """Kinds of injected failure."""

    RATE_LIMIT = "rate_limit"  # 429 with Retry-After
    SERVER_ERROR = "server_error"  # a 5xx status
    TIMEOUT = "timeout"  # no answer within the request's read timeout
    SLOW = "slow"  # answers after `delay` seconds
    MALFORMED_JSON = "malformed_json"  # 200 with a truncated JSON body
    NOT_FOUND = "not_found"  # 404
    CONNECT_ERROR = "connect_error"  # connection refused: nothing was sent
    DISCONNECT = "disconnect"  # connection dropped without an answer


@attrs.frozen
class Fault:
    """One injected failure, applied to the next ``times`` matching requests.

    Attributes:
        kind: What goes wrong.
        method: Only requests with this method (any when None).
        path: Only paths matching this glob, e.g. ``/api/orders/*`` (any when None).
        times: How many requests it applies to.
        after_handling: Do the request's work first (create the order, take the payment),
            then fail: the case a client must not retry blindly.
        status: The status for ``SERVER_ERROR``.
        retry_after: The ``Retry-After`` value for ``RATE_LIMIT`` (seconds or HTTP date).
        delay: Seconds of (virtual) time ``SLOW`` and ``TIMEOUT`` take.
    """

    kind: FaultKind
    method: str | None = None
    path: str | None = None
    times: int = 1
    after_handling: bool = False
    status: int = 503
    retry_after: float | str | None = 1
    delay: float = 0.0

    def matches(self, method: str, path: str) -> bool:
        if self.method is not None and self.method.upper() != method:
            return False
        return self.path is None or fnmatch.fnmatchcase(path, self.path)

    @classmethod
    def server_error_after_create(cls, status: int = 500) -> Fault:
        """The order is created, then the create answers ``status``."""
        return cls(
            FaultKind.SERVER_ERROR, method="POST", path="/api/orders/", after_handling=True,
            status=status,
        )
