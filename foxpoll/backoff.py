"""Poll schedules: how long to wait between polls of one order.

A policy is a reusable object; ``policy.delays(rng)`` returns a fresh iterator of seconds for
one wait, so one policy serves many concurrent waits. Randomness comes only from the
``rng`` passed in, so a seeded :class:`random.Random` makes a schedule reproducible.

=======================  =====================================================================
``ExponentialJitter``    the vendor's schedule and foxpoll's default: min(5·1.5ⁿ, 30) + 0-30 %
``Fixed``                the same wait every time, optionally jittered
``FullJitter``           uniform in [0, min(cap, base·factorⁿ)]
``DecorrelatedJitter``   uniform in [base, previous·3], capped
``Schedule``             explicit steps, e.g. 5 s for a minute, then 15-30 s
``Adaptive``             learns recent completion times; fewest polls for a target delay
``from_backoff``         any wait generator of the ``backoff`` package, unchanged
=======================  =====================================================================
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import attrs

__all__ = [
    "Adaptive",
    "BackoffPolicy",
    "DecorrelatedJitter",
    "ExponentialJitter",
    "Fixed",
    "FullJitter",
    "LearningPolicy",
    "Schedule",
    "Step",
    "from_backoff",
]


@runtime_checkable
class BackoffPolicy(Protocol):
    """Anything with ``delays(rng)``: a fresh iterator of waits, in seconds, for one wait."""

    def delays(self, rng: random.Random) -> Iterator[float]: ...


@runtime_checkable
class LearningPolicy(BackoffPolicy, Protocol):
    """A policy the poller tells when orders finish, so it can adapt.

    ``observe`` gets the bounds of when the order reached its terminal status, in seconds
    since its wait began: after the last poll that saw it pending, no later than the poll
    that saw it finished.
    """

    def observe(self, earliest: float, latest: float) -> None: ...


def _non_negative(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value >= 0 or math.isinf(value):  # also rejects NaN
        raise ValueError(f"{attribute.name} must be a finite number >= 0, not {value!r}")


def _fraction(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not 0 <= value <= 1:
        raise ValueError(f"{attribute.name} must be between 0 and 1, not {value!r}")


@attrs.frozen
class ExponentialJitter:
    """Wait ``min(base·factorⁿ, cap)`` plus up to ``jitter`` of it for the n-th wait (n from 0).

    The default is the vendor's guidance: 5 s x 1.5ⁿ, capped at 30 s, plus 0-30 %.
    """

    base: float = attrs.field(default=5.0, validator=_non_negative)
    factor: float = attrs.field(default=1.5, validator=_non_negative)
    cap: float = attrs.field(default=30.0, validator=_non_negative)
    jitter: float = attrs.field(default=0.3, validator=_fraction)

    def delays(self, rng: random.Random) -> Iterator[float]:
        for n in itertools.count():
            # factor**n overflows for large n; past the cap it no longer matters
            plain = self.cap if n > 200 else min(self.base * self.factor**n, self.cap)
            yield plain * (1.0 + rng.uniform(0.0, self.jitter))


@attrs.frozen
class Fixed:
    """Wait ``seconds`` every time, plus up to ``jitter`` of it."""

    seconds: float = attrs.field(validator=_non_negative)
    jitter: float = attrs.field(default=0.0, validator=_fraction)

    def delays(self, rng: random.Random) -> Iterator[float]:
        while True:
            yield self.seconds * (1.0 + (rng.uniform(0.0, self.jitter) if self.jitter else 0.0))


@attrs.frozen
class FullJitter:
    """Wait uniformly in [0, min(cap, base·factorⁿ)] (AWS "full jitter")."""

    base: float = attrs.field(default=5.0, validator=_non_negative)
    cap: float = attrs.field(default=30.0, validator=_non_negative)
    factor: float = attrs.field(default=2.0, validator=_non_negative)

    def delays(self, rng: random.Random) -> Iterator[float]:
        for n in itertools.count():
            ceiling = self.cap if n > 200 else min(self.cap, self.base * self.factor**n)
            yield rng.uniform(0.0, ceiling)


@attrs.frozen
class DecorrelatedJitter:
    """Wait uniformly in [base, previous·3], capped (AWS "decorrelated jitter")."""

    base: float = attrs.field(default=5.0, validator=_non_negative)
    cap: float = attrs.field(default=30.0, validator=_non_negative)

    def delays(self, rng: random.Random) -> Iterator[float]:
        previous = self.base
        while True:
            previous = min(self.cap, rng.uniform(self.base, max(self.base, previous * 3)))
            yield previous


@attrs.frozen
class Step:
    """``times`` waits of ``seconds`` (or uniform in a ``(low, high)`` range).

    ``times=None`` repeats forever; only the last step may do that.
    """

    seconds: float | tuple[float, float]
    times: int | None = None

    def __attrs_post_init__(self) -> None:
        low, high = self.bounds
        if not (0 <= low <= high) or math.isinf(high):
            raise ValueError(f"a step's seconds must be finite, >= 0 and low <= high: {self}")
        if self.times is not None and self.times < 1:
            raise ValueError("a step's times must be at least 1, or None for forever")

    @property
    def bounds(self) -> tuple[float, float]:
        if isinstance(self.seconds, tuple):
            return float(self.seconds[0]), float(self.seconds[1])
        return float(self.seconds), float(self.seconds)


def _to_steps(steps: Iterable[Step | tuple[Any, int | None]]) -> tuple[Step, ...]:
    result = tuple(s if isinstance(s, Step) else Step(*s) for s in steps)
    if not result:
        raise ValueError("a Schedule needs at least one step")
    if any(s.times is None for s in result[:-1]):
        raise ValueError("only the last step can repeat forever")
    return result


@attrs.frozen
class Schedule:
    """Explicit steps, each a number of waits; the last step repeats once the others are done.

    The vendor's alternative schedule, "every 5 s for the first minute, then every 15-30 s"::

        Schedule([Step(5, times=12), Step((15, 30))])
    """

    steps: tuple[Step, ...] = attrs.field(converter=_to_steps)

    def delays(self, rng: random.Random) -> Iterator[float]:
        for step in itertools.chain(self.steps, itertools.repeat(self.steps[-1])):
            low, high = step.bounds
            for _ in range(step.times) if step.times is not None else itertools.count():
                yield low if low == high else rng.uniform(low, high)


@attrs.frozen
class _BackoffAdapter:
    gen: Callable[..., Iterator[float]]
    jitter: Callable[[float], float] | None
    kwargs: tuple[tuple[str, Any], ...]

    def delays(self, rng: random.Random) -> Iterator[float]:
        kwargs = {k: (v() if callable(v) else v) for k, v in self.kwargs}
        wait = self.gen(**kwargs)
        wait.send(None)  # type: ignore[attr-defined]  # backoff primes its generators this way
        for value in wait:
            seconds = self.jitter(value) if self.jitter is not None else value
            yield max(0.0, float(seconds))


def from_backoff(
    gen: Callable[..., Iterator[float]],
    *,
    jitter: Callable[[float], float] | None = None,
    **kwargs: Any,
) -> BackoffPolicy:
    """Adapt a wait generator of the ``backoff`` package, such as ``backoff.expo``.

    Args:
        gen: ``backoff.expo``, ``backoff.fibo``, ``backoff.constant`` or any generator
            written the same way (primed with ``send(None)``, then one wait per ``next``).
        jitter: ``backoff.full_jitter``, ``backoff.random_jitter`` or any function of one
            wait. Those of the ``backoff`` package draw from the global :mod:`random`
            module, not from the poller's ``rng``.
        kwargs: Passed to ``gen``; a callable value is called once per wait, as
            ``backoff`` does.

    Example::

        from_backoff(backoff.expo, base=2, factor=3, max_value=30, jitter=backoff.full_jitter)
    """
    return _BackoffAdapter(gen, jitter, tuple(sorted(kwargs.items())))


class Adaptive:
    """Learns how long recent orders took, and polls when they tend to finish.

    From the last ``window`` observed completion times it chooses poll instants by dynamic
    programming: the fewest polls whose mean detection delay, over those completion times,
    is no worse than ``target_delay``. Without a ``target_delay`` it matches the mean delay
    that ``baseline`` would have had on the same completion times, so it polls less for
    the same responsiveness. Past the longest learned time it falls back to ``baseline``'s
    capped waits. Until ``min_samples`` completions are known it behaves as ``baseline``.

    Unlike the other policies it has state: share one instance between the waits that
    should learn from each other (one per product type, say). It is thread-safe.

    Args:
        target_delay: The mean detection delay to aim for, in seconds.
        baseline: The schedule to match and to fall back on.
        window: How many recent completion times to learn from.
        min_samples: Completions needed before the learned schedule is used.
        refresh_every: Recompute the schedule after this many new completions.
        jitter: Each wait is scaled by a factor uniform in [1 - jitter/2, 1 + jitter/2],
            so that orders created together do not poll together.
        explore: The share of waits that follow ``baseline`` even once a plan is learned,
            so the completion times keep being observed finely and a change is noticed.
        horizon: Completion times are learned up to this many seconds.
        resolution: Candidate poll instants are this many seconds apart (or sample
            quantiles, whichever are fewer).
    """

    def __init__(
        self,
        *,
        target_delay: float | None = None,
        baseline: ExponentialJitter | None = None,
        window: int = 1000,
        min_samples: int = 50,
        refresh_every: int = 100,
        jitter: float = 0.1,
        explore: float = 0.05,
        resolution: float = 1.0,
        horizon: float = 900.0,
    ) -> None:
        if target_delay is not None and not target_delay > 0:
            raise ValueError("target_delay must be positive")
        if not 0 <= jitter < 1:
            raise ValueError("jitter must be in [0, 1)")
        if not 0 <= explore <= 1:
            raise ValueError("explore must be between 0 and 1")
        if min_samples < 1 or window < min_samples:
            raise ValueError("need 1 <= min_samples <= window")
        self.target_delay = target_delay
        self.baseline = baseline or ExponentialJitter()
        self.min_samples = min_samples
        self.refresh_every = max(1, refresh_every)
        self.jitter = jitter
        self.explore = explore
        self.resolution = resolution
        self.horizon = horizon
        self._samples: deque[float] = deque(maxlen=window)
        self._since_refresh = 0
        self._plan: tuple[float, ...] | None = None  # poll instants, seconds since start
        self._lock = threading.Lock()
        self._impute = random.Random(0)

    def __repr__(self) -> str:
        return (
            f"Adaptive(target_delay={self.target_delay}, samples={len(self._samples)}, "
            f"polls_planned={len(self._plan or ())})"
        )

    def observe(self, earliest: float, latest: float) -> None:
        """Record that an order finished between ``earliest`` and ``latest`` seconds.

        The estimate is a known completion time drawn from inside that interval (the
        midpoint when none is): once polls follow the learned plan, intervals are wide
        exactly where orders rarely finish, and a midpoint would drag the estimate there,
        while a mean would collapse the learned spread onto one value.
        """
        if not (0 <= earliest <= latest) or math.isinf(latest):
            return
        with self._lock:
            inside = [s for s in self._samples if earliest < s <= latest]
            estimate = self._impute.choice(inside) if inside else (earliest + latest) / 2
            self._samples.append(min(estimate, self.horizon))
            self._since_refresh += 1
            if self._since_refresh >= self.refresh_every and len(self._samples) >= self.min_samples:
                self._plan = None
                self._since_refresh = 0

    def plan(self) -> tuple[float, ...] | None:
        """The learned poll instants (seconds since the wait began), or None while learning."""
        with self._lock:
            if len(self._samples) < self.min_samples:
                return None
            if self._plan is None:
                self._plan = plan_polls(
                    sorted(self._samples),
                    target_delay=self.target_delay,
                    baseline=self.baseline,
                    resolution=self.resolution,
                    max_gap=self.baseline.cap,
                )
            return self._plan

    def delays(self, rng: random.Random) -> Iterator[float]:
        instants = self.plan()
        if instants is None or (self.explore and rng.random() < self.explore):
            yield from self.baseline.delays(rng)
            return
        previous = 0.0
        for instant in instants:
            spread = 1.0 + rng.uniform(-self.jitter / 2, self.jitter / 2) if self.jitter else 1.0
            yield (instant - previous) * spread
            previous = instant
        tail = self.baseline.cap
        while True:
            yield tail * (1.0 + rng.uniform(0.0, self.baseline.jitter))


def baseline_instants(policy: ExponentialJitter, until: float) -> list[float]:
    """The poll instants of ``policy`` at its mean jitter, from 0 past ``until``."""
    mean = _MeanRandom()
    instants, now = [0.0], 0.0
    for delay in policy.delays(mean):
        now += delay
        instants.append(now)
        if now >= until:
            return instants
    raise AssertionError("unreachable: delays() is infinite")  # pragma: no cover


class _MeanRandom(random.Random):
    """A Random whose uniform() is the midpoint: the expected schedule of a jittered policy."""

    def uniform(self, a: float, b: float) -> float:
        return (a + b) / 2


def mean_delay(samples: Sequence[float], instants: Sequence[float]) -> tuple[float, float]:
    """Mean detection delay and mean polls for completion times ``samples`` (sorted)."""
    delay = polls = 0.0
    for t in samples:
        k = bisect.bisect_left(instants, t)
        if k >= len(instants):
            k = len(instants) - 1
        delay += max(0.0, instants[k] - t)
        polls += k + 1
    n = max(1, len(samples))
    return delay / n, polls / n


def plan_polls(
    samples: Sequence[float],
    *,
    target_delay: float | None,
    baseline: ExponentialJitter,
    resolution: float = 1.0,
    max_gap: float = math.inf,
    max_candidates: int = 160,
) -> tuple[float, ...]:
    """Poll instants after 0 with the fewest polls for a mean delay within the target.

    Minimises ``polls + λ·delay`` over candidate instants by dynamic programming, and
    searches λ for the cheapest plan meeting the target. No two polls are more than
    ``max_gap`` apart, so rare slow orders are not left unwatched. ``samples`` must be
    sorted.
    """
    if not samples:
        raise ValueError("no samples")
    last = samples[-1]
    if target_delay is None:
        target_delay, _ = mean_delay(samples, baseline_instants(baseline, last))
    candidates = _candidates(samples, resolution, max_candidates, max_gap)
    best: tuple[float, ...] | None = None
    low, high = 0.0, 1.0
    while _solve(samples, candidates, high, max_gap)[1] > target_delay and high < 1e6:
        high *= 4
    for _ in range(30):
        lam = (low + high) / 2
        plan, delay = _solve(samples, candidates, lam, max_gap)
        if delay <= target_delay:
            best, high = plan, lam
        else:
            low = lam
    if best is None:
        best, _ = _solve(samples, candidates, high, max_gap)
    return best


def _candidates(
    samples: Sequence[float], resolution: float, limit: int, max_gap: float
) -> list[float]:
    last = samples[-1]
    grid = [resolution * i for i in range(1, math.ceil(last / resolution) + 1)]
    if len(grid) > limit:
        step = (len(samples) - 1) / (limit - 1)
        chosen = {samples[round(i * step)] for i in range(limit)} | {last}
        if math.isfinite(max_gap):  # keep a feasible path: a candidate at least every gap
            chosen |= {max_gap * i for i in range(1, math.ceil(last / max_gap) + 1)}
        grid = sorted(chosen)
    if not grid or grid[-1] < last:
        grid.append(last)
    return [g for g in grid if g > 0]


def _solve(
    samples: Sequence[float], candidates: Sequence[float], lam: float, max_gap: float
) -> tuple[tuple[float, ...], float]:
    """Best instants for cost = polls + lam·delay, and their mean delay.

    A poll at c_j following a poll at c_i costs one request for every order still pending
    at c_i, plus lam·(c_j - t) for every order finishing at t in (c_i, c_j].
    """
    n = len(samples)
    prefix = [0.0]
    for t in samples:
        prefix.append(prefix[-1] + t)
    points = [0.0, *candidates]
    index = [bisect.bisect_right(samples, p) for p in points]  # samples done by each point
    m = len(points)
    cost = [math.inf] * m
    back = [0] * m
    cost[0] = 0.0
    for j in range(1, m):
        cj, kj = points[j], index[j]
        best, arg = math.inf, 0
        for i in range(j - 1, -1, -1):
            if cj - points[i] > max_gap:
                break  # points are sorted: every earlier one is farther still
            ki = index[i]
            pending = n - ki
            late = cj * (kj - ki) - (prefix[kj] - prefix[ki])
            value = cost[i] + pending + lam * late
            if value < best:
                best, arg = value, i
        cost[j], back[j] = best, arg
    plan, j = [], m - 1
    while j > 0:
        plan.append(points[j])
        j = back[j]
    plan.reverse()
    return tuple(plan), mean_delay(samples, [0.0, *plan])[0]
