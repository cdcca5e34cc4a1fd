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
    "MeanRandom",
    "Schedule",
    "Step",
    "UpperRandom",
    "from_backoff",
    "next_instant",
]


@runtime_checkable
class BackoffPolicy(Protocol):
    """Anything with ``delays(rng)``: a fresh iterator of waits, in seconds, for one wait.

    The poller polls at once, then waits each delay before the next poll. A policy with a
    class attribute ``polls_immediately = False`` is asked for a delay before the first
    poll too. One with ``keeps_to_plan = True`` has its delays added up into the instants
    of a plan: a poll that comes late skips the instants it overran
    (``next_instant``) rather than shift every later one.
    """

    def delays(self, rng: random.Random) -> Iterator[float]: ...


@runtime_checkable
class LearningPolicy(BackoffPolicy, Protocol):
    """A policy the poller tells when orders finish, so it can adapt.

    ``observe`` gets the bounds of when the order reached its terminal status, in seconds
    since its wait began: after the last poll that saw it pending, no later than the poll
    that saw it finished.
    """

    def observe(self, earliest: float, latest: float) -> None: ...


#: How much a second of delay past a plan's tail limit weighs against a second within it.
TAIL_WEIGHT = 20.0
#: A plan's instant counts as overrun by a late poll when less than this share of its
#: gap is left after the poll (see :func:`next_instant`).
OVERRUN_SHARE = 0.5


