"""Effects that foxpoll's sans-io flows yield, and the two drivers that perform them.

A flow is a generator: it yields :class:`Send` (receives the :class:`httpx.Response`, or the
:class:`httpx.TransportError` raised while sending) and :class:`Sleep` (receives None), and
returns its result. The flows hold every decision; the drivers below are the only code
that differs between sync and async.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, TypeVar

import attrs
import httpx

from ._clock import Clock

__all__ = ["Flow", "Send", "Sleep", "drive", "drive_async"]

T = TypeVar("T")


@attrs.frozen
class Send:
    """Send this request; resume with the response or the transport error."""

    request: httpx.Request


@attrs.frozen
class Sleep:
    """Wait this many seconds; resume with None."""

    seconds: float


Effect = Send | Sleep
Outcome = httpx.Response | httpx.TransportError
Flow = Generator[Effect, Any, T]


def drive(flow: Flow[T], http: httpx.Client, clock: Clock) -> T:
    """Run ``flow`` to completion with blocking I/O."""
    try:
        effect = next(flow)
        while True:
            if isinstance(effect, Send):
                outcome: Outcome | None
                try:
                    outcome = http.send(effect.request)
                except httpx.TransportError as exc:
                    outcome = exc
            else:
                clock.sleep(effect.seconds)
                outcome = None
            effect = flow.send(outcome)
    except StopIteration as stop:
        result: T = stop.value
        return result
    finally:
        flow.close()


async def drive_async(flow: Flow[T], http: httpx.AsyncClient, clock: Clock) -> T:
    """Run ``flow`` to completion on the event loop; see :func:`drive`."""
    try:
        effect = next(flow)
        while True:
            if isinstance(effect, Send):
                outcome: Outcome | None
                try:
                    outcome = await http.send(effect.request)
                except httpx.TransportError as exc:
                    outcome = exc
            else:
                await clock.asleep(effect.seconds)
                outcome = None
            effect = flow.send(outcome)
    except StopIteration as stop:
        result: T = stop.value
        return result
    finally:
        flow.close()
