"""The watchdog that cuts blocking store calls: fires what is due, nothing disarmed, in
bounded memory, and in forked children too."""

from __future__ import annotations

import math
import multiprocessing
import threading
import time

from foxpoll._deadlines import Watchdog


def test_an_armed_alarm_fires_and_a_disarmed_one_does_not() -> None:
    watchdog = Watchdog()
    fired, spared = threading.Event(), threading.Event()
    alarm = watchdog.arm(0.05, fired.set)
    watchdog.disarm(watchdog.arm(0.05, spared.set))
    assert fired.wait(5)
    assert watchdog.disarm(alarm) is True  # it fired: the call was cut short
    assert not spared.wait(0.2)


def test_an_earlier_alarm_armed_after_a_later_one_still_fires_on_time() -> None:
    watchdog = Watchdog()
    late, early = threading.Event(), threading.Event()
    watchdog.arm(60, late.set)  # the thread now means to sleep for a minute
    start = time.monotonic()
    watchdog.arm(0.05, early.set)
    assert early.wait(5)
    assert time.monotonic() - start < 2
    assert not late.is_set()


def test_disarmed_alarms_do_not_pile_up() -> None:
    # Every store call arms a deadline seconds ahead and disarms it in microseconds; the
    # heap must follow the calls in flight, not every call of the last few seconds.
    watchdog = Watchdog()
    live = watchdog.arm(3600, lambda: None)
    for _ in range(10_000):
        watchdog.disarm(watchdog.arm(30, lambda: None))
    assert watchdog.pending() <= 2 * Watchdog.COMPACT_AFTER + 4
    assert watchdog.disarm(live) is False


def test_disarming_twice_is_harmless() -> None:
    watchdog = Watchdog()
    alarm = watchdog.arm(30, lambda: None)
    assert watchdog.disarm(alarm) is False
    assert watchdog.disarm(alarm) is False
    fired = threading.Event()
    watchdog.arm(0.05, fired.set)
    assert fired.wait(5)


def _fires_in_child(result: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    from foxpoll._deadlines import WATCHDOG

    fired = threading.Event()
    WATCHDOG.arm(0.05, fired.set)
    result.put(fired.wait(5))


def test_alarms_fire_in_a_forked_child() -> None:
    from foxpoll._deadlines import WATCHDOG

    # The parent's watchdog thread is running (and mid-wait) when the child is forked;
    # the child has no such thread, and must start its own.
    WATCHDOG.disarm(WATCHDOG.arm(60, lambda: None))
    pending = WATCHDOG.arm(3600, lambda: None)
    context = multiprocessing.get_context("fork")
    result = context.Queue()
    child = context.Process(target=_fires_in_child, args=(result,))
    child.start()
    try:
        assert result.get(timeout=10) is True
    finally:
        child.join(10)
        WATCHDOG.disarm(pending)


def test_arming_calls_in_a_row_does_not_wake_the_thread_each_time() -> None:
    # A thread switch per store call would cost more than the call's own Python.
    watchdog = Watchdog()
    watchdog.disarm(watchdog.arm(30, lambda: None))  # the thread starts, and settles
    time.sleep(0.1)
    woken = []
    notify = watchdog._cond.notify
    watchdog._cond.notify = lambda n=1: (woken.append(n), notify(n))  # type: ignore[method-assign]
    for _ in range(1_000):
        watchdog.disarm(watchdog.arm(30, lambda: None))
        time.sleep(0.0001)  # between calls: the thread gets the GIL, if it is awake
    assert len(woken) <= 1


def test_a_guarded_call_that_overruns_is_cut_within_a_tenth_more() -> None:
    watchdog = Watchdog()
    cut = threading.Event()
    guard = watchdog.guard(0.2, cut.set)
    guard.start()
    started = time.monotonic()
    assert cut.wait(5)
    assert 0.2 <= time.monotonic() - started < 0.2 * 1.1 + 0.5  # a tick, and scheduling
    assert guard.stop() is True  # it was cut
    guard.close()


def test_guarded_calls_that_end_in_time_are_never_cut() -> None:
    watchdog = Watchdog()
    cuts: list[int] = []
    guard = watchdog.guard(0.3, lambda: cuts.append(1))
    deadline = time.monotonic() + 0.6  # a dozen looks, and twice the deadline
    while time.monotonic() < deadline:
        guard.start()
        assert guard.stop() is False
    time.sleep(0.4)  # idle, between calls: nothing to cut either
    assert cuts == []
    guard.start()  # the connection serves again, and overruns this time
    time.sleep(0.5)
    assert guard.stop() is True
    assert cuts == [1]
    guard.close()


def test_closed_guards_are_forgotten_and_the_watching_stops() -> None:
    watchdog = Watchdog()
    guards = [watchdog.guard(0.05, lambda: None) for _ in range(100)]
    for guard in guards:
        guard.close()
    assert watchdog._guards == set()
    deadline = time.monotonic() + 5
    while watchdog._look_at < math.inf and time.monotonic() < deadline:
        time.sleep(0.01)
    assert watchdog._look_at == math.inf  # the next look found none, and armed no other
    assert watchdog.pending() == 0
    cut = threading.Event()
    guard = watchdog.guard(0.05, cut.set)  # watching starts again
    guard.start()
    assert cut.wait(5)
    guard.close()


def test_a_shorter_guard_is_looked_at_in_its_own_time() -> None:
    # A guard of 3 s arms a look every 0.3 s; one of 0.1 s made after it must not wait for
    # that look, nor leave two chains of looks behind.
    watchdog = Watchdog()
    slow = watchdog.guard(3, lambda: None)
    cut = threading.Event()
    quick = watchdog.guard(0.1, cut.set)
    quick.start()
    started = time.monotonic()
    assert cut.wait(5)
    assert time.monotonic() - started < 0.25  # not at the slow guard's first look
    quick.close()
    time.sleep(0.7)  # the overtaken look came and went, doing nothing
    assert watchdog.pending() == 1  # one chain of looks, for the slow guard
    slow.close()