def next_instant(instants: Iterator[float], aimed: float, polled: float) -> float:
    """The next instant of a plan for a poll that aimed at ``aimed`` and was made at
    ``polled`` (seconds since the wait began): the first of ``instants`` (the plan's
    instants after ``aimed``, in order) with at least :data:`OVERRUN_SHARE` of its gap
    left.

    A poll on time keeps to the plan. A poll the budget postponed has already looked
    where the instants it overran would have: polling at each of them anyway would
    crowd late polls together just when the key's budget is short. Skipping them
    stretches the schedule as the budget tightens, in proportion to how late polls
    come, and spends the polls left where the plan put them.
    """
    for instant in instants:
        if instant - polled >= OVERRUN_SHARE * (instant - aimed):
            return instant
        aimed = instant
    raise ValueError("a plan's instants ran out")


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

    With ``poll_at_start=False`` the first wait comes before the first poll. Right after
    paying, a poll at once can only see ``paid``; skipping it saves a request per order
    (see ``docs/polling.md`` for the measured effect). Keep the default when a wait may
    start long after payment, as after a restart.
    """

    base: float = attrs.field(default=5.0, validator=_non_negative)
    factor: float = attrs.field(default=1.5, validator=_non_negative)
    cap: float = attrs.field(default=30.0, validator=_non_negative)
    jitter: float = attrs.field(default=0.3, validator=_fraction)
    poll_at_start: bool = True

    @property
    def polls_immediately(self) -> bool:
        return self.poll_at_start

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

    Each finished wait tells when the order finished only to within an interval: after the
    last poll that saw it pending, no later than the poll that saw it done. From the last
    ``window`` such intervals, the completion-time distribution is estimated with Turnbull's
    self-consistent (EM) estimator, and poll instants are chosen by dynamic programming:
    the fewest polls whose mean detection delay is no worse than ``target_delay``. Without
    a ``target_delay`` it aims at the mean delay that ``baseline`` would have on that
    distribution, so it polls less for the same responsiveness. Past the longest learned
    time it falls back to ``baseline``'s capped waits; until ``min_samples`` waits have
    finished it behaves as ``baseline``. Exploring waits poll as often as the plan, at
    shifted instants, so they give up no sooner than the plan's waits.

    Unlike the other policies it has state: share one instance between the waits that
    should learn from each other (one per product type, say). It is thread-safe.

    Args:
        target_delay: The mean detection delay to aim for, in seconds.
        baseline: The schedule to match and to fall back on.
        window: How many recent waits to learn from.
        min_samples: Finished waits needed before the learned schedule is used.
        refresh_every: Recompute the schedule after this many new observations.
        jitter: Each wait is scaled by a factor uniform in [1 - jitter/2, 1 + jitter/2],
            so that orders created together do not poll together.
        explore: The share of waits that also poll inside the plan's gaps (each split in
            four), so the distribution keeps being observed where the plan is sparse.
        resolution: Seconds; learned times are rounded to this.
        horizon: Completion times are learned up to this many seconds.
        caution: Without a ``target_delay``, aim at this share of the baseline's mean
            delay as estimated. Of the plans that meet a target on an estimate, the
            cheapest is one the estimate flatters; at 0.65 the delays measured in
            ``benchmarks/schedules.py`` are no longer than the baseline's.
        tail: Bound the tail as well as the mean: delays longer than this share of the
            baseline's estimated p95 weigh :data:`TAIL_WEIGHT` times more in the plan
            (None: the mean alone). At 0.8 the p95 measured in ``benchmarks/schedules.py``
            stays under the baseline's on every workload.
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
        explore: float = 0.1,
        resolution: float = 0.5,
        horizon: float = 900.0,
        caution: float = 0.65,
        tail: float | None = 0.8,
    ) -> None:
        if target_delay is not None and not target_delay > 0:
            raise ValueError("target_delay must be positive")
        if not 0 <= jitter < 1:
            raise ValueError("jitter must be in [0, 1)")
        if not 0 <= explore <= 1:
            raise ValueError("explore must be between 0 and 1")
        if min_samples < 1 or window < min_samples:
            raise ValueError("need 1 <= min_samples <= window")
        if not 0 < caution <= 1:
            raise ValueError("caution must be in (0, 1]")
        if tail is not None and not tail > 0:
            raise ValueError("tail must be positive, or None")
        self.target_delay = target_delay
        self.tail = tail
        self.caution = caution
        self.baseline = baseline or ExponentialJitter(poll_at_start=False)
        self.min_samples = min_samples
        self.refresh_every = max(1, refresh_every)
        self.jitter = jitter
        self.explore = explore
        self.resolution = resolution
        self.horizon = horizon
        self._intervals: deque[tuple[float, float]] = deque(maxlen=window)
        self._since_refresh = 0
        self._plan: tuple[float, ...] | None = None  # poll instants, seconds since start
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"Adaptive(target_delay={self.target_delay}, observed={len(self._intervals)}, "
            f"polls_planned={len(self._plan or ())})"
        )

    def observe(self, earliest: float, latest: float) -> None:
        """Record that an order finished between ``earliest`` and ``latest`` seconds."""
        if not (0 <= earliest <= latest) or math.isinf(latest):
            return
        with self._lock:
            self._intervals.append((min(earliest, self.horizon), min(latest, self.horizon)))
            self._since_refresh += 1
            if self._since_refresh >= self.refresh_every:
                self._plan = None
                self._since_refresh = 0

    def plan(self) -> tuple[float, ...] | None:
        """The learned poll instants (seconds since the wait began), or None while learning."""
        with self._lock:
            if len(self._intervals) < self.min_samples:
                return None
            if self._plan is None:
                times, weights = estimate_completion_times(
                    self._intervals, resolution=self.resolution
                )
                target = self.target_delay
                base = baseline_instants(self.baseline, times[-1])
                if target is None:
                    # The cheapest plan that meets a target *on an estimate* tends to be one
                    # the estimate flatters: aim below the baseline, to match it for real.
                    target = mean_delay(times, base, weights)[0] * self.caution
                tail = math.inf
                if self.tail is not None:
                    # A plan that meets its mean by leaving a few orders very late (one
                    # long gap over a rare slow mode) fails the customers in that tail:
                    # delays past the baseline's p95 weigh TAIL_WEIGHT times more.
                    tail = self.tail * delay_quantile(times, base, weights)
                plan = plan_polls(times, weights=weights, target_delay=target,
                                  baseline=self.baseline, max_gap=self.baseline.cap,
                                  tail_delay=tail)
                self._plan = plan
            return self._plan

    #: The first of :meth:`delays` is the wait before the first poll (0.0 polls at once).
    polls_immediately = False
    #: Its delays mark the instants of a plan: a poll that comes late skips the instants
    #: it overran (:func:`next_instant`), rather than shift the rest of the plan.
    keeps_to_plan = True

    def delays(self, rng: random.Random) -> Iterator[float]:
        instants = self.plan()
        if instants is None:
            if self.baseline.polls_immediately:
                yield 0.0
            yield from self.baseline.delays(rng)
            return
        if self.explore and rng.random() < self.explore:
            # Poll at other instants than the plan's, as many: a plan that always polls at
            # the same instants would never learn where, inside its gaps, orders finish.
            instants = _shifted(instants, self.baseline.cap, rng)
        previous = 0.0
        for instant in instants:
            spread = 1.0 + rng.uniform(-self.jitter / 2, self.jitter / 2) if self.jitter else 1.0
            yield (instant - previous) * spread
            previous = instant
        while True:
            yield self.baseline.cap * (1.0 + rng.uniform(0.0, self.baseline.jitter))


def _shifted(instants: Sequence[float], last_gap: float, rng: random.Random
             ) -> tuple[float, ...]:
    """Each instant moved to a uniform point between the midpoints with its neighbours:
    as many polls, in the same order, over the same span on average."""
    result: list[float] = []
    for index, instant in enumerate(instants):
        before = instants[index - 1] if index else 0.0
        after = instants[index + 1] if index + 1 < len(instants) else instant + last_gap
        result.append(rng.uniform((before + instant) / 2, (instant + after) / 2))
    return tuple(result)


def estimate_completion_times(
    intervals: Iterable[tuple[float, float]],
    *,
    resolution: float = 0.5,
    max_cells: int = 240,
    max_points_per_cell: int = 16,
    iterations: int = 300,
) -> tuple[list[float], list[float]]:
    """Turnbull's estimate of a distribution seen only as intervals ``(earliest, latest]``.

    Returns completion times and their probabilities: each cell between observed bounds
    gets its estimated mass, spread evenly over points ``resolution`` apart inside it (a
    poll in the middle of a cell catches only part of it). Each EM step costs
    O(intervals + cells), using prefix sums and a difference array.
    """
    spans = [(_snap(a, resolution), _snap(b, resolution)) for a, b in intervals]
    if not spans:
        raise ValueError("no intervals")
    bounds = sorted({0.0, *(x for span in spans for x in span)})
    if len(bounds) > max_cells + 1:
        step = (len(bounds) - 1) / max_cells
        bounds = sorted({bounds[round(i * step)] for i in range(max_cells + 1)})
    cells = len(bounds) - 1
    if cells < 1:
        return [bounds[0]], [1.0]
    groups: dict[tuple[int, int], int] = {}
    for a, b in spans:
        lo = min(bisect.bisect_right(bounds, a) - 1, cells - 1)
        hi = max(lo + 1, bisect.bisect_left(bounds, b))
        groups[(lo, min(hi, cells))] = groups.get((lo, min(hi, cells)), 0) + 1
    n = len(spans)
    mass = [1.0 / cells] * cells
    for _ in range(iterations):
        cumulative = list(itertools.accumulate(mass, initial=0.0))
        spread = [0.0] * (cells + 1)
        for (lo, hi), count in groups.items():
            total = cumulative[hi] - cumulative[lo]
            if total > 0:
                spread[lo] += count / total
                spread[hi] -= count / total
        running, updated, change = 0.0, [], 0.0
        for k in range(cells):
            running += spread[k]
            value = mass[k] * running / n
            change = max(change, abs(value - mass[k]))
            updated.append(value)
        mass = updated
        if change < 1e-7:
            break
    times: list[float] = []
    weights: list[float] = []
    for k in range(cells):
        if mass[k] <= 1e-9:
            continue
        low, width = bounds[k], bounds[k + 1] - bounds[k]
        parts = max(1, min(max_points_per_cell, math.ceil(width / resolution)))
        for part in range(parts):
            times.append(low + width * (part + 0.5) / parts)
            weights.append(mass[k] / parts)
    return times, weights


def _snap(value: float, resolution: float) -> float:
    return round(value / resolution) * resolution if resolution > 0 else value


def baseline_instants(policy: ExponentialJitter, until: float) -> list[float]:
    """The poll instants of ``policy`` at its mean jitter, from the start past ``until``."""
    mean = MeanRandom()
    delays = policy.delays(mean)
    now = 0.0 if policy.poll_at_start else next(delays)
    instants = [now]
    for delay in delays:
        now += delay
        instants.append(now)
        if now >= until:
            return instants
    raise AssertionError("unreachable: delays() is infinite")  # pragma: no cover


class MeanRandom(random.Random):
    """A Random whose uniform() is the midpoint: the expected schedule of a jittered policy."""

    def uniform(self, a: float, b: float) -> float:
        return (a + b) / 2


class UpperRandom(random.Random):
    """A Random whose draws are the largest possible: the longest schedule of a jittered
    policy (how late a wait can end)."""

    def uniform(self, a: float, b: float) -> float:
        return max(a, b)

    def random(self) -> float:
        return math.nextafter(1.0, 0.0)


def mean_delay(
    times: Sequence[float], instants: Sequence[float], weights: Sequence[float] | None = None
) -> tuple[float, float]:
    """Mean detection delay and mean polls, for completion ``times`` (sorted) and polls at
    ``instants`` (from the start of the wait; include 0.0 for an immediate poll);
    ``weights`` are the times' probabilities (equal when None)."""
    delay = polls = total = 0.0
    for index, t in enumerate(times):
        w = 1.0 if weights is None else weights[index]
        k = min(bisect.bisect_left(instants, t), len(instants) - 1)
        delay += w * max(0.0, instants[k] - t)
        polls += w * (k + 1)
        total += w
    total = total or 1.0
    return delay / total, polls / total


