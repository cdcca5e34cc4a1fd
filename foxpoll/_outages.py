"""Loops that outlive outages: the recovery worker, the procrastinate worker and its
dispatcher, and the stream consumers.

Each loop runs rounds. A round that fails is an outage (unless the loop says otherwise),
waited out on a jittered, capped schedule; :class:`Outages` keeps the bookkeeping of one
loop (the waits, the one log line per outage, the count) and leaves the waiting to the
loop, which is sync, async or a flow.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from typing import Any

from ._io import Flow, call
from .backoff import BackoffPolicy, FullJitter
from .errors import FoxPollError

__all__ = ["OUTAGE_BACKOFF", "PROGRAMMING_ERRORS", "STOP_LOOKS_EVERY", "Outages", "describe"]

#: The wait before a failed round is tried again: up to 1 s, then up to 2 s, 4 s... never
#: more than a minute, drawn uniformly ("full jitter") so a fleet does not retry in step.
OUTAGE_BACKOFF = FullJitter(base=1.0, cap=60.0, factor=2.0)

#: How often a waiting loop looks whether it was told to stop, in seconds.
STOP_LOOKS_EVERY = 0.1

#: Errors that say the code or its wiring is wrong, not that a service is down: waiting
#: cannot cure them, so they end a loop at once. (``BaseException`` outside
#: ``Exception``, such as ``KeyboardInterrupt``, is never caught.)
PROGRAMMING_ERRORS: tuple[type[Exception], ...] = (
    TypeError, AttributeError, NameError, ImportError, AssertionError, NotImplementedError,
    SyntaxError,
)


def describe(error: BaseException) -> str:
    """An error for a log line: foxpoll's own with its message (written to be safe to
    show), any other by its type only (a driver's text may quote a connection string)."""
    name = type(error).__name__
    return f"{name}: {error}" if isinstance(error, FoxPollError) else name


class Outages:
    """The outages of one loop: how long to wait after each failed round, and what to log
    and count.

    The first failure of an outage is logged at WARNING, the rounds that follow only at
    DEBUG, and the first success after it at INFO; the loop counts every failure on
    ``metrics.on_worker_error(component, error)`` with :meth:`count`. The waits come from
    ``backoff``, afresh for each outage; a finite schedule keeps repeating its last wait.

    Args:
        component: The metric's ``component`` label (``recovery``, ``events``...).
        label: How log lines name the loop (``recovery worker``).
        log: The logger of the loop's module.
        backoff: The waits between failed rounds.
        rng: Random source for their jitter.
        metrics: Told of every failure through its ``on_worker_error``, if it has one
            (``foxpoll.metrics`` objects do); without it (or None) nothing is counted.
        clock: Seconds on a monotonic clock, for the outage's length in the log.
    """

    def __init__(self, component: str, label: str, *, log: logging.Logger,
                 backoff: BackoffPolicy, rng: random.Random, metrics: Any,
                 clock: Callable[[], float]) -> None:
        self.component, self.label, self.log = component, label, log
        self.backoff, self.rng, self.metrics, self.clock = backoff, rng, metrics, clock
        self.failures = 0
        self._delays: Iterator[float] | None = None  # None: no outage under way
        self._delay = 0.0
        self._since = 0.0

    @property
    def ongoing(self) -> bool:
        """An outage is under way: the last round failed."""
        return self._delays is not None

    def failed(self, error: Exception) -> float:
        """Record a failed round; return the seconds to wait before the next one. (The
        loop counts it with :meth:`count`.)"""
        if self._delays is None:
            self._delays = self.backoff.delays(self.rng)
            self._since, self.failures = self.clock(), 0
            self.log.warning("%s: round failed (%s); retrying until it succeeds", self.label,
                             describe(error))
        self.failures += 1
        self.log.debug("%s: round %d of the outage failed", self.label, self.failures,
                       exc_info=error)
        self._delay = next(self._delays, self._delay)
        return self._delay

    def count(self, error: Exception) -> Flow[None]:
        """Count a failed round on ``metrics.on_worker_error(component, error)``, when
        ``metrics`` has that hook. A flow, so that each loop's driver calls the hook: an
        async loop awaits an async hook, a blocking loop refuses one with a
        :class:`TypeError` (it cannot await it)."""
        hook = getattr(self.metrics, "on_worker_error", None)
        if hook is not None:
            yield from call(hook, self.component, error)

    def succeeded(self) -> None:
        """Record a round that worked: the end of the outage, if one was under way."""
        if self._delays is not None:
            self.log.info("%s: recovered after %d failed round(s) in %.1f s", self.label,
                          self.failures, self.clock() - self._since)
            self._delays = None
