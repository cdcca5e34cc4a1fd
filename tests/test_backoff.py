from __future__ import annotations

import bisect
import itertools
import math
import random

import backoff as backoff_pkg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from foxpoll.backoff import (
    OVERRUN_SHARE,
    Adaptive,
    BackoffPolicy,
    DecorrelatedJitter,
    ExponentialJitter,
    Fixed,
    FullJitter,
    Schedule,
    Step,
    _candidates,
    _solve,
    baseline_instants,
    delay_quantile,
    estimate_completion_times,
    from_backoff,
    mean_delay,
    next_instant,
    plan_polls,
)

seeds = st.integers(0, 2**32)
positive = st.floats(0.01, 100, allow_nan=False)


def take(policy: BackoffPolicy, n: int, seed: int = 0) -> list[float]:
    return list(itertools.islice(policy.delays(random.Random(seed)), n))


def test_default_is_the_vendor_schedule() -> None:
    policy = ExponentialJitter()
    assert (policy.base, policy.factor, policy.cap, policy.jitter) == (5.0, 1.5, 30.0, 0.3)
    delays = take(ExponentialJitter(jitter=0), 7)
    assert delays == [5.0, 7.5, 11.25, 16.875, 25.3125, 30.0, 30.0]


@given(positive, st.floats(1, 3), positive, st.floats(0, 1), seeds)
def test_exponential_jitter_bounds(
    base: float, factor: float, cap: float, jitter: float, seed: int
) -> None:
    policy = ExponentialJitter(base=base, factor=factor, cap=cap, jitter=jitter)
    for n, delay in enumerate(take(policy, 60, seed)):
        plain = min(base * factor**n, cap)
        assert plain * (1 - 1e-9) <= delay <= plain * (1 + jitter) * (1 + 1e-9)


def test_exponential_never_overflows() -> None:
    delays = policy_delays = ExponentialJitter(factor=10).delays(random.Random(0))
    last = [next(policy_delays) for _ in range(1000)][-1]
    assert math.isfinite(last)
    assert last <= 30 * 1.3
    assert delays is policy_delays


@given(positive, st.floats(0, 1), seeds)
def test_fixed_bounds(seconds: float, jitter: float, seed: int) -> None:
    for delay in take(Fixed(seconds, jitter=jitter), 20, seed):
        assert seconds * (1 - 1e-9) <= delay <= seconds * (1 + jitter) * (1 + 1e-9)


@given(positive, positive, st.floats(1, 4), seeds)
def test_full_jitter_bounds(base: float, cap: float, factor: float, seed: int) -> None:
    for n, delay in enumerate(take(FullJitter(base, cap, factor), 40, seed)):
        assert 0 <= delay <= min(cap, base * factor**n) * (1 + 1e-9)


@given(positive, positive, seeds)
def test_decorrelated_jitter_bounds(base: float, cap: float, seed: int) -> None:
    previous = base
    for delay in take(DecorrelatedJitter(base, cap), 40, seed):
        assert delay <= cap * (1 + 1e-9)
        assert delay >= min(base, cap) * (1 - 1e-9)
        assert delay <= max(base, previous * 3) * (1 + 1e-9)
        previous = delay


def test_vendor_stepped_schedule() -> None:
    policy = Schedule([Step(5, times=12), Step((15, 30))])
    delays = take(policy, 100, seed=3)
    assert delays[:12] == [5.0] * 12
    assert all(15 <= d <= 30 for d in delays[12:])
    assert len(set(delays[12:])) > 50  # drawn, not fixed


def test_schedule_accepts_tuples_and_repeats_the_last_step() -> None:
    assert take(Schedule([(1, 2), (3, 1)]), 5) == [1, 1, 3, 3, 3]


@given(st.lists(st.tuples(st.floats(0, 50), st.floats(0, 50), st.integers(1, 5)), min_size=1,
                max_size=5), seeds)