def delay_quantile(times: Sequence[float], instants: Sequence[float],
                   weights: Sequence[float] | None = None, q: float = 0.95) -> float:
    """The ``q`` quantile of the detection delay, for completion ``times`` (sorted) and
    polls at ``instants``, as :func:`mean_delay` counts them."""
    pairs = sorted(
        (max(0.0, instants[min(bisect.bisect_left(instants, t), len(instants) - 1)] - t),
         1.0 if weights is None else weights[index])
        for index, t in enumerate(times))
    total = sum(w for _, w in pairs) or 1.0
    running = 0.0
    for delay, w in pairs:
        running += w
        if running >= q * total:
            return delay
    return pairs[-1][0] if pairs else 0.0


def plan_polls(
    times: Sequence[float],
    *,
    weights: Sequence[float] | None = None,
    target_delay: float | None,
    baseline: ExponentialJitter,
    max_gap: float = math.inf,
    max_candidates: int = 160,
    tail_delay: float = math.inf,
    tail_weight: float = TAIL_WEIGHT,
) -> tuple[float, ...]:
    """Poll instants with the fewest polls for a mean delay within the target.

    The first instant is when to make the first poll (0.0 for at once).

    Minimises ``polls + λ·(delay + tail_weight·excess)`` over candidate instants by
    dynamic programming, where ``excess`` is the mean delay past ``tail_delay`` (so a
    plan does not buy its mean with a long tail), and searches λ for the cheapest plan
    meeting the target. No two polls are more than ``max_gap`` apart, so rare slow
    orders are not left unwatched. ``times`` must be sorted; ``weights`` are their
    probabilities (equal when None).
    """
    if not times:
        raise ValueError("no completion times")
    w = [1.0] * len(times) if weights is None else list(weights)
    total = sum(w)
    w = [x / total for x in w]
    if target_delay is None:
        target_delay, _ = mean_delay(times, baseline_instants(baseline, times[-1]), w)
    candidates = _candidates(times, w, max_candidates, max_gap)
    tail = (tail_delay, tail_weight)
    best: tuple[float, ...] | None = None
    low, high = 0.0, 1.0
    while (_solve(times, w, candidates, high, max_gap, tail)[1] > target_delay
           and high < 1e6):
        high *= 4
    for _ in range(30):
        lam = (low + high) / 2
        plan, delay = _solve(times, w, candidates, lam, max_gap, tail)
        if delay <= target_delay:
            best, high = plan, lam
        else:
            low = lam
    if best is None:
        best, _ = _solve(times, w, candidates, high, max_gap, tail)
    return best


