from __future__ import annotations

import random

import pytest

from foxpoll.testing import FakeClock, FakeFoxReload

API_KEY = "sk-live-7f3a9c1e5b2d4a6f"  # looks real, so a leak would show in assertions


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sim(clock: FakeClock) -> FakeFoxReload:
    return FakeFoxReload(api_key=API_KEY, clock=clock)


@pytest.fixture
def rng() -> random.Random:
    return random.Random(1234)