def test_schedule_bounds(raw: list[tuple[float, float, int]], seed: int) -> None:
    steps = [Step((min(a, b), max(a, b)), times=t) for a, b, t in raw]
    expected = [s.bounds for s in steps for _ in range(s.times or 1)]
    expected += [steps[-1].bounds] * 10
    for delay, (low, high) in zip(take(Schedule(steps), len(expected), seed), expected,
                                  strict=True):
        assert low <= delay <= high


@pytest.mark.parametrize(
    "make",
    [lambda: Schedule([]), lambda: Schedule([Step(1), Step(2)]), lambda: Step((5, 1)),
     lambda: Step(1, times=0), lambda: ExponentialJitter(base=-1), lambda: Fixed(math.nan),
     lambda: ExponentialJitter(jitter=2), lambda: Fixed(math.inf), lambda: Adaptive(jitter=1),
     lambda: Adaptive(min_samples=10, window=5), lambda: Adaptive(target_delay=0)],
)
def test_bad_parameters_are_rejected(make: object) -> None:
    with pytest.raises(ValueError, match=r"must|need|only|at least"):
        make()  # type: ignore[operator]


def test_policies_are_reusable_and_reproducible() -> None:
    policy = ExponentialJitter()
    first, second = policy.delays(random.Random(5)), policy.delays(random.Random(5))
    a = [next(first) for _ in range(10)]
    b = [next(second) for _ in range(10)]
    assert a == b
    assert take(policy, 10, seed=6) != a
    with pytest.raises(AttributeError):
        policy.base = 1  # type: ignore[misc]  # frozen


@pytest.mark.parametrize(
    ("gen", "kwargs", "expected"),
    [(backoff_pkg.expo, {"base": 2, "factor": 1, "max_value": 10}, [1, 2, 4, 8, 10, 10]),
     (backoff_pkg.fibo, {"max_value": 10}, [1, 1, 2, 3, 5, 8]),
     (backoff_pkg.constant, {"interval": 7}, [7, 7, 7, 7, 7, 7]),
     (backoff_pkg.constant, {"interval": [1, 2, 3]}, [1, 2, 3])],
)
def test_from_backoff_yields_what_backoff_would(gen: object, kwargs: dict[str, object],
                                                expected: list[float]) -> None:
    policy = from_backoff(gen, **kwargs)  # type: ignore[arg-type]
    assert take(policy, 6) == expected
    assert take(policy, 6) == expected  # a fresh generator for every wait


def test_from_backoff_with_a_backoff_jitter_function() -> None:
    policy = from_backoff(backoff_pkg.expo, base=2, max_value=16, jitter=backoff_pkg.full_jitter)
    for n, delay in enumerate(take(policy, 8)):
        assert 0 <= delay <= min(2**n, 16)


def test_from_backoff_calls_callable_kwargs_per_wait() -> None:
    calls = []

    def interval() -> int:
        calls.append(1)
        return 3

    policy = from_backoff(backoff_pkg.constant, interval=interval)
    assert take(policy, 2) == [3, 3]
    take(policy, 2)
    assert len(calls) == 2


def completion_times(seed: int, n: int = 600) -> list[float]:
    rng = random.Random(seed)
    return sorted(min(900.0, rng.lognormvariate(math.log(14), 0.9)) for _ in range(n))


