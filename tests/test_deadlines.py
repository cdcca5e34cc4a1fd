"""The watchdog that cuts PostgreSQL store calls: fires what is due, nothing disarmed, in
bounded memory, and in forked children too."""

from __future__ import annotations

import multiprocessing
import threading
import time

import pytest

from foxpoll._deadlines import Watchdog


@pytest.mark.slow
def test_an_armed_alarm_fires_and_a_disarmed_one_does_not() -> None:
    watchdog = Watchdog()
    fired, spared = threading.Event(), threading.Event()
    alarm = watchdog.arm(0.05, fired.set)
    watchdog.disarm(watchdog.arm(0.05, spared.set))
    assert fired.wait(5)
    assert watchdog.disarm(alarm) is True  # it fired: the call was cut short
    assert not spared.wait(0.2)


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
