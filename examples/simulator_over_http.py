"""Serve the simulator over real HTTP in a background thread and use the client against it.

Run: python examples/simulator_over_http.py
"""

from __future__ import annotations

import time

from foxpoll import FoxReload, SystemClock
from foxpoll.testing import FakeFoxReload, Fault, FaultKind, OrderScript, SimulatorServer


def main() -> None:
    sim = FakeFoxReload(clock=SystemClock(), default_script=OrderScript.complete(after=0.5))
    sim.inject(Fault(FaultKind.SERVER_ERROR, method="GET"))  # one 503, retried transparently
    with SimulatorServer(sim) as server, FoxReload(sim.api_key, base_url=server.url) as client:
        order = client.orders.create(items=[{"itemId": "product_steam_10"}], is_mock=True)
        client.orders.pay(order.id)
        while not (order := client.orders.get(order.id)).is_terminal:
            time.sleep(0.2)
        print(f"{server.url}: order {order.status} after {sim.count()} requests")


if __name__ == "__main__":
    main()