def test_adaptive_behaves_as_baseline_until_it_has_learned() -> None:
    adaptive = Adaptive(min_samples=10)
    assert adaptive.plan() is None
    assert not adaptive.polls_immediately  # its first delay comes before the first poll...
    assert take(adaptive, 5, seed=1) == take(ExponentialJitter(poll_at_start=False), 5, seed=1)
    at_once = Adaptive(min_samples=10, baseline=ExponentialJitter())  # ...0 for a baseline
    assert take(at_once, 6, seed=1) == [0.0, *take(ExponentialJitter(), 5, seed=1)]  # at once


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_exploring_waits_poll_as_often_as_the_plan_so_they_give_up_no_sooner(
        seed: int) -> None:
    # Issue: exploring waits split every gap in four, so 40 attempts ran out long before
    # the plan's end and 1.2 % of typical orders were given up.
    planned = Adaptive(min_samples=50, explore=0.0, jitter=0.0)
    exploring = Adaptive(min_samples=50, explore=1.0, jitter=0.0)
    for t in completion_times(seed, 300):
        for adaptive in (planned, exploring):
            adaptive.observe(t - 0.5, t + 0.5)
    plan = exploring.plan()
    assert plan is not None
    assert plan == planned.plan()
    rng = random.Random(seed)
    for _ in range(20):
        shifted = list(itertools.accumulate(itertools.islice(exploring.delays(rng), len(plan))))
        assert shifted != pytest.approx(list(plan))  # other instants than the plan's...
        assert shifted == sorted(shifted)
        for instant, before, after in zip(shifted, [0.0, *plan], [*plan[1:], plan[-1] + 30],
                                          strict=False):
            assert before / 2 <= instant <= after  # ...each near its own planned poll
        forty = sum(itertools.islice(exploring.delays(rng), 40))
        # As far, give or take the jitter of the capped tail (split gaps reached ~1/3).
        assert forty >= 0.9 * sum(itertools.islice(planned.delays(rng), 40))


def test_poll_at_start_false_waits_first() -> None:
    assert ExponentialJitter().polls_immediately
    late = ExponentialJitter(poll_at_start=False)
    assert not late.polls_immediately
    assert take(late, 3, seed=2) == take(ExponentialJitter(), 3, seed=2)  # same waits
    assert baseline_instants(late, 20)[0] == pytest.approx(5 * 1.15)
    assert baseline_instants(ExponentialJitter(), 20)[0] == 0.0


@settings(max_examples=10, deadline=None)
@given(seeds)
def test_adaptive_plan_polls_less_at_no_worse_mean_delay(seed: int) -> None:
    samples = completion_times(seed)
    base = ExponentialJitter()
    plan = plan_polls(samples, target_delay=None, baseline=base, max_gap=base.cap)
    plan_delay, plan_polls_mean = mean_delay(samples, plan)
    base_delay, base_polls = mean_delay(samples, baseline_instants(base, samples[-1]))
    assert plan_delay <= base_delay + 1e-9
    assert plan_polls_mean < base_polls
    gaps = [b - a for a, b in itertools.pairwise([0.0, *plan])]
    assert max(gaps) <= base.cap + 1e-9
    assert plan[-1] >= samples[-1]


def _excess(samples: list[float], plan: tuple[float, ...], limit: float) -> float:
    """The mean delay past ``limit``."""
    return sum(max(0.0, delay - limit) for delay in (
        plan[min(bisect.bisect_left(plan, t), len(plan) - 1)] - t for t in samples)
    ) / len(samples)


@settings(max_examples=25, deadline=None)
@given(seeds, st.floats(1.0, 20.0), st.floats(0.05, 5.0))
def test_a_tail_bound_never_lengthens_the_tail(seed: int, limit: float, lam: float) -> None:
    rng = random.Random(seed)
    # a fast body and a rare slow mode, as gift cards: the mean alone may leave the slow
    # mode one long gap
    samples = sorted([min(15.0, max(1.0, rng.lognormvariate(math.log(3), 0.5)))
                      for _ in range(200)] + [rng.uniform(15, 60) for _ in range(10)])
    weights = [1 / len(samples)] * len(samples)
    candidates = _candidates(samples, weights, 80, 30.0)
    free, free_delay = _solve(samples, weights, candidates, lam, 30.0)
    bound, bound_delay = _solve(samples, weights, candidates, lam, 30.0, (limit, 20.0))
    # the same trade at the same price of delay: the bound can only move delay out of
    # the tail, paying for it in polls or in delay within the limit
    assert _excess(samples, bound, limit) <= _excess(samples, free, limit) + 1e-9
    free_cost = mean_delay(samples, free)[1] + lam * free_delay
    assert mean_delay(samples, bound)[1] + lam * bound_delay >= free_cost - 1e-9


