"""Testing helpers that ship with foxpoll: the FoxReload simulator and a virtual clock.

::

    sim = FakeFoxReload()
    sim.script_next(OrderScript.fail(after=30))
    sim.inject(Fault(FaultKind.RATE_LIMIT, retry_after=2))
    with sim.client() as client:        # a FoxReload on the simulator's virtual clock
        order = client.orders.create(items=[{"itemId": "product_steam_10"}])

    with HostileServer(Hostility.SLOW_BODY) as server:   # a server that misbehaves
        FoxReload(api_key="k", base_url=server.url, timeout=2.0).orders.get("o1")
"""

from typing import TYPE_CHECKING, Any

from ._clock import FakeClock
from ._hostile import FreezingProxy, HostileServer, Hostility, ReceivedRequest
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

if TYPE_CHECKING:  # loaded on first use (it imports pytest); named for type checkers
    from .conformance import DedupStoreConformance

__all__ = [
    "DEFAULT_API_KEY",
    "DEFAULT_BASE_URL",
    "DedupStoreConformance",
    "FakeClock",
    "FakeFoxReload",
    "Fault",
    "FaultKind",
    "FreezingProxy",
    "HostileServer",
    "Hostility",
    "OrderScript",
    "Outcome",
    "ReceivedRequest",
    "RecordedRequest",
    "SimProduct",
    "SimTransport",
    "SimulatorServer",
]


def _load_on_first_use(name: str) -> Any:
    # The conformance suite imports pytest: load it only when a test suite asks for it.
    if name == "DedupStoreConformance":
        from .conformance import DedupStoreConformance

        return DedupStoreConformance
    raise AttributeError(f"module 'foxpoll.testing' has no attribute {name!r}")


# Hidden from type checkers: they see the names above, and refuse a misspelt one.
if not TYPE_CHECKING:
    __getattr__ = _load_on_first_use
