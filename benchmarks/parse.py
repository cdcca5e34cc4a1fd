"""What reading one response body costs, in time and peak memory, shape by shape.

Each body is at most 10 MiB, the default ``max_response_bytes``: hostile shapes that pack
many values under the size cap (an order of one-field items, empty objects, nesting),
the costliest shapes under foxpoll's bounds, and one long string in ASCII, in Cyrillic
and with an emoji (Python stores a string at the width of its widest character). A
``FoxReload`` reads each through ``httpx.MockTransport``, its body in 64 KiB chunks as
from a socket, so the numbers cover reading and parsing, not the network.

Printed per shape: the body's size, the wall and CPU time of ``orders.get`` (best of
three, untraced), its peak memory traced by ``tracemalloc`` (a separate run), as MiB and
as a multiple of the body's size, and the outcome. Uses only the public API, so the same
script measures an older foxpoll too (``PYTHONPATH=old/checkout python
benchmarks/parse.py``).

Run: ``python benchmarks/parse.py [--only SHAPE]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from foxpoll import FoxReload

MiB = 1024 * 1024
CAP = 10 * MiB
CHUNK = 64 * 1024


def padded(doc: dict[str, Any], prefix: str = "") -> bytes:
    """``doc`` as compact JSON, padded to the cap with a string field starting ``prefix``."""
    body = json.dumps(dict(doc, pad=prefix), separators=(",", ":"),
                      ensure_ascii=False).encode()
    return body[:-2] + b"x" * (CAP - len(body)) + b'"}'


def repeated(head: bytes, unit: bytes, tail: bytes) -> bytes:
    count = (CAP - len(head) - len(tail) + 1) // (len(unit) + 1)
    return head + b",".join([unit] * count) + tail


ORDER = {"id": "o1", "status": "completed", "items": []}
HEAD = b'{"id":"o1","status":"completed","items":['


def order_at_the_caps() -> dict[str, Any]:
    return {"id": "o1", "status": "completed", "items": [
        {"itemId": f"product_{i:05d}", "quantity": 1, "note": {"playerId": str(i)},
         "externalData": [{"code": f"C{i}-{j}", "pin": "1234"} for j in range(10)]}
        for i in range(1_000)]}


SHAPES: dict[str, Callable[[], bytes]] = {
    # Refused by the bounds.
    "one-field items": lambda: repeated(HEAD, b'{"itemId":"p"}', b"]}"),
    "empty objects": lambda: repeated(b'{"id":"o1","status":"completed","x":[', b"{}", b"]}"),
    "nested 100,000": lambda: (b'{"id":"o1","status":"completed","x":'
                               + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    # Read, at the value bound (100,000).
    "99,980 one-key objects": lambda: padded(dict(ORDER, x=[{"a": []}] * 49_990)),
    "99,990 distinct keys": lambda: padded(dict(ORDER, x={f"k{i}": 0 for i in range(99_990)})),
    "1,000 items, 10,000 codes": lambda: padded(order_at_the_caps()),
    # One long string.
    "ascii string": lambda: padded(ORDER),
    "cyrillic + ascii string": lambda: padded(ORDER, "\u0436"),
    "emoji + ascii string": lambda: padded(ORDER, "\U0001f600"),
}


class Chunked(httpx.SyncByteStream):
    def __init__(self, body: bytes) -> None:
        self.body = body

    def __iter__(self) -> Iterator[bytes]:
        view = memoryview(self.body)
        for start in range(0, len(view), CHUNK):
            yield bytes(view[start:start + CHUNK])


def get(body: bytes) -> str:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=Chunked(body), request=request)

    with FoxReload("sk-bench", base_url="https://api.test", max_retries=0,
                   transport=httpx.MockTransport(answer)) as client:
        try:
            order = client.orders.get("o1")
        except Exception as exc:  # the outcome is what is printed
            return f"{type(exc).__name__}: {str(exc)[:60]}"
        return f"read: {len(order.items)} items, {len(order.codes)} codes"


def measure(body: bytes) -> tuple[float, float, int, str]:
    best_wall = best_cpu = float("inf")
    for _ in range(3):
        gc.collect()
        wall, cpu = time.perf_counter(), time.process_time()
        outcome = get(body)
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    gc.collect()
    tracemalloc.start()
    try:
        get(body)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return best_wall, best_cpu, peak, outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(SHAPES), help="one shape")
    args = parser.parse_args()
    print(f"{'shape':27} {'MiB':>5} {'wall s':>7} {'cpu s':>6} {'peak MiB':>9} {'x':>5}  outcome")
    for name, build in SHAPES.items():
        if args.only and name != args.only:
            continue
        body = build()
        wall, cpu, peak, outcome = measure(body)
        print(f"{name:27} {len(body) / MiB:5.1f} {wall:7.3f} {cpu:6.3f} {peak / MiB:9.1f} "
              f"{peak / len(body):5.1f}  {outcome}", flush=True)


if __name__ == "__main__":
    main()