@given(st.lists(st.floats(0.0, 60.0), min_size=1, max_size=30),
       st.lists(st.floats(0.0, 120.0), min_size=1, max_size=30))
def test_next_instant_keeps_to_the_plan_and_only_skips_what_a_late_poll_overran(
        gaps: list[float], lateness: list[float]) -> None:
    plan = list(itertools.accumulate(gaps))
    horizon = plan[-1]
    tail = [horizon + 60.0 * k for k in range(1, 10_000)]
    # on time, every instant is kept
    instants = iter(plan + tail)
    aimed = 0.0
    for expected in plan:
        aimed = next_instant(instants, aimed, aimed)
        assert aimed == expected
    # late by any amount: never before the poll, never more polls than the plan's
    instants = iter(plan + tail)
    aimed, polls = 0.0, 0
    for late in itertools.cycle(lateness):
        polled = aimed + late
        chosen = next_instant(instants, aimed, polled)
        assert chosen >= polled
        # every instant skipped on the way had less than half its gap left
        between = [t for t in plan + tail if aimed < t < chosen]
        previous = aimed
        for skipped in between:
            assert skipped - polled < OVERRUN_SHARE * (skipped - previous) + 1e-9
            previous = skipped
        aimed = chosen
        if aimed > horizon:
            break
        polls += 1
    assert polls <= len(plan)


def test_delay_quantile() -> None:
    times = [float(t) for t in range(1, 101)]  # polls at 50 and 100: delays 0-49, twice
    assert delay_quantile(times, [50.0, 100.0], q=0.5) == pytest.approx(24.5, abs=1)
    assert delay_quantile(times, [50.0, 100.0], q=0.95) == pytest.approx(47.0, abs=1)
    assert delay_quantile(times, [float(t) for t in range(1, 101)]) == 0.0


def test_adaptive_honours_an_explicit_target() -> None:
    samples = completion_times(1)
    for target in (2.0, 5.0, 10.0):
        plan = plan_polls(samples, target_delay=target, baseline=ExponentialJitter())
        assert mean_delay(samples, plan)[0] <= target


def test_adaptive_learns_from_observations() -> None:
    adaptive = Adaptive(min_samples=50, refresh_every=50, jitter=0, explore=0)
    for t in completion_times(2, 200):
        adaptive.observe(t - 0.5, t + 0.5)
    plan = adaptive.plan()
    assert plan is not None
    assert plan[0] > 0  # nothing finishes at once: no poll at the start
    delays = take(adaptive, len(plan) + 3)
    instants = list(itertools.accumulate(delays))
    assert instants[: len(plan)] == pytest.approx(list(plan))
    assert delays[len(plan):] == [pytest.approx(30 * 1.15, rel=0.15)] * 3  # the capped tail
    adaptive.observe(5, 1)  # nonsense bounds are ignored
    adaptive.observe(-1, 3)
    assert "observed=200," in repr(adaptive)


def test_turnbull_estimate_recovers_a_distribution_from_intervals() -> None:
    rng = random.Random(9)
    truth = [rng.uniform(0, 10) for _ in range(3000)] + [rng.uniform(20, 30) for _ in range(1000)]
    grid = [0, 2, 4, 6, 8, 10, 20, 25, 30]
    intervals = []
    for t in truth:  # each observed between two grid points, as polls would see it
        k = next(i for i, g in enumerate(grid) if g >= t)
        intervals.append((grid[k - 1], grid[k]))
    times, weights = estimate_completion_times(intervals, resolution=0.5)
    assert sum(weights) == pytest.approx(1.0)
    below_10 = sum(w for t, w in zip(times, weights, strict=True) if t <= 10)
    assert below_10 == pytest.approx(0.75, abs=0.02)
    assert all(not (10 < t < 20) for t in times)  # no mass where nothing was seen
