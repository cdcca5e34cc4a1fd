"""Testing helpers that ship with foxpoll: the FoxReload simulator and a virtual clock.

::

    sim = FakeFoxReload()
    sim.script_next(OrderScript.fail(after=30))
    sim.inject(Fault(FaultKind.RATE_LIMIT, retry_after=2))
    with sim.client() as client:        # a FoxReload on the simulator's virtual clock
        order = client.orders.create(items=[{"itemId": "product_steam_10"}])
"""

from typing import Any

from ._clock import FakeClock
from ._scripts import Fault, FaultKind, OrderScript, Outcome
from ._server import SimulatorServer
from ._simulator import (
    DEFAULT_API_KEY,
    DEFAULT_BASE_URL,
    FakeFoxReload,
    RecordedRequest,
    SimProduct,
    SimTransport,
)

__all__ = [
    "DEFAULT_API_KEY",
    "DEFAULT_BASE_URL",
    "DedupStoreConformance",
    "FakeClock",
    "FakeFoxReload",
    "Fault",
    "FaultKind",
    "OrderScript",
    "Outcome",
    "RecordedRequest",
    "SimProduct",
    "SimTransport",
    "SimulatorServer",
]


def __getattr__(name: str) -> Any:
    # The conformance suite imports pytest: load it only when a test suite asks for it.
    if name == "DedupStoreConformance":
        from .conformance import DedupStoreConformance

        return DedupStoreConformance
    raise AttributeError(f"module 'foxpoll.testing' has no attribute {name!r}")