def _candidates(
    times: Sequence[float], weights: Sequence[float], limit: int, max_gap: float
) -> list[float]:
    """Where a poll may go: the completion times themselves, thinned by probability mass."""
    chosen = set(times)
    if len(chosen) > limit:
        cumulative = list(itertools.accumulate(weights))
        chosen = {times[min(bisect.bisect_left(cumulative, q / limit), len(times) - 1)]
                  for q in range(1, limit + 1)}
    if math.isfinite(max_gap):  # keep a feasible path: a candidate at least every gap
        chosen |= {max_gap * i for i in range(1, math.ceil(times[-1] / max_gap) + 1)}
    chosen.add(times[-1])
    return sorted(c for c in chosen if c >= 0)


def _solve(
    times: Sequence[float],
    weights: Sequence[float],
    candidates: Sequence[float],
    lam: float,
    max_gap: float,
    tail: tuple[float, float] = (math.inf, 0.0),
) -> tuple[tuple[float, ...], float]:
    """Best instants for cost = polls + lam·(delay + weight·excess), and their mean delay.

    A poll at c_j following a poll at c_i costs the probability that the order is still
    pending at c_i, plus lam·(c_j - t)·w for every completion time t in (c_i, c_j], plus
    lam·weight·(c_j - t - limit)·w for those of them seen more than ``limit`` late
    (``tail`` is ``(limit, weight)``).
    """
    mass = list(itertools.accumulate(weights, initial=0.0))
    moment = list(itertools.accumulate((t * w for t, w in zip(times, weights, strict=True)),
                                       initial=0.0))
    # points[0] is the start of the wait, before any poll: an immediate poll at 0 is a
    # candidate like any other, worth its cost only if orders are often done already.
    points = [0.0, *candidates]
    index = [0, *(bisect.bisect_right(times, p) for p in candidates)]  # times done by each
    limit, weight = tail
    # times done by each point less the tail's limit: those are seen too late from it
    late_index = [bisect.bisect_right(times, p - limit) if weight else 0 for p in points]
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
            late = cj * (mass[kj] - mass[ki]) - (moment[kj] - moment[ki])
            kl = min(late_index[j], kj)
            if kl > ki:
                late += weight * ((cj - limit) * (mass[kl] - mass[ki])
                                  - (moment[kl] - moment[ki]))
            value = cost[i] + (1.0 - mass[ki]) + lam * late
            if value < best:
                best, arg = value, i
        cost[j], back[j] = best, arg
    plan, j = [], m - 1
    while j > 0:
        plan.append(points[j])
        j = back[j]
    plan.reverse()
    return tuple(plan), mean_delay(times, plan, weights)[0]
